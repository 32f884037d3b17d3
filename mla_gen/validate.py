"""Argument checks of mla_decode, before anything is launched.

A call runs three stages, in order: `check_structure` (types, dtypes, dims, shapes agreeing,
strides, alignment, sm_scale), `check_values` (lengths and page ids: reads device memory, so it runs
on request or with MLA_GEN_DEBUG=1), `check_devices` (every tensor on q's CUDA device). A plan runs
`check_plan`. A planned call that has seen its inputs' `structure_key` pass before checks only their
data pointers' alignment (mla_gen.api). Errors name the argument and what was expected:
`ckv_cache: expected dtype torch.bfloat16, got torch.float16`.

The cache's format (DecodeShape.kv_dtype) is read from the tensors: ckv_cache and kpe_cache of q's
dtype; float8_e4m3fn ckv_cache and kpe_cache with kv_scale (fp8_e4m3); or one 656-byte cache as
ckv_cache with kpe_cache None (fp8_ds_mla, mla_gen.fp8).
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import torch

from generator.spec import DS_MLA_CKV, DS_MLA_ROPE, DS_MLA_TOKEN_BYTES, DType, Family
from mla_gen.dtypes import DS_MLA_DTYPES, FP8, KERNEL_DTYPES, to_dtype, to_kv_dtype


@dataclasses.dataclass(frozen=True)
class DecodeShape:
    batch: int
    s_q: int
    num_heads: int
    ckv_dim: int
    rope_dim: int
    dtype: torch.dtype
    num_pages: int
    page_size: int
    max_pages: int
    kv_dtype: DType  # the cache's format: q's dtype, FP8_E4M3 or FP8_DS_MLA


def _tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def _dims(name: str, t: torch.Tensor, layout: str) -> None:
    want = len(layout.split(","))
    if t.dim() != want:
        raise ValueError(f"{name}: expected {want} dims [{layout}], got shape {tuple(t.shape)}")


def _dtype(name: str, t: torch.Tensor, want: torch.dtype | tuple[torch.dtype, ...]) -> None:
    options = want if isinstance(want, tuple) else (want,)
    if t.dtype not in options:
        expected = " or ".join(str(d) for d in options)
        raise TypeError(f"{name}: expected dtype {expected}, got {t.dtype}")


def _agree(name: str, what: str, got: int, want: int, source: str) -> None:
    if got != want:
        raise ValueError(f"{name}: expected {what} {want} (as {source}), got {got}")


def _vector_rows(name: str, t: torch.Tensor, leading: int) -> None:
    """Last dim contiguous; rows and the base 16-byte aligned (the kernels load 16-byte vectors)."""
    if t.numel() == 0:
        return
    if t.stride(-1) != 1:
        raise ValueError(f"{name}: expected a contiguous last dim (stride 1), got strides {tuple(t.stride())}")
    item = t.element_size()
    for d in range(leading):
        if t.shape[d] > 1 and (t.stride(d) * item) % 16:
            raise ValueError(f"{name}: stride {t.stride(d)} of dim {d} is not a multiple of 16 bytes "
                             f"({16 // item} elements); the kernels load 16-byte vectors")
    if t.data_ptr() % 16:
        raise ValueError(f"{name}: data pointer is not 16-byte aligned (a view at an odd offset?)")


def _no_overlap(name: str, t: torch.Tensor) -> None:
    """An output written in parallel must not alias itself (an expanded view has stride 0)."""
    for d in range(t.dim()):
        if t.shape[d] > 1 and t.stride(d) == 0:
            raise ValueError(f"{name}: stride 0 of dim {d} makes its elements overlap (an expanded view?); "
                             f"expected a tensor the kernels can write")


# The kernels scale float32 scores: past MAX_SM_SCALE an ordinary |q k| of 1e8 overflows them (3.1e37 gave a zero
# output); below it a huge scale is a hard max over the tokens (tests/test_edge_cases_gpu.py takes 6.35e8). Below
# MIN_SM_SCALE the scale (times log2 e and an fp8 cache's scale) nears float32's smallest normal, and one that is
# 0 in float32 (4.75e-247) turned a tile's masked scores into NaN; at it the softmax is uniform (the same file).
MAX_SM_SCALE = 1e30
MIN_SM_SCALE = 1e-30


def check_sm_scale(sm_scale: object) -> float:
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, numbers.Real):  # numpy scalars too
        raise TypeError(f"sm_scale: expected a float, got {type(sm_scale).__name__}")
    value = float(sm_scale)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"sm_scale: expected a finite number > 0, got {value}")
    if value > MAX_SM_SCALE:
        raise ValueError(f"sm_scale: expected a finite number > 0 and at most {MAX_SM_SCALE:.0e} (the kernels' "
                         f"float32 scores overflow beyond), got {value:g}")
    if value < MIN_SM_SCALE:
        raise ValueError(f"sm_scale: expected a finite number of at least {MIN_SM_SCALE:.0e} (the kernels' "
                         f"float32 scale underflows below), got {value:g}")
    return value


def check_device(device: object) -> torch.device:
    """The CUDA device a wrapper runs on: None (the current one), 'cuda', 'cuda:1', an index or a
    torch.device. Raises ValueError naming `device`."""
    try:
        if device is None:
            dev = torch.device("cuda")
        elif isinstance(device, int) and not isinstance(device, bool):
            dev = torch.device("cuda", device)
        else:
            dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device: expected a CUDA device ('cuda', 'cuda:1', an index), got {device!r}") from None
    if dev.type != "cuda":
        raise ValueError(f"device: expected a CUDA device, got {dev}")
    if dev.index is None:
        if not torch.cuda.is_available():
            raise ValueError("device: expected a CUDA device, but torch sees none (torch.cuda.is_available() "
                             "is false)")
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def check_overrides(family: object, num_parts: object) -> tuple[str | None, int | None]:
    """Dispatch overrides: a family name (generator.spec.Family) and a positive part count, or None.
    Raises ValueError naming `family` or `num_parts`."""
    if family is not None and not isinstance(family, str):
        raise ValueError(f"family: expected a family name ({', '.join(f.value for f in Family)}), got {family!r}")
    if family is not None:
        family = Family.parse(family).value  # SpecError, a ValueError, naming `family`
    if num_parts is not None and (isinstance(num_parts, bool) or not isinstance(num_parts, int) or num_parts < 1):
        raise ValueError(f"num_parts: expected a positive integer or None, got {num_parts!r}")
    return family, num_parts


def check_plan(cache_seqlens: object, s_q: object, *, num_heads: object, ckv_dim: object, rope_dim: object,
               page_size: object, max_pages: object, sm_scale: object, dtype: object, device: torch.device,
               kv_dtype: object = None) -> tuple[int, float, DType]:
    """MLADecodeWrapper.plan's arguments: cache_seqlens an int32 [batch] tensor on `device` with
    batch >= 1, positive integer sizes, a kernel dtype, a cache format (mla_gen.dtypes.to_kv_dtype) that
    takes these dims and dtype, a finite sm_scale in [MIN_SM_SCALE, MAX_SM_SCALE]. Returns (batch, sm_scale as a
    float, the cache's DType). Raises TypeError/ValueError naming the argument."""
    cache_seqlens = _tensor("cache_seqlens", cache_seqlens)
    _dims("cache_seqlens", cache_seqlens, "batch")
    _dtype("cache_seqlens", cache_seqlens, torch.int32)
    for name, value in (("s_q", s_q), ("num_heads", num_heads), ("ckv_dim", ckv_dim), ("rope_dim", rope_dim),
                        ("page_size", page_size), ("max_pages", max_pages)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    kv = to_kv_dtype(kv_dtype, to_dtype(dtype))
    if kv is DType.FP8_DS_MLA:
        _ds_mla_dims(("ckv_dim", "rope_dim", "dtype"), ckv_dim, rope_dim, dtype)
    scale = check_sm_scale(sm_scale)
    batch = cache_seqlens.shape[0]
    if batch < 1:
        raise ValueError("cache_seqlens: expected a batch of at least one request, got 0")
    if cache_seqlens.device != device:
        raise ValueError(f"cache_seqlens: expected a tensor on {device} (the wrapper's device), "
                         f"got {cache_seqlens.device}")
    return batch, scale, kv


def _ds_mla_dims(names: tuple[str, str, str], ckv_dim: int, rope_dim: int, dtype: object) -> None:
    """fp8_ds_mla's token holds 512 ckv and 64 rope values, the rope in bf16 (so q is bf16 too); `names`:
    the arguments that carry ckv_dim, rope_dim and the q dtype, named by the error."""
    if ckv_dim != DS_MLA_CKV:
        raise ValueError(f"{names[0]}: an fp8_ds_mla cache holds {DS_MLA_CKV} ckv values per token, "
                         f"got ckv_dim {ckv_dim}")
    if rope_dim != DS_MLA_ROPE:
        raise ValueError(f"{names[1]}: an fp8_ds_mla cache holds {DS_MLA_ROPE} rope values per token, "
                         f"got rope_dim {rope_dim}")
    if dtype != torch.bfloat16:
        raise TypeError(f"{names[2]}: an fp8_ds_mla cache keeps its rope in bf16 and takes bf16 queries, "
                        f"got {dtype}")


def check_structure(q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens, sm_scale,
                    out=None, lse=None, kv_scale=None) -> DecodeShape:
    """Everything checkable from tensor metadata alone (no device access). Raises TypeError/ValueError."""
    q_nope, q_pe = _tensor("q_nope", q_nope), _tensor("q_pe", q_pe)
    ckv_cache = _tensor("ckv_cache", ckv_cache)
    ds_mla = kpe_cache is None and ckv_cache.dtype in DS_MLA_DTYPES  # one 656-byte cache, the rope inside
    kpe_cache = None if ds_mla else _tensor("kpe_cache", kpe_cache)
    block_table, cache_seqlens = _tensor("block_table", block_table), _tensor("cache_seqlens", cache_seqlens)
    _dims("q_nope", q_nope, "batch, s_q, heads, ckv_dim")
    _dtype("q_nope", q_nope, KERNEL_DTYPES)
    dtype = q_nope.dtype
    batch, s_q, heads, ckv_dim = q_nope.shape
    if s_q < 1 or heads < 1:  # batch 0 is a step with nothing to decode
        raise ValueError(f"q_nope: expected s_q and heads >= 1, got shape {tuple(q_nope.shape)}")
    _dims("q_pe", q_pe, "batch, s_q, heads, rope_dim")
    _dtype("q_pe", q_pe, dtype)
    for i, what in enumerate(("batch", "s_q", "heads")):
        _agree("q_pe", what, q_pe.shape[i], q_nope.shape[i], "q_nope")
    rope_dim = q_pe.shape[3]
    if ds_mla:
        kv = DType.FP8_DS_MLA
        _ds_mla_cache(ckv_cache, ckv_dim, rope_dim, dtype)
    else:
        kv = DType.FP8_E4M3 if ckv_cache.dtype == FP8 else to_dtype(dtype)
        _dims("ckv_cache", ckv_cache, "num_pages, page_size, ckv_dim")
        if ckv_cache.dtype in DS_MLA_DTYPES and ckv_cache.shape[2] == DS_MLA_TOKEN_BYTES != ckv_dim:
            raise ValueError(f"kpe_cache: expected None with a {DS_MLA_TOKEN_BYTES}-byte fp8_ds_mla cache (its "
                             f"tokens hold the rope), got a tensor")
        _dtype("ckv_cache", ckv_cache, FP8 if kv.is_fp8 else dtype)
        _agree("ckv_cache", "ckv_dim (last dim)", ckv_cache.shape[2], ckv_dim, "q_nope's last dim")
    num_pages, page_size = ckv_cache.shape[0], ckv_cache.shape[1]
    if num_pages < 1 or page_size < 1:
        raise ValueError(f"ckv_cache: expected num_pages and page_size >= 1, got shape {tuple(ckv_cache.shape)}")
    if kpe_cache is not None:
        _dims("kpe_cache", kpe_cache, "num_pages, page_size, rope_dim")
        _dtype("kpe_cache", kpe_cache, ckv_cache.dtype)
        _agree("kpe_cache", "num_pages", kpe_cache.shape[0], num_pages, "ckv_cache")
        _agree("kpe_cache", "page_size", kpe_cache.shape[1], page_size, "ckv_cache")
        _agree("kpe_cache", "rope_dim (last dim)", kpe_cache.shape[2], rope_dim, "q_pe's last dim")
    _check_kv_scale(kv, kv_scale)
    for dim_name, dim in (("ckv_dim", ckv_dim), ("rope_dim", rope_dim)):
        if dim < 16 or dim % 16:
            raise ValueError(f"q_nope/q_pe: {dim_name} {dim} is not a positive multiple of 16")
    _dims("block_table", block_table, "batch, max_pages")
    _dtype("block_table", block_table, torch.int32)
    _agree("block_table", "batch (dim 0)", block_table.shape[0], batch, "q_nope")
    if block_table.shape[1] < 1:
        raise ValueError("block_table: expected at least one page column, got 0")
    if block_table.stride(1) != 1:
        raise ValueError(f"block_table: expected contiguous rows (stride 1 on dim 1), got "
                         f"{tuple(block_table.stride())}")
    _dims("cache_seqlens", cache_seqlens, "batch")
    _dtype("cache_seqlens", cache_seqlens, torch.int32)
    _agree("cache_seqlens", "batch", cache_seqlens.shape[0], batch, "q_nope")
    if cache_seqlens.stride(0) != 1:
        raise ValueError("cache_seqlens: expected a contiguous tensor")
    # fp8 caches too: their base pointers and page/token strides in bytes (fp8_ds_mla's rope, at byte 528 of
    # a token, follows from the cache's)
    for name, t, leading in (("q_nope", q_nope, 3), ("q_pe", q_pe, 3), ("ckv_cache", ckv_cache, 2),
                             ("kpe_cache", kpe_cache, 2)):
        if t is not None:
            _vector_rows(name, t, leading)
    check_sm_scale(sm_scale)
    if out is not None:
        out = _tensor("out", out)
        if tuple(out.shape) != (batch, s_q, heads, ckv_dim):
            raise ValueError(f"out: expected shape {(batch, s_q, heads, ckv_dim)}, got {tuple(out.shape)}")
        _dtype("out", out, dtype)
        _vector_rows("out", out, 3)
        _no_overlap("out", out)
    if lse is not None:
        lse = _tensor("lse", lse)
        if tuple(lse.shape) != (batch, s_q, heads):
            raise ValueError(f"lse: expected shape {(batch, s_q, heads)}, got {tuple(lse.shape)}")
        _dtype("lse", lse, torch.float32)
        if lse.stride(2) != 1:
            raise ValueError(f"lse: expected a contiguous last dim (heads), got strides {tuple(lse.stride())}")
        _no_overlap("lse", lse)
    return DecodeShape(batch, s_q, heads, ckv_dim, rope_dim, dtype, num_pages, page_size, block_table.shape[1], kv)


def _ds_mla_cache(cache: torch.Tensor, ckv_dim: int, rope_dim: int, dtype: torch.dtype) -> None:
    """An fp8_ds_mla cache (ckv_cache of uint8 or float8_e4m3fn with kpe_cache None) and the queries it takes."""
    _dims("ckv_cache", cache, f"num_pages, page_size, {DS_MLA_TOKEN_BYTES} bytes")
    if cache.shape[2] != DS_MLA_TOKEN_BYTES:
        if cache.dtype == FP8:  # most likely the ckv part of an fp8_e4m3 cache, its kpe_cache forgotten
            raise TypeError(f"kpe_cache: expected a float8_e4m3fn tensor with an fp8_e4m3 ckv_cache, got None "
                            f"(None reads ckv_cache as an fp8_ds_mla cache of {DS_MLA_TOKEN_BYTES}-byte tokens, "
                            f"but its last dim is {cache.shape[2]})")
        raise ValueError(f"ckv_cache: expected fp8_ds_mla's {DS_MLA_TOKEN_BYTES}-byte tokens (last dim "
                         f"{DS_MLA_TOKEN_BYTES}, with kpe_cache None), got last dim {cache.shape[2]}")
    _ds_mla_dims(("q_nope", "q_pe", "q_nope"), ckv_dim, rope_dim, dtype)


def _check_kv_scale(kv: DType, kv_scale: object) -> None:
    """kv_scale: the fp8_e4m3 cache's per-tensor scale, a float32 tensor of one element; None otherwise."""
    if kv is DType.FP8_E4M3:
        if not isinstance(kv_scale, torch.Tensor):
            raise TypeError(f"kv_scale: expected a float32 tensor of one element (the fp8_e4m3 cache's scale), "
                            f"got {type(kv_scale).__name__}")
        _dtype("kv_scale", kv_scale, torch.float32)
        if kv_scale.numel() != 1:
            raise ValueError(f"kv_scale: expected one element (one scale per tensor), got shape "
                             f"{tuple(kv_scale.shape)}")
    elif kv_scale is not None:
        why = "holds its scales in its tokens" if kv is DType.FP8_DS_MLA else "is not scaled"
        raise ValueError(f"kv_scale: expected None: only an fp8_e4m3 cache takes a per-tensor scale, and this "
                         f"{kv.cli_name} cache {why}")


def check_values(cache_seqlens: torch.Tensor, block_table: torch.Tensor, shape: DecodeShape,
                 q_nope: torch.Tensor | None = None, q_pe: torch.Tensor | None = None,
                 kv_scale: torch.Tensor | None = None) -> None:
    """Lengths in [s_q, max_pages*page_size], page ids in [0, num_pages), q finite (a NaN or inf
    would make its row's output meaningless) and kv_scale finite and > 0. Copies to the host."""
    for name, q in (("q_nope", q_nope), ("q_pe", q_pe)):
        if q is not None and q.device.type in ("cpu", "cuda") and not bool(torch.isfinite(q).all()):
            b, s, h = (int(i) for i in (~torch.isfinite(q)).nonzero()[0][:3])
            raise ValueError(f"{name}: a value is not finite (NaN or inf) at [{b}, {s}, {h}]")
    if kv_scale is not None and kv_scale.device.type in ("cpu", "cuda"):
        value = float(kv_scale.reshape(()))
        if not math.isfinite(value) or value <= 0.0:
            raise ValueError(f"kv_scale: expected a finite number > 0, got {value}")
    for name, t in (("cache_seqlens", cache_seqlens), ("block_table", block_table)):
        if t.device.type not in ("cpu", "cuda"):  # no values to read (a meta tensor)
            raise ValueError(f"{name}: expected a CUDA tensor, got device {t.device}")
    lengths = cache_seqlens.detach().cpu().tolist()
    capacity = shape.max_pages * shape.page_size
    for b, length in enumerate(lengths):
        if length < 0:
            raise ValueError(f"cache_seqlens: negative length {length} at index {b}")
        if length < shape.s_q:
            raise ValueError(f"cache_seqlens: length {length} at index {b} is shorter than s_q={shape.s_q} "
                             f"(the s_q new tokens are the last s_q of the cache)")
        if length > capacity:
            raise ValueError(f"cache_seqlens: length {length} at index {b} needs "
                             f"{-(-length // shape.page_size)} pages of {shape.page_size}, but block_table "
                             f"has {shape.max_pages} columns")
    table = block_table.detach().cpu()
    for b, length in enumerate(lengths):
        used = table[b, : -(-length // shape.page_size)]
        bad = ((used < 0) | (used >= shape.num_pages)).nonzero()
        if bad.numel():
            j = int(bad[0, 0])
            raise ValueError(f"block_table: page id {int(used[j])} at [{b}, {j}] is out of range for "
                             f"{shape.num_pages} pages")


# NOTE(device-type): where the kernels run. mla_gen.bench.host sets "cpu" while it times the host path
# on CPU tensors with a launcher that launches nothing; nothing else changes it.
DEVICE_TYPE = "cuda"


def check_devices(**tensors: torch.Tensor | None) -> torch.device:
    """Every tensor on the first one's CUDA device; returns that device."""
    items = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = items[0]
    if first.device.type != DEVICE_TYPE:
        raise ValueError(f"{first_name}: expected a CUDA tensor, got device {first.device}")
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name}: expected a tensor on {first.device} (where {first_name} is), got {t.device}")
    return first.device


def structure_key(q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens, out=None, lse=None,
                  kv_scale=None) -> tuple:
    """Everything check_structure and check_devices read of the tensors except the data pointers: each
    one's type, shape, strides, dtype and device (None for an absent kpe_cache, out, lse or kv_scale; a
    kv_scale's strides are not read). Tensors of equal keys pass or fail those checks alike but for the
    16-byte alignment of their data pointers, so a key that passed once lets a call skip them and check
    only the pointers. Raises (AttributeError, RuntimeError)
    for a non-tensor or a tensor without strides; the caller then runs the checks, which name it."""
    # NOTE(host-path): called on every call of a planned wrapper; one flat tuple, no loop (about 3 us).
    return (type(q_nope), q_nope.shape, q_nope.stride(), q_nope.dtype, q_nope.device,
            type(q_pe), q_pe.shape, q_pe.stride(), q_pe.dtype, q_pe.device,
            type(ckv_cache), ckv_cache.shape, ckv_cache.stride(), ckv_cache.dtype, ckv_cache.device,
            None if kpe_cache is None else (type(kpe_cache), kpe_cache.shape, kpe_cache.stride(), kpe_cache.dtype,
                                            kpe_cache.device),
            type(block_table), block_table.shape, block_table.stride(), block_table.dtype, block_table.device,
            type(cache_seqlens), cache_seqlens.shape, cache_seqlens.stride(), cache_seqlens.dtype,
            cache_seqlens.device,
            None if out is None else (type(out), out.shape, out.stride(), out.dtype, out.device),
            None if lse is None else (type(lse), lse.shape, lse.stride(), lse.dtype, lse.device),
            None if kv_scale is None else (type(kv_scale), kv_scale.shape, kv_scale.dtype, kv_scale.device))

