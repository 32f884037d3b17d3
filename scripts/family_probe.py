"""Times mla_decode for one family on a few bench shapes WITHOUT checking the output (for attribution
experiments whose kernels skip work on purpose). Templates come from $MLA_GEN_TEMPLATE_DIR if set.

    PYTHONPATH=. python scripts/family_probe.py --family wgmma --label v2 --cases 2,3
"""
from __future__ import annotations

import argparse

import torch

import mla_gen
from mla_gen.testing import make_inputs

CASES = {"2": dict(batch=128, seqlen=4096, heads=128, s_q=1), "3": dict(batch=64, seqlen=8192, heads=128, s_q=2),
         "5": dict(batch=1, seqlen=32768, heads=128, s_q=1), "1": dict(batch=128, seqlen=4096, heads=16, s_q=1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="wgmma")
    ap.add_argument("--label", default="")
    ap.add_argument("--cases", default="2,3")
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    for name in a.cases.split(","):
        c = CASES[name]
        g = torch.Generator(device="cuda").manual_seed(0)
        inp = make_inputs([c["seqlen"]] * c["batch"], heads=c["heads"], s_q=c["s_q"], page_size=64, device="cuda",
                          generator=g, extra_pages=0)
        out = torch.empty(c["batch"], c["s_q"], c["heads"], 512, dtype=torch.bfloat16, device="cuda")
        w = mla_gen.MLADecodeWrapper(family=a.family)
        w.plan(inp.cache_seqlens, c["s_q"], num_heads=c["heads"], page_size=64, max_pages=inp.block_table.shape[1],
               sm_scale=inp.sm_scale)
        for _ in range(3):
            w.run(*inp.args()[:6], out=out)
        times = []
        for _ in range(a.iters):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            w.run(*inp.args()[:6], out=out)
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) * 1000)
        times.sort()
        print(f"probe {a.family:6s} {a.label:12s} case {name}: {times[len(times) // 2]:8.1f} us "
              f"(p10 {times[len(times) // 10]:.1f}, p90 {times[9 * len(times) // 10]:.1f})", flush=True)
        del inp, out


if __name__ == "__main__":
    main()
