"""mla-gen's runtime: absorbed MLA decode attention on generated kernels, from PyTorch.

    import mla_gen
    out = mla_gen.mla_decode(q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens, sm_scale)
"""
from generator import __version__
from mla_gen.api import DecodePlan, MLADecodeWrapper, mla_decode

__all__ = ["__version__", "mla_decode", "MLADecodeWrapper", "DecodePlan"]
