# Stage: slide_classifier (see docs/interface.md).
