"""mla-gen's compiler half: variant specs, Jinja2 rendering, nvcc/ninja builds, binary cache.

Torch-free by design: it runs on a machine with nvcc and no GPU (and no torch).
"""
__version__ = "0.1.0"

from generator.errors import BuildError, CacheError, MlaGenError, MissingJITCacheError, SpecError, ToolchainError
from generator.spec import Arch, DType, Family, Tile, VariantSpec

__all__ = [
    "__version__", "Arch", "DType", "Family", "Tile", "VariantSpec",
    "MlaGenError", "SpecError", "ToolchainError", "BuildError", "CacheError", "MissingJITCacheError",
]
