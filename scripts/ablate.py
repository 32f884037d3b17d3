"""Copies of templates/ with one part of a kernel taken away, to time beside main with scripts/kernel_ab.sh (PERF.md's
"taking parts away" tables: what a part costs is main's time minus the copy's). The copies are wrong on purpose:
only timed, never tested, never shipped.

    python scripts/ablate.py --list
    python scripts/ablate.py /tmp/abl no-loads eighth-boxes       # /tmp/abl/no-loads, /tmp/abl/eighth-boxes
    FAMILIES=seesaw scripts/kernel_ab.sh main /tmp/abl/no-loads /tmp/abl/eighth-boxes

Each ablation is a list of exact text edits; an edit whose text is not found exactly `count` times fails, naming
it, so a kernel change that moves the code breaks the ablation here (tests/test_ablate.py), not silently on the GPU.
Time them on shapes with whole tiles (case 2: B128 S4096 H128): a copy without waits never zeroes a tile's tail.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


@dataclasses.dataclass(frozen=True)
class Edit:
    file: str
    old: str
    new: str
    count: int = 1


@dataclasses.dataclass(frozen=True)
class Ablation:
    family: str
    what: str
    edits: tuple[Edit, ...]


# seesaw's Q K^T calls, waiting for their boxes only in the first pair (tiles 0 and 1, the prologue's loads)
_FIRST_PAIR_WAITS = (
    Edit("seesaw.cuh", "        qk(sacc, 0, true);", "        qk(sacc, 0, it == 0);"),
    Edit("seesaw.cuh", "        qk(sacc, 1, has_k1);", "        qk(sacc, 1, has_k1 && it == 0);"),
)
# a TMA box as an empty asm with the same operands: the address math stays, nothing is loaded or awaited
_TMA_OR_NOT = """__device__ __forceinline__ void tma_load_or_not(bool real, uint32_t dst, const CUtensorMap* map,
                                                uint32_t bar, int c0, int c1, int c2) {
  if (real) tma_load_3d(dst, map, bar, c0, c1, c2);
  else asm volatile("" ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2)
                    : "memory");
}
"""

ABLATIONS: dict[str, Ablation] = {
    "no-loads": Ablation(
        "seesaw", "no kv boxes after the first pair: no reissue (no WG barrier, no issue code), no waits",
        (Edit("seesaw.cuh", "      if (next >= n_tiles) return;\n", "      return;\n"), *_FIRST_PAIR_WAITS)),
    "no-tma-issue": Ablation(
        "seesaw", "no kv boxes after the first pair and no waits, but every reissue kept (WG barrier, find, the issue "
        "loop), its TMA and expect_tx instructions replaced by nothing: no-loads minus this is the issue code's cost",
        (Edit("seesaw.cuh", "template <class Cfg>\nstruct Layout {",
              _TMA_OR_NOT + "\ntemplate <class Cfg>\nstruct Layout {"),
         Edit("seesaw.cuh", "          mbarrier_arrive_expect_tx(", "          if (it < 2) mbarrier_arrive_expect_tx("),
         Edit("seesaw.cuh", "        if (rope) mbarrier_arrive_expect_tx(",
              "        if (rope && it < 2) mbarrier_arrive_expect_tx("),
         Edit("seesaw.cuh", "tma_load_3d(stage", "tma_load_or_not(it < 2, stage", count=2),
         *_FIRST_PAIR_WAITS)),
    "no-reissue-barrier": Ablation(
        "seesaw", "the issuing warp reissues a half right after its own wgmma wait, without the WG barrier that waits "
        "for the other three warps' (FlashMLA's way; racy in principle: the cost of that barrier)",
        (Edit("seesaw.cuh", "      bar_sync(local, 128);\n      if (issuer) issue(next, buf, half, rope);",
              "      if (issuer && local >= 0) issue(next, buf, half, rope);"),)),
    "eighth-boxes": Ablation(
        "seesaw", "every TMA box 1/8 of its rows: the same boxes, waits and reissues, 1/8 of the bytes",
        (Edit("sm90.cuh", "static_cast<cuuint32_t>(tma_box_rows(page_size)), 1u};",
              "static_cast<cuuint32_t>(tma_box_rows(page_size) / 8), 1u};"),
         Edit("seesaw.cuh", "groups * box_rows * KN::kRowBytes);", "groups * box_rows * KN::kRowBytes / 8);"),
         Edit("seesaw.cuh", "groups * box_rows * KP::kBlocks * KP::kRowBytes);",
              "groups * box_rows * KP::kBlocks * KP::kRowBytes / 8);"))),
    "no-softmax": Ablation(
        "seesaw", "P = S rounded and the running max never moves: no exp2, no rescale (the max, the sums and the "
        "stores of P stay)",
        (Edit("seesaw.cuh", "const bool move = v > m_ref[hh] + kRescaleLog2;",
              "const bool move = false && v > m_ref[hh] + kRescaleLog2;"),
         Edit("seesaw.cuh", "fast_exp2(fmaf(sc[4 * j + 2 * hh], scale_log2, neg_m))",
              "sc[4 * j + 2 * hh] + 0.f * neg_m"),
         Edit("seesaw.cuh", "fast_exp2(fmaf(sc[4 * j + 2 * hh + 1], scale_log2, neg_m))", "sc[4 * j + 2 * hh + 1]"))),
}


def ablate(name: str, dst: Path, src: Path = TEMPLATES) -> Path:
    """A copy of `src` at dst / name with ablation `name` applied; raises ValueError naming an edit whose text is
    not found exactly as often as it expects (nothing is left behind then)."""
    if name not in ABLATIONS:
        raise ValueError(f"ablation: expected one of {', '.join(ABLATIONS)}, got {name!r}")
    out = dst / name
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out)
    try:
        for e in ABLATIONS[name].edits:
            path = out / e.file
            text = path.read_text()
            found = text.count(e.old)
            if found != e.count:
                raise ValueError(f"{name}: {e.file} holds {found} copies of {e.old.strip()!r}, expected {e.count} "
                                 f"(the kernel changed: update scripts/ablate.py)")
            path.write_text(text.replace(e.old, e.new))
    except Exception:
        shutil.rmtree(out)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", type=Path, help="folder for the copies (one subfolder per ablation)")
    ap.add_argument("names", nargs="*", help="ablations to make")
    ap.add_argument("--list", action="store_true", help="list the ablations")
    args = ap.parse_args(argv)
    if args.list:
        for name, a in ABLATIONS.items():
            print(f"{name:14s} {a.family}: {a.what}")
        return 0
    if args.out is None or not args.names:
        ap.error("give a folder and at least one ablation (or --list)")
    for name in args.names:
        print(ablate(name, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
