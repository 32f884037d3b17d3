"""mla_decode as PyTorch operators, so torch.compile(fullgraph=True) traces through it.

    torch.ops.mla_gen.mla_decode(q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens, sm_scale) -> out
    torch.ops.mla_gen.mla_decode_lse(...same...) -> (out, lse)
    torch.ops.mla_gen.mla_decode_out(...same..., out, lse=None) -> None      # writes out (and lse) in place

Registered with torch.library.custom_op when this module is imported: `import mla_gen` does that
if torch is already imported, and so does any torch-using part of mla_gen (api, layer, compat).
Each op has a fake implementation (shapes only) for torch.compile and FakeTensor tracing. On CUDA
the ops run mla_gen.mla_decode (generated kernels); on any other device a float32 torch
implementation over the same paged inputs, so CPU tests and opcheck run everywhere.
`mla_gen.mla_decode` stays the friendly entry point: eager callers skip the dispatcher's cost.
"""
from __future__ import annotations

from typing import Optional

import torch

_LIB = "mla_gen"


def _torch_decode(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor,
                  block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                  sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed MLA decode in float32 torch ops (any device): out [B, s_q, H, C] in q's dtype, lse
    [B, s_q, H] fp32. Cache slots past each length are zeroed before use (they may hold NaN)."""
    batch, s_q, heads, ckv_dim = q_nope.shape
    num_pages, page_size = ckv_cache.shape[:2]
    max_pages = block_table.shape[1]
    T = max_pages * page_size
    pages = block_table.long().clamp(0, num_pages - 1)  # unused slots may hold anything
    t = torch.arange(T, device=q_nope.device)
    stale = (t[None, :] >= cache_seqlens.long()[:, None])[..., None]
    ckv = ckv_cache[pages].reshape(batch, T, ckv_dim).float().masked_fill(stale, 0)
    kpe = kpe_cache[pages].reshape(batch, T, -1).float().masked_fill(stale, 0)
    scores = (torch.einsum("bshc,btc->bsht", q_nope.float(), ckv)
              + torch.einsum("bshr,btr->bsht", q_pe.float(), kpe)) * sm_scale
    limit = cache_seqlens.long()[:, None] - s_q + torch.arange(s_q, device=q_nope.device)[None, :] + 1  # [B, s_q]
    visible = t[None, None, :] < limit[:, :, None]
    scores = scores.masked_fill(~visible[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bsht,btc->bshc", torch.softmax(scores, dim=-1).nan_to_num(0.0), ckv)
    return out.to(q_nope.dtype), lse


def _decode(q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens, sm_scale, out=None, lse=None,
            want_lse=False):
    if q_nope.is_cuda:
        from mla_gen.api import mla_decode
        return mla_decode(q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens, sm_scale, out=out,
                          lse=lse, return_lse=want_lse or lse is not None)
    o, l_ = _torch_decode(q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens, sm_scale)
    if out is not None:
        out.copy_(o)
        o = out
    if lse is not None:
        lse.copy_(l_)
        l_ = lse
    return (o, l_) if (want_lse or lse is not None) else o


def _fake_out(q_nope: torch.Tensor) -> torch.Tensor:
    return q_nope.new_empty(q_nope.shape)


def _fake_lse(q_nope: torch.Tensor) -> torch.Tensor:
    return q_nope.new_empty(q_nope.shape[:3], dtype=torch.float32)


@torch.library.custom_op(f"{_LIB}::mla_decode", mutates_args=())
def mla_decode(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor,
               block_table: torch.Tensor, cache_seqlens: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """out [B, s_q, H, C]; the arguments as mla_gen.mla_decode's."""
    out = _decode(q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens, sm_scale)
    # NOTE(custom_op): an op's output may not alias an input or a buffer another call returns
    # again; mla_gen.mla_decode allocates `out` per call, so this holds.
    return out


@mla_decode.register_fake
def _(q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens, sm_scale):
    return _fake_out(q_nope)


@torch.library.custom_op(f"{_LIB}::mla_decode_lse", mutates_args=())
def mla_decode_lse(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor,
                   block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                   sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, s_q, H, C], lse [B, s_q, H] fp32, natural log)."""
    return _decode(q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens, sm_scale, want_lse=True)


@mla_decode_lse.register_fake
def _(q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens, sm_scale):
    return _fake_out(q_nope), _fake_lse(q_nope)


@torch.library.custom_op(f"{_LIB}::mla_decode_out", mutates_args=("out", "lse"))
def mla_decode_out(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor,
                   block_table: torch.Tensor, cache_seqlens: torch.Tensor, sm_scale: float, out: torch.Tensor,
                   lse: Optional[torch.Tensor] = None) -> None:
    """Writes out [B, s_q, H, C] (and lse [B, s_q, H] fp32 when given) in place."""
    _decode(q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens, sm_scale, out=out, lse=lse)


@mla_decode_out.register_fake
def _(q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens, sm_scale, out, lse=None):
    return None


OPS = ("mla_decode", "mla_decode_lse", "mla_decode_out")
