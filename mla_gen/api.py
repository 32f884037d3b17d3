"""mla_decode and MLADecodeWrapper: absorbed MLA decode attention on generated kernels.

    out = mla_decode(q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens, sm_scale)

For serving, plan once per batch shape and run per step; `run` never syncs with the host and
allocates nothing, so a CUDA graph can capture it, and the split-kv schedule is computed on the
GPU from the device-resident lengths, so a captured graph stays valid while lengths change.
"""
from __future__ import annotations

import collections
import dataclasses

import torch

from generator import env
from generator.select import Decision
from generator.spec import VariantSpec
from mla_gen import validate
from mla_gen.dispatch import choose, occupancy
from mla_gen.loader import get_module
from mla_gen.schedule import max_partials


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
    def rows(self) -> int:
        return self.s_q * self.num_heads


class MLADecodeWrapper:
    """Plan/run interface (FlashInfer style).

    plan(cache_seqlens, s_q, num_heads=..., ...) once per batch shape: picks the variant, builds or
    loads it, allocates the schedule and split workspace and the output buffers.
    run(q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens) per step: three launches on the
    current stream (the device planner; the decode kernel, which merges requests split over a few parts
    itself; the merge of requests split over many), each overlapping the one before on sm_90 (programmatic
    dependent launch); no host sync, no allocation. Without
    `out=`, the result is the plan's own output buffer, overwritten by the next run.
    """

    def __init__(self, device: torch.device | str | int | None = None, *, family: str | None = None,
                 num_parts: int | None = None):
        """Raises ValueError naming `device`, `family` or `num_parts` for a bad one."""
        self._device = validate.check_device(device)
        self._family, self._num_parts = validate.check_overrides(family, num_parts)
        self._plan: DecodePlan | None = None
        self._work_list_planned = False

    @property
    def plan_info(self) -> DecodePlan | None:
        return self._plan

    def plan(self, cache_seqlens: torch.Tensor, s_q: int = 1, *, num_heads: int, ckv_dim: int = 512,
             rope_dim: int = 64, page_size: int, max_pages: int, sm_scale: float,
             dtype: torch.dtype = torch.bfloat16, return_lse: bool = False) -> DecodePlan:
        """Fixes batch size (cache_seqlens.shape[0]), s_q, heads, dims, dtype, page size and block-table
        width. Reads no length values. Raises TypeError/ValueError for bad arguments and BuildError,
        ToolchainError or CacheError when the variant cannot be built."""
        device = self._device
        batch, sm_scale = validate.check_plan(cache_seqlens, s_q, num_heads=num_heads, ckv_dim=ckv_dim,
                                              rope_dim=rope_dim, page_size=page_size, max_pages=max_pages,
                                              sm_scale=sm_scale, dtype=dtype, device=device)
        # variant by the rules, then the grid by that variant's occupancy on this device
        shape = (device.index, num_heads, ckv_dim, rope_dim, dtype, s_q, self._family, self._num_parts)
        self._module = get_module(choose(*shape).spec)
        decision = choose(*shape, ctas_per_sm=occupancy(self._module, device.index))
        parts = decision.num_parts
        slots = max_partials(parts)
        rows = s_q * num_heads
        i32 = dict(dtype=torch.int32, device=device)
        self._part_info = torch.zeros(parts, 4, **i32)
        self._req_info = torch.zeros(batch, 4, **i32)
        self._status = torch.zeros(1, **i32)
        self._tickets = torch.zeros(batch, decision.m_blocks, **i32)
        self._merge_list = torch.zeros(1 + batch, **i32)
        self._partial_o = torch.empty(slots, rows, ckv_dim, dtype=torch.float32, device=device)
        self._partial_lse = torch.empty(slots, rows, dtype=torch.float32, device=device)
        self._out = torch.empty(batch, s_q, num_heads, ckv_dim, dtype=dtype, device=device)
        self._lse = torch.empty(batch, s_q, num_heads, dtype=torch.float32, device=device) if return_lse else None
        self._plan = DecodePlan(device, batch, s_q, num_heads, ckv_dim, rope_dim, dtype, page_size, max_pages,
                                sm_scale, return_lse, decision, slots)
        self._work_list_planned = False
        return self._plan

    def _check_against_plan(self, shape: validate.DecodeShape) -> None:
        """ValueError naming the argument whose size or dtype differs from the plan's."""
        plan = self._plan
        for arg, field, got in (("q_nope", "batch", shape.batch), ("q_nope", "s_q", shape.s_q),
                                ("q_nope", "num_heads", shape.num_heads), ("q_nope", "ckv_dim", shape.ckv_dim),
                                ("q_pe", "rope_dim", shape.rope_dim), ("q_nope", "dtype", shape.dtype),
                                ("ckv_cache", "page_size", shape.page_size),
                                ("block_table", "max_pages", shape.max_pages)):
            want = getattr(plan, field)
            if got != want:
                raise ValueError(f"{arg}: {field} {got} differs from the plan's {want}; call plan() again")

    def run(self, q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor,
            block_table: torch.Tensor, cache_seqlens: torch.Tensor, *, out: torch.Tensor | None = None,
            lse: torch.Tensor | None = None, replan: bool = True) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """out [B, s_q, H, C] (and lse [B, s_q, H] fp32 when the plan asked for it or lse= is given).

        replan=False skips the device planner and reuses the work list the last run of this wrapper
        computed: for the other layers of a decoding step, whose lengths are the same (as engines reuse
        FlashMLA's metadata). With lengths that changed since, the results are wrong."""
        if self._plan is None:
            raise RuntimeError("MLADecodeWrapper.run: call plan() first")
        if not isinstance(replan, bool):
            raise TypeError(f"replan: expected a bool, got {type(replan).__name__}")
        if not replan and not self._work_list_planned:
            raise ValueError("replan: False needs a work list, but no run with replan=True followed plan()")
        shape = validate.check_structure(q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens,
                                         self._plan.sm_scale, out, lse)
        device = validate.check_devices(q_nope=q_nope, q_pe=q_pe, ckv_cache=ckv_cache, kpe_cache=kpe_cache,
                                        block_table=block_table, cache_seqlens=cache_seqlens, out=out, lse=lse)
        return self._run_checked(shape, device, q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens,
                                 out, lse, replan)

    def _run_checked(self, shape: validate.DecodeShape, device: torch.device, q_nope, q_pe, ckv_cache, kpe_cache,
                     block_table, cache_seqlens, out, lse, replan: bool = True):
        """run() after check_structure and check_devices, which mla_decode has already done for the call."""
        plan = self._plan
        self._check_against_plan(shape)
        if device != plan.device:
            raise ValueError(f"q_nope: expected a tensor on {plan.device} (the plan's device), got {device}")
        out = self._out if out is None else out
        if lse is None and plan.return_lse:
            lse = self._lse
        p = self._params(q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens, out, lse, shape)
        stream = torch.cuda.current_stream(plan.device).cuda_stream
        if torch.cuda.current_device() == plan.device.index:
            self._launch(p, stream, replan)
        else:
            with torch.cuda.device(plan.device):
                self._launch(p, stream, replan)
        self._work_list_planned = True
        return (out, lse) if (plan.return_lse or lse is not None) else out

    def _launch(self, p, stream: int, replan: bool) -> None:
        """Device planner (unless the last work list is reused), decode, merge: launches on `stream` only."""
        mod = self._module
        if replan:
            mod.plan(p, stream)
        mod.decode(p, stream)
        mod.merge(p, stream)

    def _params(self, q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens, out, lse, shape):
        plan = self._plan
        p = self._module.DecodeParams()
        p.q_nope = q_nope.data_ptr()
        p.q_nope_stride_b, p.q_nope_stride_s, p.q_nope_stride_h = q_nope.stride()[:3]
        p.q_pe = q_pe.data_ptr()
        p.q_pe_stride_b, p.q_pe_stride_s, p.q_pe_stride_h = q_pe.stride()[:3]
        p.ckv = ckv_cache.data_ptr()
        p.ckv_stride_page, p.ckv_stride_tok = ckv_cache.stride()[:2]
        p.kpe = kpe_cache.data_ptr()
        p.kpe_stride_page, p.kpe_stride_tok = kpe_cache.stride()[:2]
        p.block_table = block_table.data_ptr()
        p.block_table_stride = block_table.stride(0)
        p.seqlens = cache_seqlens.data_ptr()
        p.out = out.data_ptr()
        p.out_stride_b, p.out_stride_s, p.out_stride_h = out.stride()[:3]
        if lse is not None:
            p.lse = lse.data_ptr()
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
        p.sm_scale = plan.sm_scale
        return p

    def schedule(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The device work list of the last run: part_info [num_parts, 4], req_info [batch, 4]."""
        return self._part_info, self._req_info

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


_WRAPPERS: collections.OrderedDict[tuple, MLADecodeWrapper] = collections.OrderedDict()
_MAX_WRAPPERS = 32


def _wrapper_for(shape: validate.DecodeShape, device: torch.device, sm_scale: float, return_lse: bool,
                 family: str | None, num_parts: int | None) -> MLADecodeWrapper:
    stream = torch.cuda.current_stream(device).cuda_stream
    key = (device.index, stream, dataclasses.astuple(shape), return_lse, family, num_parts)
    wrapper = _WRAPPERS.get(key)
    if wrapper is None:
        wrapper = MLADecodeWrapper(device, family=family, num_parts=num_parts)
        seqlens_meta = torch.empty(shape.batch, dtype=torch.int32, device=device)
        wrapper.plan(seqlens_meta, shape.s_q, num_heads=shape.num_heads, ckv_dim=shape.ckv_dim,
                     rope_dim=shape.rope_dim, page_size=shape.page_size, max_pages=shape.max_pages,
                     sm_scale=sm_scale, dtype=shape.dtype, return_lse=return_lse)
        _WRAPPERS[key] = wrapper
        if len(_WRAPPERS) > _MAX_WRAPPERS:
            _WRAPPERS.popitem(last=False)
    else:
        _WRAPPERS.move_to_end(key)
        if wrapper._plan.sm_scale != sm_scale:
            wrapper._plan = dataclasses.replace(wrapper._plan, sm_scale=sm_scale)
    return wrapper


def mla_decode(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor,
               block_table: torch.Tensor, cache_seqlens: torch.Tensor, sm_scale: float, *,
               out: torch.Tensor | None = None, lse: torch.Tensor | None = None, return_lse: bool = False,
               family: str | None = None, num_parts: int | None = None,
               check_values: bool | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Absorbed MLA decode attention over a paged latent cache.

    q_nope [B, s_q, H, C], q_pe [B, s_q, H, R] (bf16 or fp16); ckv_cache [num_pages, page_size, C],
    kpe_cache [num_pages, page_size, R] (q's dtype; any strides with a contiguous last dim, so
    views of one [num_pages, page_size, C+R] cache work); block_table [B, max_pages] int32;
    cache_seqlens [B] int32 = tokens in the cache per request, the s_q new tokens being its last.
    Query token i sees cache positions < seqlen - s_q + i + 1. sm_scale from the model's original
    head dim (e.g. 1/sqrt(192) x YaRN mscale^2), never 1/sqrt(C+R).

    Returns out [B, s_q, H, C] in q's dtype, and lse [B, s_q, H] fp32 (natural log of the scaled
    scores' sum) when return_lse. check_values (default: MLA_GEN_DEBUG) checks lengths, page ids
    and that q is finite on the host first (a device sync). family/num_parts override dispatch. Raises
    TypeError or ValueError naming the argument; nothing is launched on bad input.

    Edge cases: B = 0 returns empty results and launches nothing; a request may be exactly its s_q new
    tokens (seqlen == s_q). q's values are not inspected without check_values: a NaN or inf in a
    query row makes that row's lse NaN or -inf (its out NaN or 0) and leaves every other row exact.
    """
    shape = validate.check_structure(q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens,
                                     sm_scale, out, lse)
    family, num_parts = validate.check_overrides(family, num_parts)
    if env.debug() if check_values is None else check_values:  # host reads: the kernels then see valid values
        validate.check_values(cache_seqlens, block_table, shape, q_nope, q_pe)
    device = validate.check_devices(q_nope=q_nope, q_pe=q_pe, ckv_cache=ckv_cache, kpe_cache=kpe_cache,
                                    block_table=block_table, cache_seqlens=cache_seqlens, out=out, lse=lse)
    if shape.batch == 0:  # nothing to decode: empty results, no launch
        out = q_nope.new_empty(0, shape.s_q, shape.num_heads, shape.ckv_dim) if out is None else out
        if not return_lse:
            return out
        return out, (q_nope.new_empty(0, shape.s_q, shape.num_heads, dtype=torch.float32) if lse is None else lse)
    wrapper = _wrapper_for(shape, device, float(sm_scale), return_lse, family, num_parts)
    if out is None:
        out = torch.empty(shape.batch, shape.s_q, shape.num_heads, shape.ckv_dim, dtype=shape.dtype, device=device)
    if return_lse and lse is None:
        lse = torch.empty(shape.batch, shape.s_q, shape.num_heads, dtype=torch.float32, device=device)
    result = wrapper._run_checked(shape, device, q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens,
                                  out, lse)
    if return_lse:
        return result
    return result[0] if isinstance(result, tuple) else result
