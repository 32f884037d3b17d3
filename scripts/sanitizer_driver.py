"""The reduced GPU matrix that scripts/sanitizer.sh runs under compute-sanitizer, once, in one process.

Per kernel family the device runs (every family of generator.select.families_for): heads 16 and 128,
ckv/rope 512/64 and 256/32, page 1 and 64, s_q 1 and 2, split and unsplit schedules, in 8 cases (a
2^(5-2) fractional factorial: every pair of those five factors meets in all four combinations), each
a ragged batch of 3 or 4 short requests (racecheck is slow); then per family with an fp8 path two fp8
cases (fp8_e4m3 and fp8_ds_mla quantized from the bf16 cache), each where the family reads that format
(every tool runs every case: since seesaw reads fp8_e4m3 with e4m3 tensor cores, no converter warp reads bytes
the TMA wrote over the consumers' stores). Every output is
poisoned with NaN first and checked against the float64 reference on the CPU
(mla_gen.testing.accuracy_problems with the GPU tests' bounds; fp8 caches dequantized), and every schedule is
checked to split (or not) as its case says.

    python scripts/sanitizer_driver.py [--family F]     # run the matrix (needs CUDA); exit 1 if wrong
    python scripts/sanitizer_driver.py --list [--arch sm_90a]   # the cases, no CUDA needed
    python scripts/sanitizer_driver.py --ids            # the variant ids, for `python -m generator build`
    python scripts/sanitizer_driver.py --summary TOOL LOG RC    # one line from a compute-sanitizer log
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import re
import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from generator.errors import SpecError  # noqa: E402
from generator.select import Decision, decide, families_for  # noqa: E402
from generator.spec import FP8_FAMILIES, Arch, DType, Family  # noqa: E402
# Requests split over at most this many parts are merged inside the decode kernel, wider ones by the
# merge kernel: a split case has one of each.
from mla_gen.schedule import INLINE_MERGE_SPLITS  # noqa: E402

TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
SPLIT_PARTS = 16     # num_parts of the split schedule: more parts than these short batches fill
DONE = "sanitizer_driver: {ok}/{total} cases ok"




@dataclasses.dataclass(frozen=True)
class Case:
    family: Family
    heads: int
    ckv: int
    rope: int
    page: int
    s_q: int
    split: bool
    combined: bool      # views of one [pages, page, ckv+rope] cache instead of two tensors
    kv: DType = DType.BF16  # the cache: bf16, or an fp8 format quantized from the bf16 one

    @property
    def lengths(self) -> list[int]:
        """Ragged and short: a request of its s_q new tokens only, one at a 64-token edge (63, 64 or 65),
        one of 500 tokens; split cases add one of 3000, so that the split schedule cuts one request into
        a few parts (merged inside the decode kernel) and one into more (merged by the merge kernel)."""
        edge = {(64, 1): 63, (64, 2): 64}.get((self.page, self.s_q), 65)
        return [self.s_q, edge, 500] + ([3000] if self.split else [])

    def decision(self, arch: Arch) -> Decision:
        return decide(arch=arch, num_heads=self.heads, ckv_dim=self.ckv, rope_dim=self.rope, dtype=DType.BF16,
                      s_q=self.s_q, family=self.family, num_parts=SPLIT_PARTS if self.split else 1, kv_dtype=self.kv)

    def name(self, arch: Arch) -> str:
        """The variant id, then what the case adds to it."""
        return (f"{self.decision(arch).spec.variant_id}-p{self.page}-sq{self.s_q}-"
                f"{'split' if self.split else 'unsplit'}{'-combined' if self.combined else ''}")


# Per family with an fp8 path, two fp8 cases: each format once, split and unsplit, both page sizes.
FP8_CASES = ((DType.FP8_E4M3, 16, 512, 64, 1, 1, True), (DType.FP8_DS_MLA, 128, 512, 64, 64, 2, False))


def _reads(case: Case, arch: Arch) -> bool:
    """Whether the case's family reads its cache format at its dims (seesaw: fp8_e4m3 only)."""
    try:
        case.decision(arch)
    except SpecError:
        return False
    return True


def cases(arch: Arch, families: list[Family] | None = None) -> list[Case]:
    """The matrix for `families` (default: every family that runs on `arch`), then the fp8 cases of the
    families that read fp8 caches."""
    out = []
    families = families or families_for(arch)
    for family in families:
        for a, b, c in itertools.product((0, 1), repeat=3):
            # base factors a, b, c; the other two are a^b and a^c, the cache layout a^b^c
            out.append(Case(family, heads=(16, 128)[a], ckv=(512, 256)[b], rope=(64, 32)[b], page=(1, 64)[c],
                            s_q=1 + (a ^ b), split=bool(a ^ c), combined=bool(a ^ b ^ c)))
    for family in (f for f in families if f in FP8_FAMILIES):
        for kv, heads, ckv, rope, page, s_q, split in FP8_CASES:
            case = Case(family, heads, ckv, rope, page, s_q, split, combined=False, kv=kv)
            if _reads(case, arch):
                out.append(case)
    return out


# -- the run (needs CUDA) ---------------------------------------------------------------------------

def splits_as_named(case: Case, splits: list[int]) -> bool:
    """An unsplit case splits nothing; a split case has a request merged in the decode kernel (2 to
    INLINE_MERGE_SPLITS parts) and one merged by the merge kernel (more)."""
    if not case.split:
        return max(splits) == 1
    return any(1 < n <= INLINE_MERGE_SPLITS for n in splits) and max(splits) > INLINE_MERGE_SPLITS


def lse_tol(case: Case, arch: Arch) -> float:
    """The GPU tests' lse bound for the case's kernel: looser where it quantizes q (narrow over fp8)."""
    from mla_gen.testing import LSE_TOL, LSE_TOL_QUANTIZED_Q

    return LSE_TOL_QUANTIZED_Q if case.decision(arch).spec.quantizes_q else LSE_TOL


def run_case(case: Case, arch: Arch) -> list[str]:
    """Problems of one case on `arch` (empty when it is right)."""
    import torch

    import mla_gen
    from mla_gen import fp8
    from mla_gen.reference import mla_decode_reference
    from mla_gen.testing import accuracy_problems, make_inputs

    seed = zlib.crc32(repr(case).encode())
    inp = make_inputs(case.lengths, heads=case.heads, ckv=case.ckv, rope=case.rope, s_q=case.s_q,
                      page_size=case.page, dtype=torch.bfloat16, device="cuda", combined=case.combined,
                      generator=torch.Generator().manual_seed(seed))
    q_nope, q_pe, ckv, kpe, block_table, seqlens, sm_scale = inp.args()
    extra = {}
    if case.kv is DType.FP8_E4M3:  # the scale from the finite values (unread slots hold NaN)
        amax = float(torch.cat([ckv.flatten(), kpe.flatten()]).float().nan_to_num(0, 0, 0).abs().max())
        cache, extra["kv_scale"] = fp8.quantize_per_tensor(ckv, kpe, scale=amax / fp8.E4M3_MAX)
        ckv, kpe = cache[..., :case.ckv], cache[..., case.ckv:]
    elif case.kv is DType.FP8_DS_MLA:
        ckv, kpe = fp8.quantize_ds_mla(ckv, kpe), None
    args = (q_nope, q_pe, ckv, kpe, block_table, seqlens)
    batch = len(case.lengths)
    out = torch.full((batch, case.s_q, case.heads, case.ckv), float("nan"), dtype=torch.bfloat16, device="cuda")
    lse = torch.full((batch, case.s_q, case.heads), float("nan"), dtype=torch.float32, device="cuda")
    w = mla_gen.MLADecodeWrapper(family=case.family.value, num_parts=SPLIT_PARTS if case.split else 1)
    w.plan(inp.cache_seqlens, case.s_q, num_heads=case.heads, ckv_dim=case.ckv, rope_dim=case.rope,
           page_size=case.page, max_pages=inp.block_table.shape[1], sm_scale=inp.sm_scale, dtype=torch.bfloat16,
           kv_dtype=None if case.kv is DType.BF16 else case.kv.cli_name)
    w.run(*args, **extra, out=out, lse=lse)
    w.check_status()  # syncs
    problems = []
    splits = sorted(int(n) for n in w.schedule()[1][:, 1].tolist())
    if not splits_as_named(case, splits):
        named = "split" if case.split else "unsplit"
        problems.append(f"schedule: splits per request {splits} do not match the case ({named})")
    cpu = lambda t: t.cpu() if isinstance(t, torch.Tensor) else t  # noqa: E731
    # on the CPU: no reference kernels under the sanitizer; an fp8 cache is read dequantized
    ref, ref_lse = mla_decode_reference(*map(cpu, args), sm_scale, **{k: cpu(v) for k, v in extra.items()})
    return problems + accuracy_problems(out.cpu(), lse.cpu(), ref, ref_lse, "bf16", lse_tol(case, arch))


def device_arch() -> Arch:
    import torch

    from mla_gen.dispatch import device_info

    return device_info(torch.cuda.current_device()).arch


def run_all(arch: Arch, families: list[Family] | None) -> int:
    todo = cases(arch, families)
    ok = 0
    for case in todo:
        try:
            problems = run_case(case, arch)
        except Exception as e:  # one case failing is a line, the others still run
            problems = [f"{type(e).__name__}: {e}".splitlines()[0]]
        ok += not problems
        print(f"{'ok  ' if not problems else 'FAIL'} {case.name(arch)}" + "".join(f"\n    {p}" for p in problems),
              flush=True)
    print(DONE.format(ok=ok, total=len(todo)), flush=True)
    return 0 if ok == len(todo) else 1


# -- reading a compute-sanitizer log ---------------------------------------------------------------

def summarize(tool: str, log: str, rc: int) -> tuple[bool, str]:
    """(clean, one line) from a compute-sanitizer log: its closing summary (ERROR SUMMARY; racecheck with
    --racecheck-report all closes with a RACECHECK SUMMARY instead, whose warnings count too: every hazard
    fails), the driver's own result line and the exit status. A log without its closing summary (the tool
    did not finish) is not clean."""
    errors = re.findall(r"ERROR SUMMARY: (\d+) errors?", log)
    hazards = re.findall(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", log)
    done = re.findall(r"sanitizer_driver: (\d+)/(\d+) cases ok", log)
    parts, clean = [], rc == 0
    if errors:
        parts.append(f"{errors[-1]} errors")
        clean &= errors[-1] == "0"
    elif not (tool == "racecheck" and hazards):
        parts.append("no ERROR SUMMARY (did the tool finish?)")
        clean = False
    if tool == "racecheck" and hazards:
        shown, err, warn = hazards[-1]
        parts.append(f"{shown} hazards ({err} errors, {warn} warnings)")
        clean &= shown == "0" and err == "0" and warn == "0"
    elif tool == "racecheck" and "RACECHECK SUMMARY" in log:
        parts.append("a RACECHECK SUMMARY this script cannot read")
        clean = False
    if done:
        parts.append(f"{done[-1][0]}/{done[-1][1]} cases ok")
        clean &= done[-1][0] == done[-1][1]
    else:
        parts.append("the driver did not finish")
        clean = False
    parts.append(f"exit {rc}")
    return clean, f"{tool}: {'clean' if clean else 'FAILED'}: {', '.join(parts)}"


def _family(text: str) -> Family:
    try:
        return Family.parse(text)
    except ValueError as e:  # SpecError: its message names the families
        raise argparse.ArgumentTypeError(str(e).removeprefix("family: ")) from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/sanitizer_driver.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--list", action="store_true", help="print the cases and exit (no CUDA needed)")
    p.add_argument("--ids", action="store_true", help="print the variant ids the cases use and exit")
    p.add_argument("--arch", default=None, help="with --list/--ids: target arch (default: the device's, else sm_90a)")
    p.add_argument("--family", action="append", type=_family, metavar="F",
                   help="only this family (repeatable; default every family the arch runs)")
    p.add_argument("--summary", nargs=3, metavar=("TOOL", "LOG", "RC"),
                   help="print one line from a compute-sanitizer log; exit 1 unless clean")
    args = p.parse_args(argv)
    if args.summary:
        tool, log, rc = args.summary
        if tool not in TOOLS:
            p.error(f"argument --summary: TOOL must be one of {', '.join(TOOLS)}, got {tool!r}")
        clean, line = summarize(tool, Path(log).read_text(errors="replace"), int(rc))
        print(line)
        return 0 if clean else 1
    if args.list or args.ids:
        if args.arch:
            arch = Arch.parse(args.arch)
        else:
            import torch

            arch = device_arch() if torch.cuda.is_available() else Arch.SM90A
        if args.ids:
            print("\n".join(dict.fromkeys(c.decision(arch).spec.variant_id for c in cases(arch, args.family))))
        else:
            for c in cases(arch, args.family):
                print(f"{c.name(arch)}  lengths {c.lengths}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("scripts/sanitizer_driver.py: error: no CUDA device (--list works without one)", file=sys.stderr)
        return 2
    return run_all(device_arch(), args.family)


if __name__ == "__main__":
    sys.exit(main())
