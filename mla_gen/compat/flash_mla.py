"""FlashMLA's decode API (deepseek-ai/FlashMLA, flash_mla/flash_mla_interface.py) on mla-gen's kernels.

    from mla_gen.compat.flash_mla import get_mla_metadata, flash_mla_with_kvcache   # was: from flash_mla import ...

Both conventions engines use:

- today's upstream: `sched_meta, _ = get_mla_metadata()` returns an empty FlashMLASchedMeta that the
  first flash_mla_with_kvcache call fills (here: with a planned mla_gen.MLADecodeWrapper);
  later calls with the same shapes reuse it, and `num_splits` must be None;
- the older one: `tile_scheduler_metadata, num_splits = get_mla_metadata(cache_seqlens,
  num_q_tokens_per_head_k, num_heads_k)` returns two int32 tensors shaped as FlashMLA's
  ([num_sm_parts, 8] and [batch + 1], so engines' CUDA-graph copies of them fit). mla-gen plans its
  split schedule on the GPU at every run, so their values are placeholders; the plan is kept per
  shape and stream, and one that ran inside a CUDA graph capture is kept for good.

The combined cache k_cache [num_blocks, page_block_size, 1, head_dim] is read through two views
(ckv = [..., :head_dim_v], kpe = [..., head_dim_v:]), never copied. Returns out [B, s_q, H, head_dim_v]
and softmax_lse [B, H, s_q] fp32 (natural log; a transposed view of [B, s_q, H], FlashMLA's strides).
Beyond FlashMLA: any page size, 512/64 and 256/32 head dims, fp16, sm_80 (the `mma` family),
causal=False with s_q > 1 (as s_q x H rows of one token, up to 128). Not here: fp8 and sparse modes.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Optional, Tuple

import torch

from mla_gen.compat import _plans
from mla_gen.dtypes import KERNEL_DTYPES

TILE_SCHEDULER_METADATA_SIZE = 8  # int32 columns of FlashMLA's tile scheduler metadata


@dataclasses.dataclass
class FlashMLASchedMeta:
    """The scheduler metadata of today's FlashMLA: the first flash_mla_with_kvcache call fills it;
    later calls must have the same shapes (a mismatch raises, naming the field)."""

    @dataclasses.dataclass
    class Config:
        b: int
        s_q: int
        h_q: int
        page_block_size: int
        h_k: int
        causal: bool
        is_fp8_kvcache: bool
        topk: Optional[int]
        extra_page_block_size: Optional[int]
        extra_topk: Optional[int]

    have_initialized: bool = False
    config: Optional[Config] = None
    tile_scheduler_metadata: Optional[torch.Tensor] = None  # mla-gen: the plan's device work list [parts, 4]
    num_splits: Optional[torch.Tensor] = None               # mla-gen: the plan's request table [batch, 4]
    plans: dict = dataclasses.field(default_factory=dict)   # mla-gen: plan key -> MLADecodeWrapper


def _old_get_mla_metadata(cache_seqlens: torch.Tensor, num_q_tokens_per_head_k: int, num_heads_k: int,
                          num_heads_q: Optional[int] = None, is_fp8_kvcache: bool = False,
                          topk: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dim() != 1 \
            or cache_seqlens.dtype != torch.int32 or not cache_seqlens.is_cuda:
        raise ValueError(f"cache_seqlens: expected an int32 CUDA tensor [batch], got "
                         f"{_describe(cache_seqlens)}")
    for name, value in (("num_q_tokens_per_head_k", num_q_tokens_per_head_k), ("num_heads_k", num_heads_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if num_heads_k != 1:
        raise ValueError(f"num_heads_k: MLA decode has one kv head, got {num_heads_k}")
    _reject_modes(is_fp8_kvcache=is_fp8_kvcache, topk=topk)
    device = cache_seqlens.device
    parts = max(_plans.sm_count(device.index) // num_heads_k // -(-num_q_tokens_per_head_k // 64), 1)
    return (torch.zeros(parts, TILE_SCHEDULER_METADATA_SIZE, dtype=torch.int32, device=device),
            torch.arange(cache_seqlens.shape[0] + 1, dtype=torch.int32, device=device))


_OLD_SIGNATURE = inspect.signature(_old_get_mla_metadata)


def get_mla_metadata(*args, **kwargs):
    """No arguments (today's FlashMLA): returns (FlashMLASchedMeta(), None). With the older arguments
    (cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_heads_q=None, is_fp8_kvcache=False,
    topk=None; `num_heads_per_head_k` is the oldest name of the second): returns
    (tile_scheduler_metadata [num_sm_parts, 8], num_splits [batch + 1]), int32 placeholders.
    Raises ValueError naming a bad argument, NotImplementedError for fp8 or sparse (topk)."""
    if not args and not kwargs:
        return FlashMLASchedMeta(), None
    if "num_heads_per_head_k" in kwargs:
        kwargs["num_q_tokens_per_head_k"] = kwargs.pop("num_heads_per_head_k")
    try:
        bound = _OLD_SIGNATURE.bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"get_mla_metadata: {e} (expected no arguments, or {_OLD_SIGNATURE})") from None
    return _old_get_mla_metadata(*bound.args, **bound.kwargs)


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    return type(value).__name__


def _reject_modes(**modes: object) -> None:
    for name, value in modes.items():
        if value is not None and value is not False:
            raise NotImplementedError(f"{name}: mla-gen's FlashMLA adapter runs dense bf16/fp16 decode only "
                                      f"(no fp8 cache, sparse indices, attention sinks or extra caches); got {name}="
                                      f"{_describe(value) if isinstance(value, torch.Tensor) else repr(value)}")


def _check_config(meta: FlashMLASchedMeta, config: FlashMLASchedMeta.Config) -> None:
    if not meta.have_initialized:
        meta.have_initialized, meta.config = True, config
        return
    for field in dataclasses.fields(config):
        want, got = getattr(meta.config, field.name), getattr(config, field.name)
        if want != got:
            raise ValueError(f"tile_scheduler_metadata: its config.{field.name} is {want} (from its first call), "
                             f"this call has {got}; reuse a FlashMLASchedMeta only for calls of the same shapes")


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: Optional[torch.Tensor],
    cache_seqlens: Optional[torch.Tensor],
    head_dim_v: int,
    tile_scheduler_metadata,
    num_splits: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: Optional[torch.Tensor] = None,
    attn_sink: Optional[torch.Tensor] = None,
    extra_k_cache: Optional[torch.Tensor] = None,
    extra_indices_in_kvcache: Optional[torch.Tensor] = None,
    topk_length: Optional[torch.Tensor] = None,
    extra_topk_length: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """q [B, s_q, H, D] (D = head_dim_v + rope dim), k_cache [num_blocks, page_block_size, 1, D],
    block_table [B, max_blocks] int32, cache_seqlens [B] int32 (the s_q new tokens included: query i
    sees cache positions < seqlen - s_q + i + 1 when causal), softmax_scale default D ** -0.5 (as
    FlashMLA; a model's scale is 1/sqrt(qk_nope + qk_rope) x mscale^2). tile_scheduler_metadata: a
    FlashMLASchedMeta (num_splits None) or the older tensor pair. Returns (out [B, s_q, H, head_dim_v]
    in q's dtype, softmax_lse [B, H, s_q] fp32). Raises TypeError/ValueError naming the argument."""
    _reject_modes(is_fp8_kvcache=is_fp8_kvcache, indices=indices, attn_sink=attn_sink, extra_k_cache=extra_k_cache,
                  extra_indices_in_kvcache=extra_indices_in_kvcache, topk_length=topk_length,
                  extra_topk_length=extra_topk_length)
    meta = tile_scheduler_metadata
    if isinstance(meta, FlashMLASchedMeta):
        if num_splits is not None:
            raise ValueError("num_splits: expected None with a FlashMLASchedMeta (today's FlashMLA convention), "
                             f"got {_describe(num_splits)}")
    elif not isinstance(meta, torch.Tensor):
        raise TypeError(f"tile_scheduler_metadata: expected the FlashMLASchedMeta or the tensor that "
                        f"get_mla_metadata returned, got {_describe(meta)}")
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q: expected a tensor [batch, s_q, num_heads_q, head_dim], got {_describe(q)}")
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"q: expected dtype torch.bfloat16 or torch.float16, got {q.dtype}")
    if not isinstance(k_cache, torch.Tensor) or k_cache.dim() != 4:
        raise ValueError(f"k_cache: expected a tensor [num_blocks, page_block_size, num_heads_k, head_dim], "
                         f"got {_describe(k_cache)}")
    batch, s_q, heads, dim = q.shape
    if k_cache.shape[2] != 1:
        raise ValueError(f"k_cache: MLA decode has one kv head (num_heads_k 1), got shape {tuple(k_cache.shape)}")
    if k_cache.shape[3] != dim:
        raise ValueError(f"k_cache: expected head_dim {dim} (q's last dim), got shape {tuple(k_cache.shape)}")
    if isinstance(head_dim_v, bool) or not isinstance(head_dim_v, int) or not 0 < head_dim_v < dim:
        raise ValueError(f"head_dim_v: expected an integer in (0, {dim}) (q's head_dim = head_dim_v + rope dim), "
                         f"got {head_dim_v!r}")
    for name, t in (("block_table", block_table), ("cache_seqlens", cache_seqlens)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected an int32 tensor (dense decode needs it), got {_describe(t)}")
    if block_table.dim() != 2:
        raise ValueError(f"block_table: expected [batch, max_num_blocks_per_seq], got {_describe(block_table)}")
    scale = dim ** -0.5 if softmax_scale is None else softmax_scale
    page = k_cache.shape[1]
    if isinstance(meta, FlashMLASchedMeta):
        _check_config(meta, FlashMLASchedMeta.Config(batch, s_q, heads, page, 1, bool(causal), False, None,
                                                     None, None))
    out = q.new_empty(batch, s_q, heads, head_dim_v)
    lse = torch.empty(batch, s_q, heads, dtype=torch.float32, device=q.device)
    if batch == 0:
        return out, lse.transpose(1, 2)
    rope = dim - head_dim_v
    q_nope, q_pe = q[..., :head_dim_v], q[..., head_dim_v:]
    ckv, kpe = k_cache[:, :, 0, :head_dim_v], k_cache[:, :, 0, head_dim_v:]
    out_v, lse_v, rows_sq, rows_h = out, lse, s_q, heads
    if s_q > 1 and not causal:  # every new token sees the whole cache: s_q x H rows of one token
        rows_sq, rows_h = 1, s_q * heads
        q_nope, q_pe = q_nope.reshape(batch, 1, rows_h, head_dim_v), q_pe.reshape(batch, 1, rows_h, rope)
        out_v, lse_v = out.view(batch, 1, rows_h, head_dim_v), lse.view(batch, 1, rows_h)
    key = _plans.plan_key(q.device, batch, rows_sq, rows_h, head_dim_v, rope, q.dtype, page,
                          block_table.shape[1], scale)
    plans = meta.plans if isinstance(meta, FlashMLASchedMeta) else None
    w = plans.get(key) if plans is not None else None
    if w is None:
        w = _plans.wrapper_for(key)
        if plans is not None:  # the metadata holds its plan alive, as FlashMLA's holds its schedule
            plans[key] = w
            meta.tile_scheduler_metadata, meta.num_splits = w.schedule()
    w.run(q_nope, q_pe, ckv, kpe, block_table, cache_seqlens, out=out_v, lse=lse_v)
    if plans is None:
        _plans.pin_if_capturing(key, w)
    return out, lse.transpose(1, 2)


__all__ = ["FlashMLASchedMeta", "get_mla_metadata", "flash_mla_with_kvcache"]
