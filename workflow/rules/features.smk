# Stage: features (see docs/interface.md).
