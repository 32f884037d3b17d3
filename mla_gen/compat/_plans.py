"""Planned MLADecodeWrappers shared by the compat adapters, keyed by everything a plan fixes.

A wrapper owns device workspaces that a captured CUDA graph keeps pointing at, so a wrapper that
ran during a capture is pinned: never evicted, never freed while the process lives.
"""
from __future__ import annotations

import collections
import functools

import torch

from mla_gen.api import MLADecodeWrapper

_MAX_UNPINNED = 32
_cache: collections.OrderedDict[tuple, MLADecodeWrapper] = collections.OrderedDict()
_pinned: dict[tuple, MLADecodeWrapper] = {}


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def plan_key(device: torch.device, batch: int, s_q: int, heads: int, ckv: int, rope: int, dtype: torch.dtype,
             page_size: int, max_pages: int, sm_scale: float) -> tuple:
    stream = torch.cuda.current_stream(device).cuda_stream
    return (device.index, stream, batch, s_q, heads, ckv, rope, dtype, page_size, max_pages, float(sm_scale))


def new_wrapper(key: tuple) -> MLADecodeWrapper:
    """A wrapper planned for `key` (see plan_key)."""
    index, _, batch, s_q, heads, ckv, rope, dtype, page_size, max_pages, sm_scale = key
    device = torch.device("cuda", index)
    w = MLADecodeWrapper(device)
    w.plan(torch.empty(batch, dtype=torch.int32, device=device), s_q, num_heads=heads, ckv_dim=ckv, rope_dim=rope,
           page_size=page_size, max_pages=max_pages, sm_scale=sm_scale, dtype=dtype)
    return w


def wrapper_for(key: tuple) -> MLADecodeWrapper:
    """The shared wrapper planned for `key`, planning it on first use."""
    w = _pinned.get(key)
    if w is not None:
        return w
    w = _cache.get(key)
    if w is None:
        w = _cache[key] = new_wrapper(key)
        if len(_cache) > _MAX_UNPINNED:
            _cache.popitem(last=False)
    else:
        _cache.move_to_end(key)
    return w


def pin_if_capturing(key: tuple, w: MLADecodeWrapper) -> None:
    """Keep `w` alive for good when it runs inside a CUDA graph capture."""
    if key not in _pinned and torch.cuda.is_current_stream_capturing():
        _pinned[key] = w
        _cache.pop(key, None)
