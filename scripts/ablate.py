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
    kv_dtype: str = "bf16"  # the cache the ablated kernel reads (kernel_ab's SHAPE needs the same --kv-dtype)


# seesaw's Q K^T calls, waiting for their boxes only in a segment's first pair (the tiles no-loads still loads)
_FIRST_PAIR_WAITS = (
    Edit("seesaw.cuh", "        qk(sacc, b0, true);", "        qk(sacc, b0, it == 0);"),
    Edit("seesaw.cuh", "        qk(sacc, b1, has_k1);", "        qk(sacc, b1, has_k1 && it == 0);"),
)
# both narrow paths' softmax (narrow_tile.cuh) without its exp2: P = S unscaled
_NARROW_NO_EXP2 = Edit("narrow_tile.cuh", "exp2_scaled(x[4 * j + 2 * h + e], scale_log2, neg_m)",
                       "(x[4 * j + 2 * h + e] + neg_m)")  # (neg_m kept: without it the e4m3 copy spilled)
_LAUNCH = "    return err ? err : launch_decode_kernel<Cfg>(decode_kernel<Cfg>, p, stream, tp);\n  }"


def _instrumented(decls: str, report: str) -> tuple[Edit, ...]:
    """The edits of a copy that records into a __device__ array: <cstdio>, `decls` (the array and the macros that
    fill it) ahead of Layout, and a launcher that after its third call (the decode kernel drained) runs `report`,
    C++ that copies the array back, prints it to stderr and returns 0."""
    return (
        Edit("seesaw.cuh", "#pragma once\n", "#pragma once\n#include <cstdio>\n"),
        Edit("seesaw.cuh", "template <class Cfg>\nstruct Layout {", decls + "\ntemplate <class Cfg>\nstruct Layout {"),
        Edit("seesaw.cuh", _LAUNCH, """  if (err) return err;
  const int launched = launch_decode_kernel<Cfg>(decode_kernel<Cfg>, p, stream, tp);
  static int calls = 0;
  if (launched || ++calls != 3) return launched;
  cudaDeviceSynchronize();
""" + report),
    )


# "timeline": clock64 per event of warp 0 of each WG in CTA (0, 0), request 0's first 64 pairs, into a __device__
# array that the launcher prints after its third call
_STAMP = """__device__ unsigned long long g_stamps[4][64][24];
#define STAMP(e) \\
  if (blockIdx.x + blockIdx.y == 0 && (threadIdx.x & 127) == 0 && seg.req == 0 && it < 128) \\
  g_stamps[wg][it / 2][e] = clock64()
#define USTAMP(u) \\
  if (blockIdx.x + blockIdx.y == 0 && (threadIdx.x & 127) == 0 && seg.req == 0 && pair_no < 64) \\
  g_stamps[wg][pair_no][12 + (u)] = clock64()
#define PSTAMP(e) \\
  if (blockIdx.x + blockIdx.y == 0 && lane == 0 && seg.req == 0 && it < 128) g_stamps[2 + half][it / 2][e] = clock64()
"""
_PRINT_STAMPS = """  static unsigned long long st[4][64][24];
  cudaMemcpyFromSymbol(st, g_stamps, sizeof(st));
  for (int w = 0; w < 4; ++w)
    for (int i = 0; i < 64 && st[w][i][0]; ++i) {
      fprintf(stderr, w < 2 ? "stamp wg%d pair %2d:" : "stamp producer%d pair %2d:", w % 2, i);
      for (int e = 0; e < 24; ++e)
        fprintf(stderr, " %lld", st[w][i][e] ? static_cast<long long>(st[w][i][e] - st[0][0][0]) : -1LL);
      fprintf(stderr, "\\n");
    }
  // the steady state: mean event times of pairs 2 .. n - 3 relative to WG0's start of the same pair (a
  // producer's row belongs to the pair it loads for, so its events fall before 0), and the mean pair length
  int n = 0;
  while (n < 64 && st[0][n][0]) ++n;
  if (n < 6) return 0;
  double len = 0;
  for (int i = 2; i < n - 3; ++i) len += static_cast<double>(st[0][i + 1][0] - st[0][i][0]);
  fprintf(stderr, "steady pairs 2..%d: %.0f cycles per pair (WG0 start to start)\\n", n - 3, len / (n - 5));
  for (int w = 0; w < 4; ++w) {
    fprintf(stderr, w < 2 ? "mean wg%d:" : "mean producer%d:", w % 2);
    for (int e = 0; e < 24; ++e) {
      double sum = 0;
      int k = 0;
      for (int i = 2; i < n - 2; ++i)
        if (st[w][i][e]) sum += static_cast<double>(static_cast<long long>(st[w][i][e] - st[0][i][0])), ++k;
      if (k) fprintf(stderr, " e%d %+.0f", e, sum / k);
    }
    fprintf(stderr, "\\n");
  }
  return 0;
}"""


def _stamp(anchor: str, before: int | None = None, after: int | None = None) -> Edit:
    """An edit that puts STAMP(before) in front of the lines `anchor` and STAMP(after) behind them."""
    head = f"        STAMP({before});\n" if before is not None else ""
    tail = f"        STAMP({after});\n" if after is not None else ""
    return Edit("seesaw.cuh", anchor, head + anchor + tail)


def _stamp_between(first: str, second: str, event: int) -> Edit:
    """An edit that puts STAMP(event) between the lines `first` and `second`."""
    return Edit("seesaw.cuh", first + second, f"{first}        STAMP({event});\n{second}")


_TIMELINE = (
    *_instrumented(_STAMP, _PRINT_STAMPS),
    # WG0
    _stamp("        qk(sacc, b0, true);\n", before=0, after=1),
    _stamp_between("        fence_regs(sacc);\n", "\n        // ---- softmax S0", 2),
    _stamp("        zero_tail(s_kv0, it);\n        fence_proxy_async();\n        bar_sync(kBarP0, 256);\n", after=3),
    _stamp("        release(b0, 0);  // K0L\n", before=4),
    _stamp_between("        bar_sync(kBarP1, 256);\n",
                   "#pragma unroll\n        for (int hh = 0; hh < 2; ++hh) {\n          m_end", 6),
    _stamp("        wgmma_wait<0>();\n        fence_regs(o);\n"
           "        if (has_k1) release(b1, 0);  // K1L (ckv-left + rope, and P1); a missing K1 is not the producer's "
           "(produce)\n",
           before=7, after=9),
    # WG1
    _stamp("        qk(sacc, b1, has_k1);\n", before=0, after=1),
    _stamp_between("        bar_sync(kBarP0, 256);\n", "#pragma unroll\n", 2),
    _stamp("          sc0[hh] = m_mid[hh] != m_run[hh] ? fast_exp2(m_run[hh] - m_mid[hh]) : 1.f;\n        }\n",
           after=3),
    _stamp("\n        // ---- softmax S1", before=4),
    _stamp("        fence_proxy_async();\n        bar_sync(kBarP1, 256);\n", after=5),
    _stamp("        release(b0, 1);  // K0R (ckv-right + rope, and P0)\n", before=6),
    _stamp("        wgmma_wait<0>();\n        fence_regs(o);\n        fence_regs(pa);\n"
           "        if (has_k1) release(b1, 1);  // K1R\n",
           before=8, after=10),
    # each WG's Q K^T: its unit waits passed (events 12 + unit: the ckv blocks left to right, then the rope)
    Edit("seesaw.cuh", "        if (wait) wait_unit(buf, blk);\n", "        if (wait) wait_unit(buf, blk);\n        USTAMP(blk);\n"),
    Edit("seesaw.cuh", "      if (wait) wait_unit(buf, 2 * HB);\n",
         "      if (wait) wait_unit(buf, 2 * HB);\n      USTAMP(2 * HB);\n"),
    # the producer warps: a half's free wait passed (buf 0: event 0, buf 1: event 2), its boxes issued (1, 3)
    Edit("seesaw.cuh", "        mbarrier_wait(free_bar, free_parity);\n        if (lane == 0) {\n",
         "        mbarrier_wait(free_bar, free_parity);\n        PSTAMP(2 * buf);\n        if (lane == 0) {\n"),
    Edit("seesaw.cuh", "        __syncwarp();\n        continue;\n",
         "        __syncwarp();\n        PSTAMP(2 * buf + 1);\n        continue;\n"),
)

# "phases": where each consumer CTA's time goes, summed over its segments (thread 0's clock64), printed after the
# third call: the steady pairs are not the whole kernel (segment starts, epilogues, merges, the wait for the
# inputs); beside each mean, the CTA that took longest (the kernel ends with it)
_PHASE_STAMP = """__device__ unsigned long long g_phase[2048][7];
#define PHASE(e) \\
  if (tid == 0) { \\
    const unsigned long long now_ = clock64(); \\
    g_phase[blockIdx.y * gridDim.x + blockIdx.x][e] += now_ - t_last; \\
    t_last = now_; \\
  }
"""
_PRINT_PHASES = """  static unsigned long long ph[2048][7];
  cudaMemcpyFromSymbol(ph, g_phase, sizeof(ph));
  double sum[7] = {0};
  unsigned long long most = 0;
  int ctas = 0, longest = 0;
  for (int c = 0; c < 2048; ++c) {
    unsigned long long total = 0;
    for (int e = 0; e < 5; ++e) total += ph[c][e];
    if (!total) continue;
    ++ctas;
    if (total > most) most = total, longest = c;
    for (int e = 0; e < 7; ++e) sum[e] += static_cast<double>(ph[c][e]) / 3;  // three calls summed
  }
  const char* names[7] = {"before segment (input wait, merges)", "Q load", "pairs", "epilogue", "after last",
                          "segments", "tiles"};
  fprintf(stderr, "phases: %d CTAs, longest %.0f cycles per call; mean per CTA per call:\\n", ctas, most / 3.0);
  for (int e = 0; e < 7; ++e)
    fprintf(stderr, "phase %-40s %.1f (longest CTA %.1f)\\n", names[e], sum[e] / ctas, ph[longest][e] / 3.0);
  return 0;
}"""
_PHASES = (
    *_instrumented(_PHASE_STAMP, _PRINT_PHASES),
    Edit("seesaw.cuh", "  setmaxnreg_inc<L::kConsumerRegs>();\n",
         "  setmaxnreg_inc<L::kConsumerRegs>();\n  unsigned long long t_last = clock64();\n"),
    Edit("seesaw.cuh", "    const int len = seg.len;\n    const int n_tiles = seg.blk_hi - seg.blk_lo;\n",
         "    const int len = seg.len;\n    const int n_tiles = seg.blk_hi - seg.blk_lo;\n    PHASE(0);\n"
         "    if (tid == 0) g_phase[blockIdx.y * gridDim.x + blockIdx.x][5] += 1, "
         "g_phase[blockIdx.y * gridDim.x + blockIdx.x][6] += n_tiles;\n"),
    Edit("seesaw.cuh", "    bar_sync(kBarConsumers, 256);\n\n    // ---- row state",
         "    bar_sync(kBarConsumers, 256);\n    PHASE(1);\n\n    // ---- row state"),
    Edit("seesaw.cuh", "\n    // ---- epilogue: row sums", "\n    PHASE(2);\n    // ---- epilogue: row sums"),
    Edit("seesaw.cuh", "    bar_sync(kBarConsumers, 256);  // the next segment rewrites Q and the exchange arrays\n",
         "    bar_sync(kBarConsumers, 256);  // the next segment rewrites Q and the exchange arrays\n    PHASE(3);\n"),
    Edit("seesaw.cuh", "  });\n}\n\ntemplate <class Cfg>\n__global__",
         "  });\n  PHASE(4);\n}\n\ntemplate <class Cfg>\n__global__"),
)


ABLATIONS: dict[str, Ablation] = {
    "no-loads": Ablation(
        "seesaw", "no kv boxes after a segment's first pair (the producer still waits for the frees), no waits",
        (Edit("seesaw.cuh", "        mbarrier_wait(free_bar, free_parity);\n        if (lane == 0) {\n",
              "        mbarrier_wait(free_bar, free_parity);\n        if (lane == 0 && it == 0) {\n"),
         *_FIRST_PAIR_WAITS)),
    "timeline": Ablation(
        "seesaw", "not an ablation: clock64 per event of CTA (0, 0), printed to stderr after the third call "
        "(scripts/kernel_times.py SHAPE --family seesaw --calls 3), in cycles since WG0's first stamp (-1: not "
        "reached). WG0: 0 pair start, 1 S0's boxes landed, 2 S0 retired, 3 P0 handed over, 4 P0 V0_L retired (K0L "
        "freed), 6 P1 received, 7 P1 V1_L issued, 9 K1L freed; WG1: 0 pair start, 1 S1's boxes landed, 2 P0 "
        "received, 3 S1 retired, 4 P0 V0_R issued, 5 P1 handed over, 6 P0 V0_R retired (K0R freed), 8 P1 V1_R "
        "issued, 10 K1R freed; both WGs, 12 + u: their Q K^T's wait for unit u passed (the ckv blocks left to right, "
        "then the rope: when its boxes landed, or when the WG got there); producer0 / producer1 (left / right "
        "halves): 0 K0's half free, 1 its boxes issued, 2 K1's half free, 3 its boxes issued; then each row's mean "
        "event times over the steady pairs, relative to WG0's start of the same pair, and the mean pair length",
        _TIMELINE),
    "phases": Ablation(
        "seesaw", "not an ablation: each consumer CTA's clock64 cycles per phase (before a segment: the input "
        "wait and the merges; Q load; pairs; epilogue; after the last segment), summed over its segments, printed "
        "to stderr after the third call as means per CTA per call, with segments and tiles per CTA",
        _PHASES),
    "eighth-boxes": Ablation(
        "seesaw", "every TMA box 1/8 of its rows: the same boxes, waits and frees, 1/8 of the bytes",
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
         Edit("sm90.cuh", "exp2_scaled(x[4 * j + 2 * hh], scale, neg_m)", "x[4 * j + 2 * hh] + 0.f * neg_m"),
         Edit("sm90.cuh", "exp2_scaled(x[4 * j + 2 * hh + 1], scale, neg_m)", "x[4 * j + 2 * hh + 1]"))),
    # narrow's 16-bit path (narrow.cuh; time on case 4 or b8long: SHAPE="--case 4" FAMILIES=narrow), where a 64-token
    # tile's compute takes ~3.3 us a warpgroup and its tensor work ~0.3 (PERF.md, twenty-second session)
    "narrow-no-qk": Ablation(
        "narrow", "no Q K^T wgmmas, 16-bit path (the scores stay 0; the commit and wait stay)",
        (Edit("narrow.cuh", "for (int ks = 0; ks < QN::kSteps; ++ks)\n        wgmma_ss<RN, KV, 0>(sacc[ks % 2],",
              "for (int ks = 0; ks < 0; ++ks)\n        wgmma_ss<RN, KV, 0>(sacc[ks % 2],"),
         Edit("narrow.cuh", "for (int ks = 0; ks < QP::kSteps; ++ks)\n        wgmma_ss<RN, KV, 0>(sacc[(QN::kSteps",
              "for (int ks = 0; ks < 0; ++ks)\n        wgmma_ss<RN, KV, 0>(sacc[(QN::kSteps"))),
    "narrow-no-pv": Ablation(
        "narrow", "no P V wgmmas, 16-bit path (the commit and wait stay)",
        (Edit("narrow.cuh", "for (int kk = 0; kk < N / 16; ++kk)", "for (int kk = 0; kk < 0; ++kk)"),)),
    "narrow-no-softmax": Ablation("narrow", "P = S - m unscaled, no exp2, 16-bit path (as e4m3-no-softmax)",
                                  (_NARROW_NO_EXP2,)),
    "narrow-no-loads": Ablation(
        "narrow", "no kv gathers after each warpgroup's first tile of a segment, 16-bit path (the waits and the "
        "block-table reads stay)",
        (Edit("narrow.cuh", "if (more) issue_tile();", "if (false) issue_tile();"),)),
    # narrow over fp8_e4m3 (narrow_e4m3.cuh; time on case 1: SHAPE="--case 1 --kv-dtype fp8_e4m3" FAMILIES=narrow)
    "e4m3-no-qk": Ablation(
        "narrow", "no Q K^T wgmmas (the scores stay 0; the commit and wait stay)",
        (Edit("narrow_e4m3.cuh", "for (int ks = 0; ks < C / 32; ++ks)\n          wgmma_ss_e4m3<2 * RN>(acc,",
              "for (int ks = 0; ks < 0; ++ks)\n          wgmma_ss_e4m3<2 * RN>(acc,"),
         Edit("narrow_e4m3.cuh", "for (int ks = 0; ks < R / 32; ++ks)\n          wgmma_ss_e4m3<2 * RN>(acc,",
              "for (int ks = 0; ks < 0; ++ks)\n          wgmma_ss_e4m3<2 * RN>(acc,")),
        "fp8_e4m3"),
    "e4m3-no-pv": Ablation(
        "narrow", "no P V wgmmas (and most V^T loads and conversions, which only fed them; the waits stay)",
        (Edit("narrow_e4m3.cuh", "wgmma_rs<RN, __half, 0>(state.o[4 * gh + q], f[q],",
              "if (q < 0) wgmma_rs<RN, __half, 0>(state.o[4 * gh + q], f[q],"),),
        "fp8_e4m3"),
    "e4m3-no-softmax": Ablation(
        "narrow", "P = S - m unscaled, no exp2 (narrow_tile.cuh, both narrow paths; the max, the barriers and the "
        "stores of P stay)",
        (_NARROW_NO_EXP2,),
        "fp8_e4m3"),
    "e4m3-one-softmax-barrier": Ablation(
        "narrow", "not wrong: the softmax's closing barrier only on the slow path (bar.red already orders the fast "
        "path's P^T stores; racecheck's barrier pairing would then need the count kept)",
        (Edit("narrow_tile.cuh", "    make_p();\n  }\n  named_barrier_sync(w.bar_id, kWgThreads);",
              "    make_p();\n    named_barrier_sync(w.bar_id, kWgThreads);\n  }"),),
        "fp8_e4m3"),
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
            print(f"{name:24s} {a.family} over {a.kv_dtype}: {a.what}")
        return 0
    if args.out is None or not args.names:
        ap.error("give a folder and at least one ablation (or --list)")
    for name in args.names:
        print(ablate(name, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
