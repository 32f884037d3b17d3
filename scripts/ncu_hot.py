"""The hottest SASS instructions of one profiled kernel, from ncu's source page:

    ncu --section SourceCounters --section WarpStateStats -k regex:decode_kernel -c 1 --launch-skip 1 \
        -o prof python scripts/kernel_times.py --batch 128 --seqlen 4096 --heads 128 --calls 2
    ncu -i prof.ncu-rep --page source --print-source sass --csv > prof.csv
    python scripts/ncu_hot.py prof.csv [--top 40]

Prints the instructions with the most warp-stall samples and, per stall reason, its share of all samples.
"""
from __future__ import annotations

import argparse
import csv


def number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=40)
    a = ap.parse_args()
    with open(a.csv, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    head_at = next(i for i, r in enumerate(rows) if any("Source" in c for c in r))
    head, body = rows[head_at], rows[head_at + 1:]
    col = {name: i for i, name in enumerate(head)}
    src = next(i for name, i in col.items() if name.strip().startswith("Source"))
    total_col = next(i for name, i in col.items() if "Sampling (All" in name)
    reasons = [(name, i) for name, i in col.items()
               if name.startswith("stall_") or ("Stall Sampling" in name and i != total_col)]
    total = sum(number(r[total_col]) for r in body if len(r) > total_col) or 1.0
    print(f"{len(body)} instructions, {total:.0f} samples")
    for name, i in reasons:
        share = sum(number(r[i]) for r in body if len(r) > i) / total
        if share > 0.005:
            print(f"  {name}: {share:.3f}")
    ranked = sorted((r for r in body if len(r) > total_col), key=lambda r: -number(r[total_col]))
    for r in ranked[:a.top]:
        print(f"{number(r[total_col]) / total:6.3f}  {r[src][:110]}")


if __name__ == "__main__":
    main()
