# Stage: metrics (see docs/interface.md).
