"""Cases of `python -m mla_gen.bench`: shapes, lengths, and the bytes and FLOPs each one must move and do.
Torch-free, so the arithmetic is testable anywhere.

Bytes (the fewest a kernel can move through device memory): each cache token's ckv and kpe read once
(sum(lengths) x (C + R) x itemsize; an fp8 cache: sum(lengths) x its bytes per token, mla_gen.cost.kv_token_bytes),
q read once (B x s_q x H x (C + R)), out written once (B x s_q x H x C); no lse (the bench does not ask for it)
and no split-kv partials (a kernel's own cost).
FLOPs: 2 x H x (C + R + C) per visible (query row, cache token) pair: QK^T over C + R, PV over C. With
s_q > 1 the new tokens are causal among themselves: query token i of a request of length L sees
L - s_q + i + 1 tokens, so a request counts s_q x L - s_q (s_q - 1) / 2 pairs per head, exactly.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Any

from generator.errors import SpecError
from generator.presets import model_config
from generator.select import decide
from generator.spec import Arch, DType
from mla_gen.cost import kv_token_bytes, visible_pairs

DTYPES = tuple(d.value for d in DType if not d.is_fp8)   # q, out and the case's own cache
DEFAULT_SM_SCALE = 192 ** -0.5   # DeepSeek: 1 / sqrt(qk_nope 128 + qk_rope 64)
SUITE_PAGE_SIZE = 64


@dataclasses.dataclass(frozen=True)
class Case:
    """One workload. Lengths are equal (`seqlen`) or uniform in `seqlens_random` = (lo, hi), drawn with
    `seed`; each length counts the s_q new tokens. Raises ValueError naming the field."""
    name: str
    batch: int
    heads: int
    ckv: int = 512
    rope: int = 64
    s_q: int = 1
    seqlen: int | None = 4096
    seqlens_random: tuple[int, int] | None = None
    page_size: int = SUITE_PAGE_SIZE
    dtype: str = "bf16"
    sm_scale: float = DEFAULT_SM_SCALE
    seed: int = 0
    twin_of: str | None = None     # the ragged case whose total tokens this equal-length case repeats
    page_of: str | None = None     # the case this one repeats at another page size (keeps its page_size in a suite)
    model: str | None = None       # the preset it comes from

    def __post_init__(self) -> None:
        for field in ("batch", "heads", "ckv", "rope", "s_q", "page_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field}: expected a positive integer, got {value!r}")
        if (self.seqlen is None) == (self.seqlens_random is None):
            raise ValueError("seqlen: give exactly one of seqlen and seqlens_random")
        low = self.seqlen if self.seqlen is not None else self.seqlens_random[0]
        if self.seqlens_random is not None and not 1 <= self.seqlens_random[0] <= self.seqlens_random[1]:
            raise ValueError(f"seqlens_random: expected lo,hi with 1 <= lo <= hi, got {self.seqlens_random}")
        if low < self.s_q:
            field = "seqlen" if self.seqlen is not None else "seqlens_random"
            raise ValueError(f"{field}: every length counts the s_q={self.s_q} new tokens, so it must be "
                             f">= {self.s_q}, got {low}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not self.sm_scale > 0:
            raise ValueError(f"sm_scale: expected a positive number, got {self.sm_scale!r}")

    def lengths(self) -> list[int]:
        if self.seqlens_random is None:
            return [self.seqlen] * self.batch
        lo, hi = self.seqlens_random
        rng = random.Random(self.seed)
        return [rng.randint(lo, hi) for _ in range(self.batch)]

    @property
    def shape(self) -> str:
        """E.g. 'B64 U[1,8192] H128 s_q 2 c256/r32 p16 fp16' (defaults left out)."""
        if self.seqlens_random is None:
            seq = f"S{self.seqlen}"
        else:
            seq = f"U[{self.seqlens_random[0]},{self.seqlens_random[1]}]"
        parts = [f"B{self.batch}", seq, f"H{self.heads}"]
        if self.s_q != 1:
            parts.append(f"s_q {self.s_q}")
        if (self.ckv, self.rope) != (512, 64):
            parts.append(f"c{self.ckv}/r{self.rope}")
        if self.page_size != SUITE_PAGE_SIZE:
            parts.append(f"p{self.page_size}")
        if self.dtype != "bf16":
            parts.append(self.dtype)
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["seqlens_random"] = list(self.seqlens_random) if self.seqlens_random else None
        lengths = self.lengths()
        d.update(shape=self.shape, total_tokens=sum(lengths), min_len=min(lengths), max_len=max(lengths))
        return d


@dataclasses.dataclass(frozen=True)
class Work:
    """What a case must move and compute."""
    cache_bytes: int
    q_bytes: int
    out_bytes: int
    flops: int

    @property
    def bytes(self) -> int:
        return self.cache_bytes + self.q_bytes + self.out_bytes

    @property
    def intensity(self) -> float:
        """FLOP per byte."""
        return self.flops / self.bytes


def work(case: Case, kv_dtype: DType | None = None) -> Work:
    """What the case moves and computes, reading its cache as `kv_dtype` (default: the case's dtype).
    Raises SpecError for an fp8 format the case's dims cannot have."""
    lengths = case.lengths()
    item = DType.parse(case.dtype).itemsize
    pairs = sum(visible_pairs(case.s_q, n - case.s_q) for n in lengths)  # each length counts the s_q new tokens
    rows = case.batch * case.s_q * case.heads
    token_bytes = sum(kv_token_bytes(kv_dtype or case.dtype, case.ckv, case.rope))
    return Work(cache_bytes=sum(lengths) * token_bytes,
                q_bytes=rows * (case.ckv + case.rope) * item,
                out_bytes=rows * case.ckv * item,
                flops=2 * case.heads * (case.ckv + case.rope + case.ckv) * pairs)


def fp8_unsupported(case: Case, kv_dtype: DType) -> str | None:
    """Why no mla-gen kernel reads `case` from a `kv_dtype` cache (fp8_ds_mla: other dims, fp16 q), or None;
    asked of dispatch on sm_90a, where every fp8 family runs (another device's rows say so when they run)."""
    try:
        decide(arch=Arch.SM90A, num_heads=case.heads, ckv_dim=case.ckv, rope_dim=case.rope,
               dtype=DType.parse(case.dtype), s_q=case.s_q, kv_dtype=kv_dtype)
    except SpecError as e:
        return str(e)
    return None


def default_suite(seed: int = 0) -> list[Case]:
    """The suite of issue 6: four DeepSeek shapes, a single long request, a ragged batch and its
    equal-length twin (same total tokens: time(6) / time(6eq) judges the plan's balance), and
    MiniCPM3-4B (40 heads, 256/32); then DeepSeek-V3's tensor-parallel head counts, MTP query lengths,
    a batch of 256, few long requests, and cases 1 and 2 at pages 16 and 1 (issue 11: within 1.05x of page 64)."""
    minicpm3 = model_config("minicpm3-4b")
    ragged = Case("6", 64, 128, seqlen=None, seqlens_random=(1, 8192), seed=seed)
    lengths = ragged.lengths()
    return [
        Case("1", 128, 16, seqlen=4096, seed=seed),
        Case("2", 128, 128, seqlen=4096, seed=seed),
        Case("3", 64, 128, s_q=2, seqlen=8192, seed=seed),
        Case("4", 32, 16, seqlen=1024, seed=seed),
        Case("5", 1, 128, seqlen=32768, seed=seed),
        ragged,
        Case("6eq", 64, 128, seqlen=round(sum(lengths) / len(lengths)), seed=seed, twin_of="6"),
        Case("minicpm3", 128, minicpm3.num_heads, ckv=minicpm3.kv_lora_rank, rope=minicpm3.qk_rope_head_dim,
             seqlen=4096, sm_scale=minicpm3.sm_scale, seed=seed, model=minicpm3.name),
        # DeepSeek-V3 tensor-parallel head splits, MTP / speculative query lengths, a wide batch (issue 11)
        Case("tp32", 128, 32, seqlen=4096, seed=seed),
        Case("tp40", 128, 40, seqlen=4096, seed=seed),
        Case("tp64", 128, 64, seqlen=4096, seed=seed),
        Case("mtp2", 128, 16, s_q=2, seqlen=4096, seed=seed),
        Case("mtp5", 128, 16, s_q=5, seqlen=4096, seed=seed),
        Case("tp64mtp2", 128, 64, s_q=2, seqlen=4096, seed=seed),
        Case("b256", 256, 16, seqlen=2048, seed=seed),
        # few long requests (issue 12)
        Case("b8long", 8, 16, seqlen=16384, seed=seed),
        Case("b4long", 4, 128, seqlen=65536, seed=seed),
        # small pages against the suite's 64 (issue 11)
        *(Case(f"{base.name}p{page}", base.batch, base.heads, seqlen=base.seqlen, page_size=page, seed=seed,
               page_of=base.name) for base in (Case("1", 128, 16), Case("2", 128, 128)) for page in (16, 1)),
    ]


def subsample(lengths: list[int], count: int, seed: int) -> list[int]:
    """Request indices to check against the float64 reference: the shortest, the longest, then random
    others up to `count` (>= 2) in all, sorted."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    picked = {order[0], order[-1]}
    others = [i for i in range(len(lengths)) if i not in picked]
    random.Random(seed).shuffle(others)
    picked.update(others[:max(0, count - len(picked))])
    return sorted(picked)
