# Stage: stain (see docs/interface.md).
