# Stage: ssl_pretrain (see docs/interface.md).
