# Stage: lesions (see docs/interface.md).
