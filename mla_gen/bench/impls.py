"""The implementations `python -m mla_gen.bench` times, each prepared once per case (plan, metadata,
index tensors: not timed) into a zero-argument call returning out [B, s_q, H, C]; the output checks.

- mla-gen, one per family: MLADecodeWrapper.plan once, the device work list computed once (as engines do
  once per decoding step for all layers, and as FlashMLA's metadata is for its timed call), run(replan=False)
  timed; and "<family>+plan", the dispatched family planning the work list in every timed call.
  With --kv-dtype fp8_*: "<family>[<format>]", the families with an fp8 path on the cache quantized once per
  case (QuantizedCache), checked against the float64 reference on its dequantization.
- torch: gather the tokens + bmm + fp32 softmax + bmm, bf16/fp16 operands.
- peers (peers.py in --peers-dir, default .peers in the repo root): FlashMLA, vLLM's and SGLang's
  Triton decode, through peers.prepare. A peer that does not load is absent; one that cannot take a case is n/a.
All read the same combined cache [num_pages, page_size, C + R] (mla-gen through views of it); the torch
baseline and the peers (no dense fp8 path) read it in 16 bits with --kv-dtype too.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

from generator.spec import DType, Family
from mla_gen.api import MLADecodeWrapper
from mla_gen.bench.cases import Case
from mla_gen.bench.report import Check
from mla_gen.dtypes import torch_dtype
from mla_gen.fp8 import E4M3_MAX, dequantize_ds_mla, dequantize_per_tensor, quantize_ds_mla, quantize_per_tensor
from mla_gen.reference import mla_decode_reference
from mla_gen.testing import REF_TOL, DecodeInputs, make_inputs, max_abs, rel_l2

PEER_NAMES = ("flashmla", "vllm_triton", "sglang_triton")   # the names peers.py prepares
# (rel L2, max abs / max |ref|) against mla-gen's output: two low-precision results differ by up to
# both their errors against the float64 reference, so twice REF_TOL.
PEER_TOL = {dtype: (2 * l2, 2 * mx) for dtype, (l2, mx) in REF_TOL.items()}
# (rel L2, max abs / max |ref|) of an fp8 cache's output against the float64 reference on the dequantized
# cache: issue 13's rel L2 where q is not quantized, bf16's max abs.
FP8_TOL = (1e-2, REF_TOL["bf16"][1])
PEER_16BIT_NOTE = "on the 16-bit cache: no dense fp8 path"


class NotApplicable(Exception):
    """The implementation cannot take this case (reported as n/a with the reason)."""


@dataclasses.dataclass
class Prepared:
    run: Callable[[], torch.Tensor]          # the timed call
    check_run: Callable[[], torch.Tensor]    # one call whose output is checked (into a poisoned buffer where possible)
    note: str = ""


def build_inputs(case: Case, device: torch.device) -> DecodeInputs:
    """Random paged inputs with a combined cache, drawn on the GPU from the case's seed."""
    gen = torch.Generator(device=device).manual_seed(case.seed)
    return make_inputs(case.lengths(), heads=case.heads, ckv=case.ckv, rope=case.rope, s_q=case.s_q,
                       page_size=case.page_size, dtype=torch_dtype(case.dtype), device=device, combined=True,
                       generator=gen, sm_scale=case.sm_scale)


# -- checks ----------------------------------------------------------------------------------------

def compare(out: torch.Tensor, ref: torch.Tensor, against: str, tolerance: tuple[float, float]) -> Check:
    nan, ref_max = int(out.isnan().sum()), float(ref.double().abs().max())
    if nan:
        return Check(against, float("nan"), float("nan"), nan, ref_max, tolerance)
    return Check(against, max_abs(out, ref), rel_l2(out, ref), 0, ref_max, tolerance)


@dataclasses.dataclass
class Reference:
    """float64 outputs of a few requests (`rows`), to check mla-gen's output without a full-batch reference."""
    rows: list[int]
    out: torch.Tensor

    @classmethod
    def compute(cls, inp: DecodeInputs, rows: list[int],
                caches: tuple[torch.Tensor, torch.Tensor] | None = None) -> Reference:
        """caches: (ckv, kpe) to read instead of the inputs' (an fp8 cache's dequantization)."""
        ckv, kpe = caches or (inp.ckv_cache, inp.kpe_cache)
        idx = torch.tensor(rows, dtype=torch.long, device=inp.q_nope.device)
        out, _ = mla_decode_reference(inp.q_nope[idx], inp.q_pe[idx], ckv, kpe, inp.block_table[idx].contiguous(),
                                      inp.cache_seqlens[idx].contiguous(), inp.sm_scale)
        return cls(rows, out)

    def check(self, out: torch.Tensor, tolerance: tuple[float, float]) -> Check:
        """Every output element must be finite (an unwritten poisoned one is NaN); the subsample's must
        match the reference within `tolerance` (REF_TOL[dtype], FP8_TOL)."""
        nan = int(out.isnan().sum())
        sub = out[torch.tensor(self.rows, dtype=torch.long, device=out.device)]
        check = compare(sub, self.out, f"reference[{len(self.rows)} req]", tolerance)
        return dataclasses.replace(check, nan_count=nan) if nan else check


# -- fp8 caches ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class QuantizedCache:
    """The case's cache in an fp8 format (mla_gen.fp8): fp8_e4m3 [pages, page_size, C + R] float8_e4m3fn with
    its float32 [1] scale; fp8_ds_mla [pages, page_size, 656] uint8."""
    kv_dtype: DType
    cache: torch.Tensor
    scale: torch.Tensor | None
    ckv_dim: int

    def run_args(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(ckv_cache, kpe_cache, kv_scale) as MLADecodeWrapper.run takes them."""
        if self.kv_dtype is DType.FP8_DS_MLA:
            return self.cache, None, None
        return self.cache[..., :self.ckv_dim], self.cache[..., self.ckv_dim:], self.scale

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ckv, kpe) in float32: what a kernel reading this cache must compute with."""
        if self.kv_dtype is DType.FP8_DS_MLA:
            return dequantize_ds_mla(self.cache)
        return dequantize_per_tensor(self.cache, self.scale, self.ckv_dim)


def quantize(inp: DecodeInputs, kv_dtype: DType) -> QuantizedCache:
    """The inputs' cache in `kv_dtype`; the NaN in slots no request reads stay NaN."""
    if kv_dtype is DType.FP8_DS_MLA:
        return QuantizedCache(kv_dtype, quantize_ds_mla(inp.ckv_cache, inp.kpe_cache), None, inp.ckv_cache.shape[2])
    # NOTE(poison): amax over the whole cache is NaN (make_inputs poisons unused slots), so the scale that maps
    # the largest finite magnitude to e4m3's maximum is passed explicitly.
    scale = inp.kv.nan_to_num(0.0).abs().amax().float() / E4M3_MAX
    cache, scale = quantize_per_tensor(inp.ckv_cache, inp.kpe_cache, scale)
    return QuantizedCache(kv_dtype, cache, scale, inp.ckv_cache.shape[2])


def wrapper_cache_args(inp: DecodeInputs, fp8: QuantizedCache | None) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                             dict, dict]:
    """(ckv_cache, kpe_cache, plan()'s and run()'s extra keyword arguments) of an MLADecodeWrapper that reads the
    inputs' 16-bit cache (fp8 None: no kv arguments, the calls the bench made before fp8 caches) or `fp8`."""
    if fp8 is None:
        return inp.ckv_cache, inp.kpe_cache, {}, {}
    ckv, kpe, scale = fp8.run_args()
    return ckv, kpe, {"kv_dtype": fp8.kv_dtype.cli_name}, {"kv_scale": scale}


# -- mla-gen ---------------------------------------------------------------------------------------

def prepare_mlagen(family: Family, inp: DecodeInputs, case: Case, replan: bool = False,
                   fp8: QuantizedCache | None = None) -> Prepared:
    """fp8: read that cache instead of the inputs' 16-bit one."""
    ckv, kpe, kv_plan, kv_run = wrapper_cache_args(inp, fp8)
    wrapper = MLADecodeWrapper(inp.q_nope.device, family=family.value)
    plan = wrapper.plan(inp.cache_seqlens, case.s_q, num_heads=case.heads, ckv_dim=case.ckv, rope_dim=case.rope,
                        page_size=case.page_size, max_pages=inp.block_table.shape[1], sm_scale=case.sm_scale,
                        dtype=torch_dtype(case.dtype), **kv_plan)
    args = (inp.q_nope, inp.q_pe, ckv, kpe, inp.block_table, inp.cache_seqlens)

    def check_run() -> torch.Tensor:
        out = torch.full((case.batch, case.s_q, case.heads, case.ckv), float("nan"), dtype=inp.q_nope.dtype,
                         device=inp.q_nope.device)
        return wrapper.run(*args, out=out, **kv_run)

    d = plan.decision
    check_run()  # plans the work list on the GPU for these lengths (replan=False reuses it)
    return Prepared(lambda: wrapper.run(*args, replan=replan, **kv_run), check_run,
                    f"{plan.spec.variant_id} grid {d.m_blocks}x{d.num_parts}"
                    + (", planned per call" if replan else ""))


# -- torch -----------------------------------------------------------------------------------------

def prepare_torch(inp: DecodeInputs, case: Case) -> Prepared:
    """Gathers each request's tokens (padded to the longest with a valid token, masked out), then
    QK^T (bmm), fp32 scale + mask + softmax, PV (bmm). The index and mask tensors are built here."""
    batch, s_q, heads, ckv = case.batch, case.s_q, case.heads, case.ckv
    device, page = inp.q.device, case.page_size
    kv_flat = inp.kv.view(-1, case.ckv + case.rope)
    lengths = inp.cache_seqlens.long()
    longest = int(lengths.max())
    t = torch.arange(longest, device=device)
    pages = inp.block_table.long().gather(1, (t // page).expand(batch, -1))
    slots = pages * page + t % page
    slots = torch.where(t[None, :] < lengths[:, None], slots, slots[:, :1])   # padding reads token 0
    limit = lengths[:, None] - s_q + torch.arange(s_q, device=device)[None, :] + 1        # [B, s_q]
    bias = torch.zeros(batch, s_q, 1, longest, dtype=torch.float32, device=device)
    bias.masked_fill_(t[None, None, None, :] >= limit[:, :, None, None], float("-inf"))
    q = inp.q.reshape(batch, s_q * heads, -1)
    scale, dtype = case.sm_scale, q.dtype

    def run() -> torch.Tensor:
        kv = kv_flat[slots]                                          # [B, T, C+R]
        scores = torch.bmm(q, kv.transpose(1, 2)).float().view(batch, s_q, heads, longest)
        p = torch.softmax(scores * scale + bias, dim=-1).to(dtype).view(batch, s_q * heads, longest)
        return torch.bmm(p, kv[..., :ckv]).view(batch, s_q, heads, ckv)

    return Prepared(run, run, "gather + bmm + fp32 softmax + bmm")


# -- peers -----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Peers:
    """The peers module loaded from a folder, which peers load, and why the others do not."""
    module: ModuleType | None
    names: list[str]
    absent: dict[str, str]

    @classmethod
    def load(cls, folder: Path) -> Peers:
        path = folder / "peers.py"
        if not path.is_file():
            why = f"no peers.py in {folder} (--peers-dir names the folder holding the peers' peers.py)"
            return cls(None, [], {name: why for name in PEER_NAMES})
        try:
            spec = importlib.util.spec_from_file_location("peers", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            names, absent = module.available()
        except Exception as e:  # a broken peers folder is reported, never fatal
            why = f"{path} does not import: {type(e).__name__}: {e}"
            return cls(None, [], {name: why for name in PEER_NAMES})
        return cls(module, list(names), dict(absent))


def peer_support(name: str, case: Case) -> str | None:
    """Why peer `name` cannot take `case`, or None."""
    if name == "flashmla":
        if case.page_size != 64:
            return f"FlashMLA takes page size 64 only, not {case.page_size}"
        if (case.ckv, case.rope) != (512, 64):
            return f"FlashMLA takes ckv/rope 512/64 only, not {case.ckv}/{case.rope}"
    elif case.s_q > 1:
        return f"{name} runs s_q > 1 as independent rows, without the causal mask among the new tokens"
    return None


def prepare_peer(peers: Peers, name: str, inp: DecodeInputs, case: Case) -> Prepared:
    reason = peer_support(name, case)
    if reason:
        raise NotApplicable(reason)
    run = peers.module.prepare(name, inp.q, inp.kv, inp.block_table, inp.cache_seqlens, case.sm_scale, dv=case.ckv)
    return Prepared(run, run)
