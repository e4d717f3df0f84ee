# Stage: report (see docs/interface.md).
