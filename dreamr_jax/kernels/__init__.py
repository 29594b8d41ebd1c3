"""Hand-written kernels for what XLA runs slowly on a platform, each with the XLA path kept as
its reference and used wherever the kernel does not apply."""
