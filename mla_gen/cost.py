"""Cost model of MLA attention per layer and step: vanilla vs absorbed, FLOPs, bytes, roofline.

Both forms start from the same per-head query (q_nope, q_pe: the q projection's output) and the
same paged latent cache, and end with the same per-head output [H, v_head_dim] that o_proj reads.
The q projections, kv_a_proj_with_mqa and o_proj are identical in both forms and not counted.

    B batch, S query tokens per request (s_q), L0 cached tokens before the step, L = L0 + S,
    H heads (on this rank), C kv_lora_rank, R rope dim, D nope dim, V v_head_dim, e dtype bytes,
    kc, kr bytes of one cached token's latent and rope: e*C and e*R, or an fp8 cache's (kv_token_bytes),
    P = S*L - S*(S-1)/2  (query, key) pairs one head of one request sees (causal among the new)

absorbed (decode through one wide MQA head over the latent cache):
    q absorb     q_nope[h] @ W_UK[h]         2*B*S*H*D*C     e*(B*S*H*D + H*D*C + B*S*H*C)
    attention    QK over C+R, PV over C      2*B*P*H*(2C+R)  e*(B*S*H*(C+R) + B*S*H*C) + B*L*(kc+kr)
    out up-proj  o_lat[h] @ W_UV[h]^T        2*B*S*H*C*V     e*(B*S*H*C + H*C*V + B*S*H*V)
vanilla (up-project the cache into per-head K and V, then ordinary attention):
    kv up-proj   latent @ [W_UK; W_UV]^T     2*B*L*C*H*(D+V) e*(H*(D+V)*C + B*L*H*(D+V)) + B*L*kc
    attention    QK over D+R, PV over V      2*B*P*H*(D+R+V) e*(B*S*H*(D+R) + B*L*H*D + B*L*H*V + B*S*H*V) + B*L*kr

FLOPs are matmul FLOPs (2 per multiply-add; softmax not counted). Bytes: each part reads its
inputs and writes its outputs once (unfused kernels, weights read once per step for the whole
batch; the shared rope key once per token). Time per form = max(flops/rate, bytes/bandwidth).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Sequence

from generator.argtypes import OneLineParser, UsageError, nonneg_int, positive_float, positive_int
from generator.errors import SpecError
from generator.spec import DS_MLA_CKV, DS_MLA_ROPE, DS_MLA_TOKEN_BYTES, DType

H100_BF16_RATE = 795e12  # dense bf16 tensor-core FLOP/s (H100 SXM)
H100_BANDWIDTH = 3.02e12  # HBM3 bytes/s (H100 SXM)
FORMS = ("absorbed", "vanilla")
# activations, weights and a plain cache: the kernels' 16-bit dtypes, and fp32 and fp8 for other precisions
DTYPE_BYTES = {"fp32": 4, **{d.value: d.itemsize for d in DType if not d.is_fp8}, "fp8": 1}
KV_DTYPES = tuple(d.cli_name for d in DType if d.is_fp8)   # the cache formats kv_token_bytes prices


def kv_token_bytes(kv_dtype: DType | str, ckv: int, rope: int) -> tuple[int, int]:
    """(latent, rope) bytes of one cached token: 16-bit 2*C and 2*R; fp8_e4m3 C and R (its one fp32 scale
    per tensor, 4 bytes a cache, is left out); fp8_ds_mla 528 (512 e4m3 values and their 4 fp32 scales) and
    128 (64 bf16 rope values), the 656-byte token, which exists at 512/64 only. Raises SpecError (a
    ValueError) naming kv_dtype."""
    kv = DType.parse(kv_dtype, "kv_dtype")
    if kv is not DType.FP8_DS_MLA:
        return kv.itemsize * ckv, kv.itemsize * rope
    if (ckv, rope) != (DS_MLA_CKV, DS_MLA_ROPE):
        raise SpecError(f"kv_dtype: the {DS_MLA_TOKEN_BYTES}-byte fp8_ds_mla token holds ckv {DS_MLA_CKV} and rope "
                        f"{DS_MLA_ROPE}, got ckv {ckv}, rope {rope}")
    return DS_MLA_TOKEN_BYTES - 2 * DS_MLA_ROPE, 2 * DS_MLA_ROPE


@dataclasses.dataclass(frozen=True)
class AttnDims:
    """The sizes that price MLA attention: heads on this rank and the head dims."""
    heads: int
    kv_lora_rank: int
    rope: int
    nope: int
    v: int

    @classmethod
    def from_config(cls, cfg, *, heads: int | None = None, tp: int = 1) -> "AttnDims":
        """From a generator.presets.ModelConfig; heads default to num_heads / tp. A null
        v_head_dim (minicpm3-4b) reads as qk_nope_head_dim. Raises ValueError when tp does not
        divide the heads."""
        if heads is None:
            if tp < 1 or cfg.num_heads % tp:
                raise ValueError(f"tp: {cfg.name} has {cfg.num_heads} heads; tp {tp} does not divide them")
            heads = cfg.num_heads // tp
        return cls(heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim,
                   cfg.v_head_dim or cfg.qk_nope_head_dim)


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    flops: float
    bytes: float


@dataclasses.dataclass(frozen=True)
class FormCost:
    """FLOPs and bytes of one form for one layer and step, by part."""
    form: str
    parts: tuple[Part, ...]

    @property
    def flops(self) -> float:
        return sum(p.flops for p in self.parts)

    @property
    def bytes(self) -> float:
        return sum(p.bytes for p in self.parts)

    def time(self, rate: float = H100_BF16_RATE, bandwidth: float = H100_BANDWIDTH) -> float:
        """Roofline seconds: max(flops / rate, bytes / bandwidth)."""
        return max(self.flops / rate, self.bytes / bandwidth)


def _dims(dims) -> AttnDims:
    return dims if isinstance(dims, AttnDims) else AttnDims.from_config(dims)


def _check(batch: int, s_q: int, cache_len: int, dtype_bytes: float) -> None:
    for name, value, least in (("batch", batch, 1), ("s_q", s_q, 1), ("cache_len", cache_len, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name}: expected an integer >= {least}, got {value!r}")
    if not dtype_bytes > 0:
        raise ValueError(f"dtype_bytes: expected a number > 0, got {dtype_bytes!r}")


def _cache_bytes(d: AttnDims, e: float, kv_dtype: DType | str | None) -> tuple[float, float]:
    """(kc, kr): a cached token's latent and rope bytes; kv_dtype None: e per value, as everything else."""
    return (e * d.kv_lora_rank, e * d.rope) if kv_dtype is None else kv_token_bytes(kv_dtype, d.kv_lora_rank, d.rope)


def visible_pairs(s_q: int, cache_len: int) -> int:
    """(query, key) pairs of one head of one request: query i sees cache_len + i + 1 tokens."""
    return s_q * (cache_len + s_q) - s_q * (s_q - 1) // 2


def absorbed_cost(dims, batch: int, s_q: int, cache_len: int, dtype_bytes: float = 2,
                  kv_dtype: DType | str | None = None) -> FormCost:
    """Cost of the absorbed form (see the module docstring). dims: AttnDims or a ModelConfig
    (all its heads); kv_dtype: the cache's format (None: dtype_bytes per value). Raises ValueError for a
    non-positive batch or s_q, a negative cache_len, or a kv_dtype the dims cannot have."""
    d, e = _dims(dims), dtype_bytes
    _check(batch, s_q, cache_len, e)
    B, S, L, P = batch, s_q, cache_len + s_q, visible_pairs(s_q, cache_len)
    H, C, R, D, V = d.heads, d.kv_lora_rank, d.rope, d.nope, d.v
    kc, kr = _cache_bytes(d, e, kv_dtype)
    return FormCost("absorbed", (
        Part("q absorb (W_UK)", 2 * B * S * H * D * C, e * (B * S * H * D + H * D * C + B * S * H * C)),
        Part("latent attention", 2 * B * P * H * (2 * C + R),
             e * (B * S * H * (C + R) + B * S * H * C) + B * L * (kc + kr)),
        Part("out up-proj (W_UV)", 2 * B * S * H * C * V, e * (B * S * H * C + H * C * V + B * S * H * V)),
    ))


def vanilla_cost(dims, batch: int, s_q: int, cache_len: int, dtype_bytes: float = 2,
                 kv_dtype: DType | str | None = None) -> FormCost:
    """Cost of the vanilla form (see the module docstring). Raises as absorbed_cost."""
    d, e = _dims(dims), dtype_bytes
    _check(batch, s_q, cache_len, e)
    B, S, L, P = batch, s_q, cache_len + s_q, visible_pairs(s_q, cache_len)
    H, C, R, D, V = d.heads, d.kv_lora_rank, d.rope, d.nope, d.v
    kc, kr = _cache_bytes(d, e, kv_dtype)
    return FormCost("vanilla", (
        Part("kv up-proj (W_UK, W_UV)", 2 * B * L * C * H * (D + V),
             e * (H * (D + V) * C + B * L * H * (D + V)) + B * L * kc),
        Part("attention", 2 * B * P * H * (D + R + V),
             e * (B * S * H * (D + R) + B * L * H * D + B * L * H * V + B * S * H * V) + B * L * kr),
    ))


def form_costs(dims, batch: int, s_q: int, cache_len: int, dtype_bytes: float = 2,
               kv_dtype: DType | str | None = None) -> dict[str, FormCost]:
    return {"absorbed": absorbed_cost(dims, batch, s_q, cache_len, dtype_bytes, kv_dtype),
            "vanilla": vanilla_cost(dims, batch, s_q, cache_len, dtype_bytes, kv_dtype)}


def choose_form(dims, batch: int, s_q: int, cache_len: int, *, dtype_bytes: float = 2,
                kv_dtype: DType | str | None = None, rate: float = H100_BF16_RATE,
                bandwidth: float = H100_BANDWIDTH) -> str:
    """'vanilla' where its roofline time is strictly lower, else 'absorbed'."""
    c = form_costs(dims, batch, s_q, cache_len, dtype_bytes, kv_dtype)
    return "vanilla" if c["vanilla"].time(rate, bandwidth) < c["absorbed"].time(rate, bandwidth) else "absorbed"


def crossover(dims, batch: int, cache_len: int, *, dtype_bytes: float = 2, kv_dtype: DType | str | None = None,
              rate: float = H100_BF16_RATE, bandwidth: float = H100_BANDWIDTH, max_s_q: int = 1 << 20) -> int | None:
    """The least s_q at which vanilla is cheaper, or None if it is not by max_s_q. Doubling, then
    bisection: assumes one crossing (absorbed costs more per (query, key) pair, vanilla more per
    cached token, so once vanilla wins it keeps winning)."""
    def vanilla_wins(s: int) -> bool:
        return choose_form(dims, batch, s, cache_len, dtype_bytes=dtype_bytes, kv_dtype=kv_dtype, rate=rate,
                           bandwidth=bandwidth) == "vanilla"
    if vanilla_wins(1):
        return 1
    lo, hi = 1, 2  # absorbed wins at lo
    while not vanilla_wins(hi):
        if hi >= max_s_q:
            return None
        lo, hi = hi, min(2 * hi, max_s_q)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if vanilla_wins(mid) else (mid, hi)
    return hi


# ----------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m mla_gen.cost",
                description="FLOPs, bytes and roofline time of vanilla vs absorbed MLA attention per layer and "
                            "step, and the query count where vanilla becomes cheaper.")
    p.add_argument("--preset", required=True, help="model preset (generator/models.json), e.g. deepseek-v3")
    p.add_argument("--batch", type=positive_int, default=1, help="requests per step (default 1)")
    p.add_argument("--seqlen", type=nonneg_int, default=4096, help="cached tokens per request before the step")
    p.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel size (heads per rank = heads / tp)")
    p.add_argument("--rate", type=positive_float, default=H100_BF16_RATE, help="matmul FLOP/s (default H100 bf16)")
    p.add_argument("--bandwidth", type=positive_float, default=H100_BANDWIDTH, help="memory B/s (default H100)")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16", help="activation/cache/weight dtype")
    p.add_argument("--kv-dtype", choices=KV_DTYPES, default=None,
                   help="an fp8 latent cache (fp8_ds_mla: 512/64 models only); default: the cache in --dtype")
    p.add_argument("--max-s-q", type=positive_int, default=4096, help="largest query count in the table")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    return p


def _table(rows: list[list[str]], right: Sequence[bool]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)).rstrip()
                     for row in rows)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point. Returns 0, or 2 for bad input (one line on stderr naming the argument)."""
    from generator.presets import model_config

    prog = "python -m mla_gen.cost"
    try:
        args = _parser().parse_args(argv)
        try:
            cfg = model_config(args.preset)
        except SpecError as exc:
            raise UsageError(f"argument --preset: {str(exc).removeprefix('preset: ')}") from None
        if cfg.num_heads % args.tp:
            raise UsageError(f"argument --tp: {args.preset} has {cfg.num_heads} heads; {args.tp} does not divide them")
        dims = AttnDims.from_config(cfg, tp=args.tp)
        e = DTYPE_BYTES[args.dtype]
        try:
            token_bytes = sum(_cache_bytes(dims, e, args.kv_dtype))
        except SpecError as exc:
            raise UsageError(f"argument --kv-dtype: {args.preset}: {str(exc).removeprefix('kv_dtype: ')}") from None
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    counts = [1 << i for i in range(args.max_s_q.bit_length()) if 1 << i <= args.max_s_q]
    cross = crossover(dims, args.batch, args.seqlen, dtype_bytes=e, kv_dtype=args.kv_dtype, rate=args.rate,
                      bandwidth=args.bandwidth)
    result = []
    for s in counts:
        costs = form_costs(dims, args.batch, s, args.seqlen, e, args.kv_dtype)
        entry = {"s_q": s}
        for form, c in costs.items():
            entry[form] = {"flops": c.flops, "bytes": c.bytes, "time_s": c.time(args.rate, args.bandwidth)}
        entry["cheaper"] = "vanilla" if entry["vanilla"]["time_s"] < entry["absorbed"]["time_s"] else "absorbed"
        result.append(entry)
    if args.json:
        doc = {"preset": args.preset, "tp": args.tp, "dims": dataclasses.asdict(dims), "batch": args.batch,
               "cache_len": args.seqlen, "dtype_bytes": e, "kv_dtype": args.kv_dtype or args.dtype,
               "kv_token_bytes": token_bytes, "rate": args.rate, "bandwidth": args.bandwidth,
               "rows": result, "crossover": cross}
        print(json.dumps(doc, indent=1))
        return 0
    print(f"{args.preset}: {dims.heads} heads (tp {args.tp}), kv_lora_rank {dims.kv_lora_rank}, rope {dims.rope}, "
          f"nope {dims.nope}, v {dims.v}")
    print(f"batch {args.batch}, {args.seqlen} cached tokens per request, {args.dtype}, cache "
          f"{args.kv_dtype or args.dtype} ({token_bytes:g} B per token); "
          f"roofline {args.rate / 1e12:g} TFLOP/s, {args.bandwidth / 1e12:g} TB/s")
    rows = [["s_q", "absorbed GFLOP", "MB", "us", "vanilla GFLOP", "MB", "us", "vanilla/absorbed", "cheaper"]]
    for r in result:
        a, v = r["absorbed"], r["vanilla"]
        rows.append([str(r["s_q"]), f"{a['flops'] / 1e9:.2f}", f"{a['bytes'] / 1e6:.1f}", f"{a['time_s'] * 1e6:.1f}",
                     f"{v['flops'] / 1e9:.2f}", f"{v['bytes'] / 1e6:.1f}", f"{v['time_s'] * 1e6:.1f}",
                     f"{v['time_s'] / a['time_s']:.2f}", r["cheaper"]])
    print(_table(rows, [True] * 8 + [False]))
    if cross is None:
        print("crossover: none (absorbed is cheaper for every s_q up to 2^20)")
    else:
        print(f"crossover: vanilla is cheaper from s_q >= {cross} (absorbed below)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
