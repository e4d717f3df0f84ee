# Stage: slide_features (see docs/interface.md).
