# Stage: split (see docs/interface.md).
