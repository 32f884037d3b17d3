"""mla-gen's runtime: absorbed MLA decode attention on generated kernels, from PyTorch.

    import mla_gen
    out = mla_gen.mla_decode(q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens, sm_scale)

torch is imported only by the modules that handle tensors: `mla_gen.cost` and `mla_gen.schedule`
(plain arithmetic) import without it, and the names below load `mla_gen.api` on first use.
"""
from generator import __version__

__all__ = ["__version__", "mla_decode", "MLADecodeWrapper", "DecodePlan"]
_API = ("mla_decode", "MLADecodeWrapper", "DecodePlan")


def __getattr__(name: str):
    if name in _API:
        from mla_gen import api
        return getattr(api, name)
    raise AttributeError(f"module 'mla_gen' has no attribute {name!r}")
