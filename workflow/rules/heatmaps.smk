# Stage: heatmaps (see docs/interface.md).
