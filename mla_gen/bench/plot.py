"""The roofline plot of a bench run (matplotlib, an optional dependency: `pip install 'mla-gen[plot]'`)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from mla_gen.bench.report import Record
from mla_gen.bench.roofline import Ceilings, require_matplotlib


def plot_roofline(records: Sequence[Record], ceilings: Ceilings, path: Path, title: str) -> int:
    """Log-log roofline PNG: x = FLOP/B, y = TFLOP/s; the bandwidth slope, the compute roof, and one
    point per timed (case, implementation), labelled with the case. Returns the number of points."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    timed = [r for r in records if r.status == "ok" and r.tflops]
    xs = [r.intensity for r in timed] or [ceilings.ridge]
    lo, hi = min(min(xs), ceilings.ridge) / 3, max(max(xs), ceilings.ridge) * 3
    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(grid, [min(ceilings.matmul_tflops, ceilings.copy_gbps * x / 1e3) for x in grid], color="black", lw=1.5,
            label=f"roof: copy {ceilings.copy_gbps:.0f} GB/s, bf16 matmul {ceilings.matmul_tflops:.0f} TFLOP/s")
    ax.axvline(ceilings.ridge, color="gray", lw=0.8, ls=":")
    markers = "os^Dv<>Ph*X"
    for i, impl in enumerate(dict.fromkeys(r.impl for r in timed)):
        mine = [r for r in timed if r.impl == impl]
        ax.scatter([r.intensity for r in mine], [r.tflops for r in mine], marker=markers[i % len(markers)],
                   s=40, label=impl, zorder=3)
        for r in mine:
            ax.annotate(r.case, (r.intensity, r.tflops), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlim(lo, hi)
    ax.set_xlabel("arithmetic intensity (FLOP / byte of cache + q + out)")
    ax.set_ylabel("TFLOP/s  (2 H (C+R+C) per visible token)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return len(timed)
