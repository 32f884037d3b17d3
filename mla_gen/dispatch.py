"""Reads the device, asks generator.select for the variant and grid, caches the decision per shape."""
from __future__ import annotations

import dataclasses
import functools

import torch

from generator.select import Decision, decide
from generator.spec import Arch, DType, Family
from mla_gen.loader import get_module

_DTYPES = {torch.bfloat16: DType.BF16, torch.float16: DType.FP16}


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    arch: Arch
    sm_count: int


@functools.lru_cache(maxsize=None)
def device_info(index: int) -> DeviceInfo:
    props = torch.cuda.get_device_properties(index)
    return DeviceInfo(index, props.name, Arch.for_capability(props.major, props.minor), props.multi_processor_count)


def to_dtype(dtype: torch.dtype) -> DType:
    if dtype not in _DTYPES:
        raise TypeError(f"dtype: expected torch.bfloat16 or torch.float16, got {dtype}")
    return _DTYPES[dtype]


@functools.lru_cache(maxsize=1024)
def choose(device_index: int, num_heads: int, ckv_dim: int, rope_dim: int, dtype: torch.dtype, s_q: int,
           family: str | None = None, num_parts: int | None = None) -> Decision:
    """The decision for a shape on a device, with the grid sized by the variant's real occupancy."""
    info = device_info(device_index)
    kwargs = dict(arch=info.arch, num_heads=num_heads, ckv_dim=ckv_dim, rope_dim=rope_dim, dtype=to_dtype(dtype),
                  s_q=s_q, sm_count=info.sm_count, family=Family.parse(family) if family else None,
                  num_parts=num_parts)
    first = decide(**kwargs)
    with torch.cuda.device(device_index):
        ctas = max(1, get_module(first.spec).max_active_ctas())
    return decide(**kwargs, ctas_per_sm=ctas)
