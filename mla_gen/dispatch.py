"""The runtime's dispatch in two explicit steps: `choose` asks generator.select for the variant and
grid with the device's numbers (pure, cached per shape); `occupancy` asks a loaded variant how many
of its CTAs fit on one SM, and choosing again with that number sizes the grid to the real kernel."""
from __future__ import annotations

import dataclasses
import functools

import torch

from generator import jit
from generator.select import Decision, decide
from generator.spec import Arch, DType, Family
from mla_gen.dtypes import to_dtype


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


@functools.lru_cache(maxsize=1024)
def choose(device_index: int, num_heads: int, ckv_dim: int, rope_dim: int, dtype: torch.dtype, s_q: int,
           family: str | None = None, num_parts: int | None = None, ctas_per_sm: int | None = None,
           kv_dtype: DType | None = None, batch: int | None = None, page_size: int | None = None) -> Decision:
    """The rules' decision for a shape on a device. Loads nothing: the grid assumes `ctas_per_sm`
    CTAs per SM (1 when None), so size it by calling again with `occupancy` of the chosen variant.
    kv_dtype: the cache's format (None: q's dtype). batch: requests per call (None: the grid ignores it;
    else the parts line up with the requests where that idles few, generator.select.aligned_parts). page_size:
    the cache's (seesaw needs whole TMA boxes of at least generator.select.SEESAW_MIN_BOX_ROWS rows).
    Raises SpecError (a ValueError) naming the field for a shape no variant takes (kv_dtype for an fp8
    cache on an arch no kernel reads it on)."""
    info = device_info(device_index)
    return decide(arch=info.arch, num_heads=num_heads, ckv_dim=ckv_dim, rope_dim=rope_dim, dtype=to_dtype(dtype),
                  s_q=s_q, sm_count=info.sm_count, family=Family.parse(family) if family else None,
                  num_parts=num_parts, ctas_per_sm=ctas_per_sm, kv_dtype=kv_dtype, batch=batch, page_size=page_size)


def occupancy(variant: jit.Variant, device_index: int) -> int:
    """CTAs of an opened variant's decode kernel resident on one SM of the device (from its real
    registers and shared memory; at least 1)."""
    with torch.cuda.device(device_index):
        return max(1, variant.max_active_ctas())
