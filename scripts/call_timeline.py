"""Where a call's time goes between its kernels: a CUPTI timeline (torch.profiler) of the bench's own timed
sequence (L2 flush by a read, GPU spin, `MLADecodeWrapper.run` with the work list reused), 20 calls per case; per
kernel of the call, its median start and end after the spin's end and its median duration, then the tail (how
long the last kernel ends after the decode kernel):

    PYTHONPATH=. python scripts/call_timeline.py 4 b8long 5 b4long b8long:fp8_e4m3

Arguments are bench suite case names, each optionally with an fp8 cache format after a colon. The family is the
one dispatch picks for the case on this device; the flush and the spin are the bench's (mla_gen/bench/timing.py).
The bench stays the instrument for speed claims; this splits a call.
"""
from __future__ import annotations

import argparse
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from generator.spec import DType
from mla_gen.bench.cases import default_suite
from mla_gen.bench.impls import build_inputs, prepare_mlagen, quantize
from mla_gen.bench.timing import FLUSH_BYTES, SPIN_CYCLES
from mla_gen.dispatch import choose
from mla_gen.dtypes import torch_dtype

CALLS = 20
FP8_FORMATS = tuple(d.cli_name for d in DType if d.is_fp8)


def timeline(prep, flush: torch.Tensor) -> dict[str, list[tuple[float, float]]]:
    """Per mla-gen kernel name, (start, end) in us after the spin's end, one pair per call."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            flush.sum(dtype=torch.int64)
            torch.cuda._sleep(SPIN_CYCLES)
            prep.run()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    per: dict[str, list[tuple[float, float]]] = {}
    spin_end = None
    for e in events:
        if "spin" in e.name or "sleep" in e.name:
            spin_end = e.time_range.end
        elif spin_end is not None and "mla_gen" in e.name:  # not the next flush's kernels
            name = e.name.split("(")[0].split("<")[0][-40:]
            per.setdefault(name, []).append((e.time_range.start - spin_end, e.time_range.end - spin_end))
    return per


def tail(ends: dict[str, float]) -> float | None:
    """How long after the decode kernel's end the call's last kernel ends (the merge's tail), from each kernel's
    end; None without a decode kernel."""
    decode_end = next((t for kernel, t in ends.items() if "decode_kernel" in kernel), None)
    return None if decode_end is None else max(ends.values()) - decode_end


def main() -> None:
    suite = {c.name: c for c in default_suite()}
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", nargs="+", help="suite case names, e.g. 4 or b8long:fp8_e4m3")
    a = ap.parse_args()
    runs = [(arg, *arg.partition(":")[::2]) for arg in a.cases]  # (argument, case name, fp8 format or "")
    for arg, name, kv in runs:
        if name not in suite:
            ap.error(f"cases: expected suite case names ({', '.join(suite)}), got {arg!r}")
        if kv and kv not in FP8_FORMATS:
            ap.error(f"cases: expected an fp8 cache format after the colon ({', '.join(FP8_FORMATS)}), got {arg!r}")
    dev = torch.device("cuda")
    flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device=dev)
    for arg, name, kv in runs:
        case = suite[name]
        kv_dtype = DType.parse(kv) if kv else DType.parse(case.dtype)
        family = choose(dev.index or 0, case.heads, case.ckv, case.rope, torch_dtype(case.dtype), case.s_q,
                        kv_dtype=kv_dtype, batch=case.batch).spec.family
        inp = build_inputs(case, dev)
        prep = prepare_mlagen(family, inp, case, fp8=quantize(inp, kv_dtype) if kv else None)
        for _ in range(5):
            prep.run()
        torch.cuda.synchronize()
        print(f"{arg} ({prep.note}):")
        ends = {}
        for kernel, spans in timeline(prep, flush).items():
            start = statistics.median(s for s, _ in spans)
            ends[kernel] = end = statistics.median(t for _, t in spans)
            dur = statistics.median(t - s for s, t in spans)
            print(f"  {kernel:40s} n={len(spans):3d} start {start:7.2f} us  end {end:7.2f} us  dur {dur:7.2f} us")
        if (after := tail(ends)) is not None:
            print(f"  tail: the last kernel ends {after:.2f} us after the decode kernel")


if __name__ == "__main__":
    main()
