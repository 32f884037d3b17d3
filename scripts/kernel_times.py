"""Runs one decode shape a few times, for a profiler to time each kernel (planner, decode) of a call:

    ncu --clock-control none --metrics gpu__time_duration.sum -k regex:'plan_kernel|decode_kernel' \
        python scripts/kernel_times.py --batch 32 --seqlen 1024 --heads 16 [--family narrow] [--s-q 1] \
            [--ckv 256 --rope 32] [--kv-dtype fp8_e4m3]

The bench (python -m mla_gen.bench) is the instrument for speed claims; this only splits a call's time.
"""
from __future__ import annotations

import argparse

import torch

import mla_gen
from generator.spec import DType
from mla_gen.bench.impls import quantize
from mla_gen.testing import make_inputs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--seqlen", type=int, required=True)
    ap.add_argument("--heads", type=int, required=True)
    ap.add_argument("--s-q", type=int, default=1, dest="s_q")
    ap.add_argument("--ckv", type=int, default=512)
    ap.add_argument("--rope", type=int, default=64)
    ap.add_argument("--family", default=None)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--kv-dtype", default=None, help="an fp8 cache format (the 16-bit cache quantized to it)")
    a = ap.parse_args()
    inp = make_inputs([a.seqlen] * a.batch, heads=a.heads, ckv=a.ckv, rope=a.rope, s_q=a.s_q, page_size=64,
                      device="cuda", combined=True, generator=torch.Generator(device="cuda").manual_seed(0))
    q_nope, q_pe, ckv, kpe, block_table, seqlens, sm_scale = inp.args()
    kv_scale = None
    if a.kv_dtype is not None:
        ckv, kpe, kv_scale = quantize(inp, DType.parse(a.kv_dtype)).run_args()
    for _ in range(a.calls):
        mla_gen.mla_decode(q_nope, q_pe, ckv, kpe, block_table, seqlens, sm_scale, family=a.family, kv_scale=kv_scale)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
