"""mla_decode and MLADecodeWrapper: absorbed MLA decode attention on generated kernels.

    out = mla_decode(q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens, sm_scale)
    out = mla_decode(q_nope, q_pe, ckv, kpe, block_table, cache_seqlens, sm_scale, kv_scale=scale)  # fp8_e4m3
    out = mla_decode(q_nope, q_pe, cache_656, None, block_table, cache_seqlens, sm_scale)       # fp8_ds_mla

For serving, plan once per batch shape and run per step; `run` never syncs with the host and
allocates nothing, so a CUDA graph can capture it, and the split-kv schedule is computed on the
GPU from the device-resident lengths, so a captured graph stays valid while lengths change.

The host path of a call (DESIGN.md section 7): inputs whose `validate.structure_key` (types, shapes,
strides, dtypes, devices) passed every check once find a `_Site` holding the checked shape and a
DecodeParams with every field set but the per-call data pointers (eight; nine with an fp8_e4m3 cache's
kv_scale); such a call checks only the pointers' alignment, reads the current stream, and makes one call
into the launcher (`launch`). Any other call runs every check, as the first one did.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any

import torch

from generator import env
from generator.select import Decision
from generator.spec import DType, VariantSpec
from mla_gen import validate
from mla_gen.dispatch import choose, occupancy
from mla_gen.fp8 import DS_MLA_ROPE_OFFSET
from mla_gen.loader import get_module
from mla_gen.schedule import PART_INTS, max_partials


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """What a plan fixes. `run` rejects inputs that disagree, naming the field."""
    device: torch.device
    batch: int
    s_q: int
    num_heads: int
    ckv_dim: int
    rope_dim: int
    dtype: torch.dtype
    page_size: int
    max_pages: int
    sm_scale: float
    return_lse: bool
    decision: Decision
    max_partials: int

    @property
    def spec(self) -> VariantSpec:
        return self.decision.spec

    @property
    def kv_dtype(self) -> DType:
        """The cache's format: the q dtype, DType.FP8_E4M3 or DType.FP8_DS_MLA."""
        return self.decision.spec.kv_dtype

    @property
    def rows(self) -> int:
        return self.s_q * self.num_heads


def _stream_reader():
    # NOTE(raw-stream): torch.cuda.current_stream(i).cuda_stream builds a Stream object per call (microseconds);
    # the private binding torch's own compiled code uses returns the same cudaStream_t as an int.
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw if raw is not None else (lambda index: torch.cuda.current_stream(index).cuda_stream)


def _device_reader():
    raw = getattr(torch._C, "_cuda_getDevice", None)
    return raw if raw is not None else torch.cuda.current_device


# The current stream of a device index, and the current device index: read on every call (the caller may
# switch either between calls). mla_gen.bench.host replaces them to run the host path without a GPU.
_current_stream = _stream_reader()
_current_device = _device_reader()


@dataclasses.dataclass(frozen=True)
class _Site:
    """One input structure a plan has checked: the shape, and the launch parameters with every field set
    but the per-call pointers. out_ptr/lse_ptr: the plan's own buffers, used when a call passes
    none (lse_ptr 0: no lse). pair: run returns (out, lse)."""
    shape: validate.DecodeShape
    params: Any
    out_ptr: int
    lse_ptr: int
    pair: bool


_MAX_SITES = 64


class MLADecodeWrapper:
    """Plan/run interface (FlashInfer style).

    plan(cache_seqlens, s_q, num_heads=..., ...) once per batch shape: picks the variant, builds or
    loads it, allocates the schedule and split workspace and the output buffers.
    run(q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens[, kv_scale=]) per step: up to two
    launches on the current stream (the decode kernel, whose CTAs plan their parts of the work list from the
    device lengths and which merges requests split over a few parts itself; the merge of requests split over
    many, skipped when the block table is too short for any request to need it:
    mla_gen.schedule.merge_may_have_work), each overlapping the one before on sm_90 (programmatic dependent
    launch), made by one call into the launcher; no host sync, no allocation. Without
    `out=`, the result is the plan's own output buffer, overwritten by the next run. Inputs of a
    structure (shapes, strides, dtypes, devices) seen before are checked only for pointer alignment.
    """

    def __init__(self, device: torch.device | str | int | None = None, *, family: str | None = None,
                 num_parts: int | None = None):
        """Raises ValueError naming `device`, `family` or `num_parts` for a bad one."""
        self._device = validate.check_device(device)
        self._family, self._num_parts = validate.check_overrides(family, num_parts)
        self._plan: DecodePlan | None = None
        self._sites: dict[tuple, _Site] | None = None  # None until planned
        self._work_list_planned = False

    @property
    def plan_info(self) -> DecodePlan | None:
        return self._plan

    def plan(self, cache_seqlens: torch.Tensor, s_q: int = 1, *, num_heads: int, ckv_dim: int = 512,
             rope_dim: int = 64, page_size: int, max_pages: int, sm_scale: float,
             dtype: torch.dtype = torch.bfloat16, return_lse: bool = False,
             kv_dtype: str | torch.dtype | None = None) -> DecodePlan:
        """Fixes batch size (cache_seqlens.shape[0]), s_q, heads, dims, dtype (q's and out's), the cache's
        format, page size and block-table width. kv_dtype: None (the cache holds `dtype`), "fp8_e4m3" (or
        torch.float8_e4m3fn: float8 ckv and kpe caches and a kv_scale per run) or "fp8_ds_mla" (one
        656-byte cache; ckv 512, rope 64, bf16 q). Reads no length values. Raises TypeError/ValueError for
        bad arguments (SpecError, a ValueError naming kv_dtype, where no kernel for this arch reads the
        format), and BuildError, ToolchainError or CacheError when the variant cannot be built."""
        device = self._device
        batch, sm_scale, kv = validate.check_plan(cache_seqlens, s_q, num_heads=num_heads, ckv_dim=ckv_dim,
                                                  rope_dim=rope_dim, page_size=page_size, max_pages=max_pages,
                                                  sm_scale=sm_scale, dtype=dtype, device=device, kv_dtype=kv_dtype)
        # variant by the rules, then the grid by that variant's occupancy on this device
        shape = (device.index, num_heads, ckv_dim, rope_dim, dtype, s_q, self._family, self._num_parts)
        work = dict(kv_dtype=kv, batch=batch, page_size=page_size)
        module = get_module(choose(*shape, **work).spec)
        decision = choose(*shape, ctas_per_sm=occupancy(module, device.index), **work)
        plan = DecodePlan(device, batch, s_q, num_heads, ckv_dim, rope_dim, dtype, page_size, max_pages, sm_scale,
                          return_lse, decision, max_partials(decision.num_parts))
        self._install(plan, module)
        return plan

    def _install(self, plan: DecodePlan, module: Any) -> None:
        """Allocates the plan's workspace and buffers on plan.device and forgets the checked structures.
        `module` is the opened variant (mla_gen.bench.host passes one that launches nothing)."""
        device, batch, rows = plan.device, plan.batch, plan.rows
        i32 = dict(dtype=torch.int32, device=device)
        self._module = module
        self._index = device.index
        self._part_info = torch.zeros(plan.decision.num_parts, plan.decision.m_blocks, PART_INTS, **i32)
        self._req_info = torch.zeros(batch, 4, **i32)
        self._status = torch.zeros(1, **i32)
        self._tickets = torch.zeros(batch, plan.decision.m_blocks, **i32)
        self._merge_list = torch.zeros(1 + batch, **i32)
        self._partial_o = torch.empty(plan.max_partials, rows, plan.ckv_dim, dtype=torch.float32, device=device)
        self._partial_lse = torch.empty(plan.max_partials, rows, dtype=torch.float32, device=device)
        self._out = torch.empty(batch, plan.s_q, plan.num_heads, plan.ckv_dim, dtype=plan.dtype, device=device)
        self._lse = (torch.empty(batch, plan.s_q, plan.num_heads, dtype=torch.float32, device=device)
                     if plan.return_lse else None)
        self._plan = plan
        self._sites = {}
        self._work_list_planned = False

    def _check_against_plan(self, shape: validate.DecodeShape) -> None:
        """ValueError naming the argument whose size or dtype differs from the plan's."""
        plan = self._plan
        for arg, field, got in (("q_nope", "batch", shape.batch), ("q_nope", "s_q", shape.s_q),
                                ("q_nope", "num_heads", shape.num_heads), ("q_nope", "ckv_dim", shape.ckv_dim),
                                ("q_pe", "rope_dim", shape.rope_dim), ("q_nope", "dtype", shape.dtype),
                                ("ckv_cache", "kv_dtype", shape.kv_dtype), ("ckv_cache", "page_size", shape.page_size),
                                ("block_table", "max_pages", shape.max_pages)):
            want = getattr(plan, field)
            if got != want:
                if field == "kv_dtype":
                    got, want = got.cli_name, want.cli_name
                raise ValueError(f"{arg}: {field} {got} differs from the plan's {want}; call plan() again")

    def run(self, q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor,
            kpe_cache: torch.Tensor | None, block_table: torch.Tensor, cache_seqlens: torch.Tensor, *,
            kv_scale: torch.Tensor | None = None, out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
            replan: bool = True) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """out [B, s_q, H, C] (and lse [B, s_q, H] fp32 when the plan asked for it or lse= is given).
        The caches as mla_decode takes them, in the plan's kv_dtype; an fp8_e4m3 cache's kv_scale is read
        by the kernel at each launch (its pointer is taken per call, so a graph replay sees its new value).

        replan=False: each decode CTA reuses the part of the work list it planned in the last run of this
        wrapper instead of planning from the lengths: for the other layers of a decoding step, whose lengths
        are the same (as engines reuse FlashMLA's metadata). With lengths that changed since, the results are
        wrong."""
        sites = self._sites
        if sites is None:
            raise RuntimeError("MLADecodeWrapper.run: call plan() first")
        if replan is not True and replan is not False:
            raise TypeError(f"replan: expected a bool, got {type(replan).__name__}")
        if not replan and not self._work_list_planned:
            raise ValueError("replan: False needs a work list, but no run with replan=True followed plan()")
        try:
            key = validate.structure_key(q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens, out, lse,
                                         kv_scale)
            site = sites.get(key)
        except Exception:  # not a tensor (or one without strides): the checks name it, in their order
            key = site = None
        stream = _current_stream(self._index)
        args = None if site is None else self._pointers(site, stream, q_nope, q_pe, ckv_cache, kpe_cache,
                                                          block_table, cache_seqlens, out, lse, kv_scale)
        if args is None:
            site = self._checked_site(key, q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens, out, lse,
                                      kv_scale)
            args = self._pointers(site, stream, q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens,
                                  out, lse, kv_scale)
        self._launch(args, replan)
        if out is None:
            out = self._out
        if site.pair:
            return out, (self._lse if lse is None else lse)
        return out

    def _checked_site(self, key: tuple | None, q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens,
                      out, lse, kv_scale) -> _Site:
        """Every check of run(), then the inputs' site, kept under `key` (None: not kept)."""
        plan = self._plan
        shape = validate.check_structure(q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens,
                                         plan.sm_scale, out, lse, kv_scale)
        device = validate.check_devices(q_nope=q_nope, q_pe=q_pe, ckv_cache=ckv_cache, kpe_cache=kpe_cache,
                                        block_table=block_table, cache_seqlens=cache_seqlens, out=out, lse=lse,
                                        kv_scale=kv_scale)
        self._check_plan_device(shape, device)
        site = self._site(shape, q_nope, q_pe, ckv_cache, kpe_cache, block_table, out, lse, plan.sm_scale,
                          plan.return_lse or lse is not None)
        if key is not None:
            if len(self._sites) >= _MAX_SITES:
                self._sites.clear()
            self._sites[key] = site
        return site

    def _check_plan_device(self, shape: validate.DecodeShape, device: torch.device) -> None:
        """The plan's checks of inputs that passed check_structure and check_devices."""
        self._check_against_plan(shape)
        if device != self._plan.device:
            raise ValueError(f"q_nope: expected a tensor on {self._plan.device} (the plan's device), got {device}")

    def _pointers(self, site: _Site, stream: int, q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens,
                  out, lse, kv_scale=None) -> tuple | None:
        """The launcher's launch() arguments for a call of `site` (kv_scale's pointer last, where the site's
        cache takes one); None when a data pointer that check_structure requires 16-byte aligned is not
        (check_structure then names it). kpe_cache None: an fp8_ds_mla cache, its rope inside each token."""
        qn, qp, ckv = q_nope.data_ptr(), q_pe.data_ptr(), ckv_cache.data_ptr()
        kpe = ckv + DS_MLA_ROPE_OFFSET if kpe_cache is None else kpe_cache.data_ptr()
        o = site.out_ptr if out is None else out.data_ptr()
        if (qn | qp | ckv | kpe | o) & 15:
            return None
        l = site.lse_ptr if lse is None else lse.data_ptr()
        if kv_scale is None:
            return site.params, stream, qn, qp, ckv, kpe, block_table.data_ptr(), cache_seqlens.data_ptr(), o, l
        return (site.params, stream, qn, qp, ckv, kpe, block_table.data_ptr(), cache_seqlens.data_ptr(), o, l,
                kv_scale.data_ptr())

    def _launch(self, args: tuple, replan: bool = True) -> None:
        """Decode (planning the work list unless the last one is reused) and merge: launches on the stream in
        `args` only, made by one call into the launcher (its launch() takes the pointers with or without a
        kv_scale)."""
        if _current_device() == self._index:
            self._module.launch(*args, replan)
        else:
            with torch.cuda.device(self._index):
                self._module.launch(*args, replan)
        self._work_list_planned = True

    def _site(self, shape: validate.DecodeShape, q_nope, q_pe, ckv_cache, kpe_cache, block_table, out, lse,
              sm_scale: float, pair: bool) -> _Site:
        """The launch parameters of checked inputs, pointers left 0 (run() passes them per call); out/lse
        None: the plan's buffers."""
        plan = self._plan
        own_out = self._out if out is None else None
        own_lse = self._lse if lse is None else None
        out = self._out if out is None else out
        lse = self._lse if lse is None else lse
        p = self._module.DecodeParams()
        p.q_nope_stride_b, p.q_nope_stride_s, p.q_nope_stride_h = q_nope.stride()[:3]
        p.q_pe_stride_b, p.q_pe_stride_s, p.q_pe_stride_h = q_pe.stride()[:3]
        p.ckv_stride_page, p.ckv_stride_tok = ckv_cache.stride()[:2]  # fp8 caches: 1-byte elements, bytes
        if kpe_cache is None:  # fp8_ds_mla: the bf16 rope of each 656-byte token, strides in bf16 elements
            p.kpe_stride_page, p.kpe_stride_tok = ckv_cache.stride(0) // 2, ckv_cache.stride(1) // 2
        else:
            p.kpe_stride_page, p.kpe_stride_tok = kpe_cache.stride()[:2]
        p.block_table_stride = block_table.stride(0)
        p.out_stride_b, p.out_stride_s, p.out_stride_h = out.stride()[:3]
        if lse is not None:
            p.lse_stride_b, p.lse_stride_s = lse.stride()[:2]
        p.partial_o = self._partial_o.data_ptr()
        p.partial_lse = self._partial_lse.data_ptr()
        p.part_info = self._part_info.data_ptr()
        p.req_info = self._req_info.data_ptr()
        p.status = self._status.data_ptr()
        p.tickets = self._tickets.data_ptr()
        p.merge_list = self._merge_list.data_ptr()
        p.batch, p.s_q, p.page_size = shape.batch, shape.s_q, shape.page_size
        p.num_pages, p.max_pages = shape.num_pages, shape.max_pages
        d = plan.decision
        p.num_parts, p.max_partials = d.num_parts, plan.max_partials
        p.fixed_cost, p.min_part_cost = d.fixed_cost, d.min_part_cost
        p.row_blocks = d.m_blocks
        p.sm_scale = sm_scale
        return _Site(shape, p, 0 if own_out is None else own_out.data_ptr(),
                     0 if own_lse is None else own_lse.data_ptr(), pair)

    def schedule(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The device work list of the last planned run (mla_gen.schedule.Plan's rows): part_info
        [num_parts, PART_INTS] (the first row block's CTAs; the others plan the same), req_info [batch, 4]."""
        return self._part_info[:, 0], self._req_info

    def check_status(self) -> None:
        """Syncs; raises ValueError if a run since the last check met an invalid length (those requests'
        outputs were written as NaN), then clears the flag."""
        if self._plan is None:
            raise RuntimeError("MLADecodeWrapper.check_status: call plan() first")
        flag = int(self._status.item())
        self._status.zero_()
        if flag:
            raise ValueError("cache_seqlens: a length was shorter than s_q or longer than the block table's "
                             "pages; those requests' outputs are NaN")


# mla_decode's planned wrappers, least recently used first: one per (device, stream, shape, return_lse,
# family, num_parts), so calls on different streams never share a workspace.
_WRAPPERS: collections.OrderedDict[tuple, MLADecodeWrapper] = collections.OrderedDict()
_MAX_WRAPPERS = 32


@dataclasses.dataclass
class _Call:
    """mla_decode's checked arguments of one structure (their structure_key, sm_scale, return_lse and the
    overrides): the shape, the device, the sizes of the buffers a call allocates, and per stream the
    wrapper (with its key in _WRAPPERS) and the site."""
    shape: validate.DecodeShape
    device: torch.device
    out_size: tuple[int, ...]
    lse_size: tuple[int, ...] | None   # None: no lse to allocate (not asked for, or given)
    by_stream: dict[int, tuple[tuple, MLADecodeWrapper, _Site]]


_CALLS: dict[tuple, _Call] = {}
_MAX_CALLS = 256


def _wrapper_key(shape: validate.DecodeShape, device: torch.device, stream: int, return_lse: bool,
                 family: str | None, num_parts: int | None) -> tuple:
    return device.index, stream, dataclasses.astuple(shape), return_lse, family, num_parts


def _wrapper_for(shape: validate.DecodeShape, device: torch.device, stream: int, sm_scale: float,
                 return_lse: bool, family: str | None, num_parts: int | None) -> tuple[tuple, MLADecodeWrapper]:
    """(its key in _WRAPPERS, the planned wrapper) for a call; plans one on a miss, evicting the least
    recently used (and every cached call, which may hold it)."""
    key = _wrapper_key(shape, device, stream, return_lse, family, num_parts)
    wrapper = _WRAPPERS.get(key)
    if wrapper is None:
        wrapper = MLADecodeWrapper(device, family=family, num_parts=num_parts)
        seqlens_meta = torch.empty(shape.batch, dtype=torch.int32, device=device)
        wrapper.plan(seqlens_meta, shape.s_q, num_heads=shape.num_heads, ckv_dim=shape.ckv_dim,
                     rope_dim=shape.rope_dim, page_size=shape.page_size, max_pages=shape.max_pages,
                     sm_scale=sm_scale, dtype=shape.dtype, return_lse=return_lse,
                     kv_dtype=shape.kv_dtype if shape.kv_dtype.is_fp8 else None)
        _WRAPPERS[key] = wrapper
        if len(_WRAPPERS) > _MAX_WRAPPERS:
            _WRAPPERS.popitem(last=False)
            _CALLS.clear()
    else:
        _WRAPPERS.move_to_end(key)
    return key, wrapper


def _touch(wkey: tuple) -> bool:
    """Marks a wrapper most recently used; False when it is no longer in _WRAPPERS."""
    try:
        _WRAPPERS.move_to_end(wkey)
    except KeyError:
        return False
    return True


def mla_decode(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor | None,
               block_table: torch.Tensor, cache_seqlens: torch.Tensor, sm_scale: float, *,
               kv_scale: torch.Tensor | None = None, out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
               return_lse: bool = False, family: str | None = None, num_parts: int | None = None,
               check_values: bool | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Absorbed MLA decode attention over a paged latent cache.

    q_nope [B, s_q, H, C], q_pe [B, s_q, H, R] (bf16 or fp16); ckv_cache [num_pages, page_size, C],
    kpe_cache [num_pages, page_size, R] (q's dtype; any strides with a contiguous last dim, so
    views of one [num_pages, page_size, C+R] cache work). fp8 caches (mla_gen.fp8; the format is read
    from the tensors): fp8_e4m3, ckv_cache and kpe_cache in float8_e4m3fn (views of one cache or not)
    with kv_scale, a float32 tensor of one element on the device (value = e4m3 * scale); fp8_ds_mla,
    ckv_cache the [num_pages, page_size, 656] uint8 (or float8_e4m3fn) cache and kpe_cache None (C 512,
    R 64, bf16 q). Every cache 16-byte aligned, its page and token strides multiples of 16 bytes.
    block_table [B, max_pages] int32; cache_seqlens [B] int32 = tokens in the cache per request, the s_q
    new tokens being its last. Query token i sees cache positions < seqlen - s_q + i + 1. sm_scale from
    the model's original head dim (e.g. 1/sqrt(192) x YaRN mscale^2), never 1/sqrt(C+R).

    Returns out [B, s_q, H, C] in q's dtype, and lse [B, s_q, H] fp32 (natural log of the scaled
    scores' sum) when return_lse. check_values (default: MLA_GEN_DEBUG) checks lengths, page ids,
    that q is finite and kv_scale > 0 on the host first (a device sync). family/num_parts override
    dispatch. Raises TypeError or ValueError naming the argument; nothing is launched on bad input.

    Edge cases: B = 0 returns empty results and launches nothing; a request may be exactly its s_q new
    tokens (seqlen == s_q). q's values are not inspected without check_values: a NaN or inf in a
    query row makes that row's lse NaN or -inf (its out NaN or 0) and leaves every other row exact.
    """
    try:
        # type(sm_scale) and type(num_parts): True == 1 and np.float32(x) != x, but the checks tell them apart
        key = (validate.structure_key(q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens, out, lse,
                                      kv_scale),
               type(sm_scale), sm_scale, return_lse, family, type(num_parts), num_parts)
        call = _CALLS.get(key)
    except Exception:  # a non-tensor, a sparse one, an unhashable argument: the checks name it, in their order
        key = call = None
    if call is not None:
        stream = _current_stream(call.device.index)
        hit = call.by_stream.get(stream)
        if hit is not None:
            wkey, wrapper, site = hit
            o = torch.empty(call.out_size, dtype=call.shape.dtype, device=call.device) if out is None else out
            l = lse if call.lse_size is None else torch.empty(call.lse_size, dtype=torch.float32, device=call.device)
            args = wrapper._pointers(site, stream, q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens,
                                     o, l, kv_scale)
            # None: a misaligned pointer (the checks below name the tensor); a wrapper evicted from _WRAPPERS
            # has cleared _CALLS, but one dropped otherwise is planned again below
            if args is not None and _touch(wkey):
                # the order of the checks: structure (the key and the pointers), overrides (the key), values
                if env.debug() if check_values is None else check_values:
                    validate.check_values(cache_seqlens, block_table, call.shape, q_nope, q_pe, kv_scale)
                wrapper._launch(args)
                return (o, l) if return_lse else o
    return _mla_decode_checked(key, q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens, sm_scale,
                               out, lse, return_lse, family, num_parts, check_values, kv_scale)


def _mla_decode_checked(key: tuple | None, q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens,
                        sm_scale, out, lse, return_lse, family, num_parts, check_values, kv_scale):
    """mla_decode with every check, in order; keeps what passed under `key` (None: not kept)."""
    shape = validate.check_structure(q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens,
                                     sm_scale, out, lse, kv_scale)
    family, num_parts = validate.check_overrides(family, num_parts)
    if env.debug() if check_values is None else check_values:  # host reads: the kernels then see valid values
        validate.check_values(cache_seqlens, block_table, shape, q_nope, q_pe, kv_scale)
    device = validate.check_devices(q_nope=q_nope, q_pe=q_pe, ckv_cache=ckv_cache, kpe_cache=kpe_cache,
                                    block_table=block_table, cache_seqlens=cache_seqlens, out=out, lse=lse,
                                    kv_scale=kv_scale)
    if shape.batch == 0:  # nothing to decode: empty results, no launch (and nothing kept)
        out = q_nope.new_empty(0, shape.s_q, shape.num_heads, shape.ckv_dim) if out is None else out
        if not return_lse:
            return out
        return out, (q_nope.new_empty(0, shape.s_q, shape.num_heads, dtype=torch.float32) if lse is None else lse)
    sm_scale = float(sm_scale)
    stream = _current_stream(device.index)
    wkey, wrapper = _wrapper_for(shape, device, stream, sm_scale, bool(return_lse), family, num_parts)
    wrapper._check_plan_device(shape, device)
    out_size = (shape.batch, shape.s_q, shape.num_heads, shape.ckv_dim)
    lse_size = out_size[:3] if return_lse and lse is None else None
    if out is None:
        out = torch.empty(out_size, dtype=shape.dtype, device=device)
    if lse_size is not None:
        lse = torch.empty(lse_size, dtype=torch.float32, device=device)
    # a fresh out (or lse) has the same strides on every call of this key, so the site holds for them all
    site = wrapper._site(shape, q_nope, q_pe, ckv_cache, kpe_cache, block_table, out, lse, sm_scale, bool(return_lse))
    if key is not None:
        call = _CALLS.get(key)
        if call is None:
            if len(_CALLS) >= _MAX_CALLS:
                _CALLS.clear()
            call = _CALLS[key] = _Call(shape, device, out_size, lse_size, {})
        call.by_stream[stream] = (wkey, wrapper, site)
    wrapper._launch(wrapper._pointers(site, stream, q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens,
                                      out, lse, kv_scale))
    return (out, lse) if return_lse else out
