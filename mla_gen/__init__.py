"""mla-gen's runtime: absorbed MLA decode attention on generated kernels, from PyTorch.

    import mla_gen
    out = mla_gen.mla_decode(q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens, sm_scale)

torch is imported only by the modules that handle tensors: `mla_gen.cost` and `mla_gen.schedule`
(plain arithmetic) import without it, and the names below load `mla_gen.api` on first use.
The operators torch.ops.mla_gen.* (mla_gen.ops, for torch.compile) are registered here when torch
is already imported, else with the first of mla_gen's torch modules to load.
"""
import sys

from generator import __version__

if "torch" in sys.modules:  # torch costs nothing more now; the ops exist as soon as mla_gen does
    from mla_gen import ops  # noqa: F401

__all__ = ["__version__", "mla_decode", "MLADecodeWrapper", "DecodePlan"]
_API = ("mla_decode", "MLADecodeWrapper", "DecodePlan")


def __getattr__(name: str):
    if name in _API:
        from mla_gen import api, ops  # noqa: F401  (ops: registers torch.ops.mla_gen.*)
        return getattr(api, name)
    raise AttributeError(f"module 'mla_gen' has no attribute {name!r}")
