"""Times dispatch's family under other split policies, to see whether the plan's knobs cost time:

    python scripts/split_sweep.py                      # the small-batch and long-request shapes of issue 12
    python scripts/split_sweep.py --shape 32x1024x16 --parts 66 132 264 --min-tokens 128 256 --fixed-tokens 128
    python scripts/split_sweep.py --cases 2,3,6 --parts 64 66 --min-tokens 256 --fixed-tokens 128 256
    python scripts/split_sweep.py --cases 1 --kv-dtype fp8_e4m3 --parts 128 132 --min-tokens 256 --fixed-tokens 128

A policy is (num_parts, MIN_TOKENS_PER_PART, FIXED_COST_TOKENS): the grid's CTA columns and the two plan
constants of generator/select.py, set in this process before each plan. Each is timed as the bench times a
planned wrapper (mla_gen.bench.timing: CUDA events, L2 flushed, GPU spin, median), decode and merge launches
without planning. A workload is a BATCHxSEQLENxHEADS shape (bf16, 512/64, page 64, s_q 1) or a case of the
bench's suite (`--cases`: its lengths, ragged ones too, s_q, dims, dtype, page size and sm_scale). Prints
dispatch's default and the fastest policies per workload. The bench is the instrument for speed claims; this
only says whether a policy change is worth making.
"""
from __future__ import annotations

import argparse
import itertools

import torch

import generator.select as select
from generator.spec import DType
from mla_gen import MLADecodeWrapper
from mla_gen.bench.cases import Case, default_suite
from mla_gen.bench.impls import QuantizedCache, build_inputs, quantize, wrapper_cache_args
from mla_gen.bench.timing import Timer
from mla_gen.dtypes import torch_dtype

SHAPES = ["32x1024x16", "8x16384x16", "128x4096x16", "1x32768x128", "4x65536x128", "128x4096x32"]


def parse_shape(text: str) -> Case:
    try:
        batch, seqlen, heads = (int(x) for x in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BATCHxSEQLENxHEADS, got {text!r}") from None
    return Case(text, batch, heads, seqlen=seqlen)


def parse_cases(text: str) -> list[Case]:
    suite = {c.name: c for c in default_suite()}
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in suite]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected suite cases ({', '.join(suite)}), got {text!r}")
    return [suite[n] for n in names]


def time_policy(timer: Timer, case: Case, inp, parts: int | None, min_tokens: int, fixed_tokens: int,
                family: str | None = None, fp8: QuantizedCache | None = None):
    """(median us, grid parts, family, plan fixed cost) of one policy; parts None: dispatch's own count. fp8:
    read that cache instead of the inputs' 16-bit one."""
    select.MIN_TOKENS_PER_PART, select.FIXED_COST_TOKENS = min_tokens, fixed_tokens
    ckv, kpe, kv_plan, kv_run = wrapper_cache_args(inp, fp8)
    wrapper = MLADecodeWrapper(inp.q_nope.device, num_parts=parts, family=family)
    plan = wrapper.plan(inp.cache_seqlens, case.s_q, num_heads=case.heads, ckv_dim=case.ckv, rope_dim=case.rope,
                        page_size=case.page_size, max_pages=inp.block_table.shape[1], sm_scale=case.sm_scale,
                        dtype=torch_dtype(case.dtype), **kv_plan)
    args = (inp.q_nope, inp.q_pe, ckv, kpe, inp.block_table, inp.cache_seqlens)
    wrapper.run(*args, **kv_run)  # the device work list, reused by the timed calls
    us = timer.time(lambda: wrapper.run(*args, replan=False, **kv_run)).median_us
    return us, plan.decision.num_parts, plan.spec.family.value, plan.decision.fixed_cost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=parse_shape, nargs="+", default=None,
                    help=f"BATCHxSEQLENxHEADS workloads (default, without --cases: {' '.join(SHAPES)})")
    ap.add_argument("--cases", type=parse_cases, default=[], help="suite cases, comma-separated, e.g. 2,3,6")
    ap.add_argument("--parts", type=int, nargs="+", default=None,
                    help="CTA columns of the grid (default: 1/2, 1, 2, 3 and 4 waves of the device's SMs)")
    ap.add_argument("--min-tokens", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--fixed-tokens", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--family", default=None, help="time this family instead of dispatch's (e.g. narrow)")
    ap.add_argument("--kv-dtype", default=None, choices=["fp8_e4m3", "fp8_ds_mla"],
                    help="time the cache quantized to this fp8 format (default: the 16-bit cache)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--top", type=int, default=6)
    a = ap.parse_args()
    device = torch.device("cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    default = (select.MIN_TOKENS_PER_PART, select.FIXED_COST_TOKENS)
    timer = Timer(device, iters=a.iters, warmup=3)
    shapes = a.shape if a.shape is not None else ([] if a.cases else [parse_shape(s) for s in SHAPES])
    for case in shapes + a.cases:
        inp = build_inputs(case, device)
        fp8 = quantize(inp, DType.parse(a.kv_dtype)) if a.kv_dtype else None
        m_blocks = -(-case.heads * case.s_q // 64)
        parts = a.parts or [max(1, sms * w // (2 * m_blocks)) for w in (1, 2, 4, 6, 8)]
        base = time_policy(timer, case, inp, None, *default, a.family, fp8)
        rows = [(time_policy(timer, case, inp, p, mt, ft, a.family, fp8), p, mt, ft)
                for p, mt, ft in itertools.product(parts, a.min_tokens, a.fixed_tokens)]
        select.MIN_TOKENS_PER_PART, select.FIXED_COST_TOKENS = default
        rows.sort(key=lambda r: r[0][0])
        kv = f", {a.kv_dtype}" if a.kv_dtype else ""
        print(f"{case.name} ({case.shape}{kv}): dispatch's policy {base[0]:.1f} us ({base[1]} parts, {base[2]}, "
              f"min_tokens {default[0]}, fixed_tokens {default[1]}, plan fixed cost {base[3]}); fastest:")
        for (us, grid_parts, family, fixed), p, mt, ft in rows[:a.top]:
            print(f"  {us:8.1f} us  parts {p} ({grid_parts} in the grid, {family}), min_tokens {mt}, "
                  f"fixed_tokens {ft} (plan fixed cost {fixed})")


if __name__ == "__main__":
    main()
