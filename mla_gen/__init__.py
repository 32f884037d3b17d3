"""mla-gen's runtime: MLA decode attention on generated kernels, from PyTorch."""
