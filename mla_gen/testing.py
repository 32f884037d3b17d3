"""Random paged decode inputs for tests and the benchmark: scattered pages, NaN in every cache slot
no request may read (unused pages and the tail of each request's last page), and unused
block-table slots pointing at a page full of NaN, so a stray read shows in the output; and the one
table of how close the kernels must come to the float64 reference."""
from __future__ import annotations

import dataclasses

import torch

from generator.spec import DType

# (relative L2, max abs / max |ref|) of out against the float64 reference, by kernel dtype. bf16
# inputs are exact in the reference; the error is fp32 accumulation, P rounding and out's rounding.
REF_TOL = {DType.BF16.value: (1e-2, 2e-2), DType.FP16.value: (2e-3, 4e-3)}
LSE_TOL = 2e-3  # max abs of lse (fp32 throughout, so independent of the dtype)
# ... where the kernel quantizes q (VariantSpec.quantizes_q: two e4m3 parts a value, about bf16's 8 significant bits
# against the reference's exact q; issue 13 allows quantized queries rel L2 2e-2): measured up to 3.0e-3
LSE_TOL_QUANTIZED_Q = 1e-2
# relative L2 of a whole bf16 MLA layer (mla_gen.layer) against the float64 vanilla layer: the bf16
# rounding of activations, cache and q_abs, plus the kernel's own error
LAYER_TOL = 2e-2


@dataclasses.dataclass
class DecodeInputs:
    q_nope: torch.Tensor
    q_pe: torch.Tensor
    ckv_cache: torch.Tensor
    kpe_cache: torch.Tensor
    block_table: torch.Tensor
    cache_seqlens: torch.Tensor
    sm_scale: float
    kv: torch.Tensor | None = None   # combined=True: the [num_pages, page_size, ckv+rope] cache
    q: torch.Tensor | None = None    # combined=True: the [batch, s_q, heads, ckv+rope] query (FlashMLA's layout)

    def args(self) -> tuple:
        return (self.q_nope, self.q_pe, self.ckv_cache, self.kpe_cache, self.block_table, self.cache_seqlens,
                self.sm_scale)


def block_table_pages(lengths: list[int], page_size: int) -> int:
    """The block-table width make_inputs gives `lengths`: the longest request's pages and one spare column
    (poisoned)."""
    return max(-(-n // page_size) for n in lengths) + 1


def make_inputs(lengths: list[int], *, heads: int, ckv: int = 512, rope: int = 64, s_q: int = 1,
                page_size: int = 64, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                combined: bool = False, extra_pages: int = 3, generator: torch.Generator | None = None,
                sm_scale: float = 192 ** -0.5) -> DecodeInputs:
    """combined=True stores the cache as one [num_pages, page_size, ckv+rope] tensor, passes views of it,
    and returns it as `kv` with the whole query as `q`.
    Random values are drawn on the generator's device (fast on a GPU), then moved to `device`."""
    g = generator
    gdev = g.device if g is not None else torch.device("cpu")
    batch = len(lengths)
    pages_per = [-(-n // page_size) for n in lengths]
    max_pages = block_table_pages(lengths, page_size)
    num_pages = sum(pages_per) + extra_pages + 1
    poison_page = num_pages - 1
    perm = torch.randperm(num_pages - 1, generator=g, device=gdev).tolist()
    block_table = torch.full((batch, max_pages), poison_page, dtype=torch.int32)
    used = torch.zeros(num_pages, page_size, dtype=torch.bool)
    cursor = 0
    for b, (n, npg) in enumerate(zip(lengths, pages_per)):
        ids = torch.tensor(perm[cursor:cursor + npg], dtype=torch.int64)
        cursor += npg
        block_table[b, :npg] = ids.to(torch.int32)
        t = torch.arange(n)
        used[ids[t // page_size], t % page_size] = True
    kv = torch.randn(num_pages, page_size, ckv + rope, generator=g, dtype=torch.float32, device=gdev)
    kv[~used.to(gdev)] = float("nan")
    kv = kv.to(dtype).to(device)
    if combined:
        ckv_cache, kpe_cache = kv[..., :ckv], kv[..., ckv:]
    else:
        ckv_cache, kpe_cache = kv[..., :ckv].contiguous(), kv[..., ckv:].contiguous()
    q = torch.randn(batch, s_q, heads, ckv + rope, generator=g, dtype=torch.float32, device=gdev).to(dtype).to(device)
    return DecodeInputs(q[..., :ckv].contiguous(), q[..., ckv:].contiguous(), ckv_cache, kpe_cache,
                        block_table.to(device), torch.tensor(lengths, dtype=torch.int32, device=device), sm_scale,
                        kv if combined else None, q if combined else None)


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def max_abs(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).abs().max())


def accuracy_problems(out: torch.Tensor, lse: torch.Tensor | None, ref: torch.Tensor, ref_lse: torch.Tensor | None,
                      dtype: str | DType, lse_tol: float = LSE_TOL) -> list[str]:
    """What is wrong with a kernel's out (and lse) against the float64 reference, by REF_TOL and
    lse_tol: NaN (an unwritten or poisoned element) first, then the errors. Empty when all is well."""
    tol_l2, tol_max = REF_TOL[DType.parse(dtype).value]
    problems = [f"{name}: {n} elements NaN (unwritten or poisoned)" for name, t in (("out", out), ("lse", lse))
                if t is not None and (n := int(t.isnan().sum()))]
    if problems:
        return problems
    l2, mx, ref_max = rel_l2(out, ref), max_abs(out, ref), float(ref.double().abs().max())
    if l2 > tol_l2:
        problems.append(f"out: rel L2 {l2:.2e} > {tol_l2:.0e}")
    if mx > tol_max * ref_max:
        problems.append(f"out: max abs {mx:.2e} > {tol_max:.0e} x max|ref| ({ref_max:.2e})")
    if lse is not None and ref_lse is not None and (err := max_abs(lse, ref_lse)) > lse_tol:
        problems.append(f"lse: max abs {err:.2e} > {lse_tol:.0e}")
    return problems


def outcome(fn) -> tuple[type, str] | None:
    """(the exception's type, its text) when fn() raises, else None: what tests compare between two paths
    that must fail alike (a cached call and a fresh one)."""
    try:
        fn()
    except Exception as e:
        return type(e), str(e)
    return None
