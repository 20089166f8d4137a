"""Hand-written kernels XLA calls through FFI where its own code is slow (see each module)."""
