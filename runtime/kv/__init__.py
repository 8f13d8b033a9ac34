"""The paged KV cache: storage format, block management, and the per-step views the kernels read."""
