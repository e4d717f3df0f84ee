# Stage: patch_classifier (see docs/interface.md).
