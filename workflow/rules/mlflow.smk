# Stage: mlflow (see docs/interface.md).
