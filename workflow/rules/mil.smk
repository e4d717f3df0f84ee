# Stage: mil (see docs/interface.md).
