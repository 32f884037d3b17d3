"""Runs one decode shape a few times, for a profiler to time each kernel (decode, merge) of a call:

    ncu --clock-control none --metrics gpu__time_duration.sum -k regex:'decode_kernel|merge_kernel' \
        python scripts/kernel_times.py --batch 32 --seqlen 1024 --heads 16 [--family narrow] [--s-q 1] \
            [--ckv 256 --rope 32] [--kv-dtype fp8_e4m3] [--reuse]
    python scripts/kernel_times.py --case 6 ...   # a bench suite case (its lengths, ragged for 6), not the sizes

The bench (python -m mla_gen.bench) is the instrument for speed claims; this only splits a call's time.
"""
from __future__ import annotations

import argparse

import torch

import mla_gen
from generator.spec import DType
from mla_gen.bench.cases import default_suite
from mla_gen.bench.impls import quantize
from mla_gen.testing import make_inputs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default=None, help="a bench suite case by name (e.g. 6): its lengths, heads, s_q, dims")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seqlen", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--s-q", type=int, default=1, dest="s_q")
    ap.add_argument("--ckv", type=int, default=512)
    ap.add_argument("--rope", type=int, default=64)
    ap.add_argument("--family", default=None)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--kv-dtype", default=None, help="an fp8 cache format (the 16-bit cache quantized to it)")
    ap.add_argument("--reuse", action="store_true",
                    help="a planned MLADecodeWrapper: the first call plans, the others reuse its work list "
                         "(run(replan=False), as the bench times); default: mla_decode, which plans every call")
    a = ap.parse_args()
    if a.case is not None:
        case = next((c for c in default_suite() if c.name == a.case), None)
        if case is None:
            ap.error(f"--case: expected a suite case name ({', '.join(c.name for c in default_suite())}), got {a.case}")
        lengths, a.heads, a.ckv, a.rope, a.s_q = case.lengths(), case.heads, case.ckv, case.rope, case.s_q
    elif None in (a.batch, a.seqlen, a.heads):
        ap.error("--batch, --seqlen and --heads: required without --case")
    else:
        lengths = [a.seqlen] * a.batch
    inp = make_inputs(lengths, heads=a.heads, ckv=a.ckv, rope=a.rope, s_q=a.s_q, page_size=64,
                      device="cuda", combined=True, generator=torch.Generator(device="cuda").manual_seed(0))
    q_nope, q_pe, ckv, kpe, block_table, seqlens, sm_scale = inp.args()
    kv_scale = None
    if a.kv_dtype is not None:
        ckv, kpe, kv_scale = quantize(inp, DType.parse(a.kv_dtype)).run_args()
    if a.reuse:
        w = mla_gen.MLADecodeWrapper(family=a.family)
        w.plan(seqlens, a.s_q, num_heads=a.heads, ckv_dim=a.ckv, rope_dim=a.rope, page_size=64,
               max_pages=block_table.shape[1], sm_scale=sm_scale, dtype=q_nope.dtype, kv_dtype=a.kv_dtype)
        scaled = {} if kv_scale is None else {"kv_scale": kv_scale}
        for i in range(a.calls):
            w.run(q_nope, q_pe, ckv, kpe, block_table, seqlens, replan=i == 0, **scaled)
    for _ in range(0 if a.reuse else a.calls):
        mla_gen.mla_decode(q_nope, q_pe, ckv, kpe, block_table, seqlens, sm_scale, family=a.family, kv_scale=kv_scale)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
