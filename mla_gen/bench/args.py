"""Arguments of `python -m mla_gen.bench`: the parser, and Options with the cases to run. Usage errors
raise UsageError with one line naming the argument (exit 2)."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Sequence

from generator.argtypes import OneLineParser, UsageError, positive_int
from generator.errors import SpecError
from generator.presets import model_config, preset_names
from generator.spec import FP8_FAMILIES, DType, Family
from mla_gen.bench.cases import DEFAULT_SM_SCALE, DTYPES, Case, default_suite, fp8_unsupported
from mla_gen.bench.roofline import require_matplotlib

PROG = "python -m mla_gen.bench"
REPO = Path(__file__).resolve().parents[2]
MIN_ITERS = 20
KV_DTYPES = (*DTYPES, *(d.cli_name for d in DType if d.is_fp8))
_FIELD_FLAGS = {"batch": "--batch", "heads": "--heads", "ckv": "--ckv", "rope": "--rope", "s_q": "--s-q",
                "seqlen": "--seqlen", "seqlens_random": "--seqlens-random", "page_size": "--page-size",
                "dtype": "--dtype"}
_SHAPE_FLAGS = ("preset", "heads", "ckv", "rope", "batch", "seqlen", "seqlens_random", "s_q")


def _seqlens_random(text: str) -> tuple[int, int]:
    parts = text.split(",")
    try:
        lo, hi = (int(p) for p in parts)
    except ValueError:
        lo = hi = 0
    if len(parts) != 2 or not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected LO,HI with 1 <= LO <= HI, got {text!r}")
    return lo, hi


def _families(text: str) -> list[Family]:
    try:
        families = list(dict.fromkeys(Family.parse(f) for f in text.split(",") if f.strip()))
    except SpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not families:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of families, got {text!r}")
    return families


def _preset(text: str) -> str:
    if text not in preset_names():
        raise argparse.ArgumentTypeError(f"unknown preset {text!r}; expected one of {', '.join(preset_names())}")
    return text


def make_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="MLA decode benchmark: mla-gen, a torch baseline and peers under the "
                "device's measured ceilings. No case arguments: the default suite.")
    g = p.add_argument_group("one case instead of the suite (a preset, or explicit dims)")
    g.add_argument("--preset", type=_preset, help=f"model preset: {', '.join(preset_names())}")
    g.add_argument("--heads", type=positive_int, metavar="H", help="query heads per GPU (with --ckv and --rope)")
    g.add_argument("--ckv", type=positive_int, metavar="C", help="compressed kv width (kv_lora_rank), e.g. 512")
    g.add_argument("--rope", type=positive_int, metavar="R", help="rope width (qk_rope_head_dim), e.g. 64")
    g.add_argument("--batch", type=positive_int, metavar="B", help="requests (default 64)")
    seq = g.add_mutually_exclusive_group()
    seq.add_argument("--seqlen", type=positive_int, metavar="S", help="tokens per request (default 4096)")
    seq.add_argument("--seqlens-random", type=_seqlens_random, metavar="LO,HI",
                     help="lengths uniform in [LO, HI], drawn with --seed")
    g.add_argument("--s-q", type=positive_int, metavar="N", help="query tokens per request, causal (default 1)")
    p.add_argument("--page-size", type=positive_int, metavar="P", help="cache page size (default 64; suite too)")
    p.add_argument("--dtype", choices=DTYPES, help="q/cache/out dtype (default bf16; suite too)")
    p.add_argument("--kv-dtype", choices=KV_DTYPES, help="the --dtype (default), or an fp8 cache format timed beside "
                   "it: per case, mla-gen's fp8 families also run on the cache quantized to it (fp8_ds_mla: ckv 512, "
                   "rope 64, bf16), with their time over the 16-bit cache's")
    p.add_argument("--cases", metavar="LIST", help="suite cases to run, comma-separated, e.g. 6,6eq (default all: "
                   + ", ".join(c.name for c in default_suite()) + ")")
    p.add_argument("--families", type=_families, metavar="LIST",
                   help="mla-gen families, comma-separated, e.g. simt,mma (default: all the device runs)")
    p.add_argument("--peers", action="store_true", help="also time the peers that load (FlashMLA, Triton)")
    p.add_argument("--peers-dir", type=Path, metavar="DIR",
                   help="folder holding peers.py (default .peers in the repo root; implies --peers)")
    p.add_argument("--iters", type=positive_int, default=30, metavar="N", help=f"timed runs per (case, impl), "
                   f">= {MIN_ITERS} (default 30)")
    p.add_argument("--case-timeout", type=positive_int, default=300, metavar="S",
                   help="seconds a case may take before the run stops with every thread's stack (a kernel that "
                        "never finishes; default 300)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random lengths and data (default 0)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write one JSON document of all records")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="write a roofline PNG (needs matplotlib)")
    p.add_argument("--from-json", type=Path, metavar="FILE",
                   help="print the table (and --plot) of an earlier --json document; runs nothing")
    return p


@dataclasses.dataclass(frozen=True)
class Options:
    cases: list[Case]
    families: list[Family] | None      # None: every family the device runs
    kv_dtype: DType | None             # an fp8 format timed beside the 16-bit cache; None: the 16-bit cache only
    peers_dir: Path | None             # None: no peers
    iters: int
    case_timeout_s: int                # a case (or the host section) past it stops the run
    json_path: Path | None
    plot_path: Path | None
    from_json: Path | None


def _writable(flag: str, path: Path | None) -> None:
    if path is not None and not path.resolve().parent.is_dir():
        raise UsageError(f"argument {flag}: folder {path.resolve().parent} does not exist")


def _given(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    return [n for n in names if getattr(args, n) is not None]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _single_case(args: argparse.Namespace, page_size: int, dtype: str) -> Case:
    dims = _given(args, ("heads", "ckv", "rope"))
    if args.preset and dims:
        raise UsageError(f"argument --preset: give --preset or --heads/--ckv/--rope, not both ({_flag(dims[0])})")
    sm_scale, model = DEFAULT_SM_SCALE, None
    if args.preset:
        cfg = model_config(args.preset)
        heads, ckv, rope, model = cfg.num_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.name
        # NOTE(sm_scale): where the preset's YaRN scale is unknown, 1/sqrt(nope + rope); time does not depend on it.
        sm_scale = cfg.sm_scale if cfg.sm_scale_known else (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    elif dims:
        missing = [_flag(n) for n in ("heads", "ckv", "rope") if n not in dims]
        if missing:
            raise UsageError(f"argument {_flag(dims[0])}: needs {' and '.join(missing)} too")
        heads, ckv, rope = args.heads, args.ckv, args.rope
    else:
        first = _flag(_given(args, _SHAPE_FLAGS)[0])
        raise UsageError(f"argument {first}: one case needs --preset or --heads/--ckv/--rope "
                         f"(with no case arguments the default suite runs)")
    seqlen = None if args.seqlens_random else (args.seqlen or 4096)
    try:
        return Case(args.preset or "custom", args.batch or 64, heads, ckv, rope, s_q=args.s_q or 1, seqlen=seqlen,
                    seqlens_random=args.seqlens_random, page_size=page_size, dtype=dtype, sm_scale=sm_scale,
                    seed=args.seed, model=model)
    except ValueError as e:
        field = str(e).split(":", 1)[0]
        raise UsageError(f"argument {_FIELD_FLAGS.get(field, _flag(field))}: {e}") from None


def _suite(args: argparse.Namespace, page_size: int, dtype: str) -> list[Case]:
    suite = [dataclasses.replace(c, page_size=c.page_size if c.page_of else page_size, dtype=dtype)
             for c in default_suite(args.seed)]
    if args.cases is None:
        return suite
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    known = [c.name for c in suite]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise UsageError(f"argument --cases: unknown case {unknown[0] if unknown else args.cases!r}; "
                         f"the suite has {', '.join(known)}")
    return [c for c in suite if c.name in names]


def parse_options(argv: Sequence[str] | None) -> Options:
    args = make_parser().parse_args(argv)
    if args.from_json is not None:
        others = _given(args, (*_SHAPE_FLAGS, "page_size", "dtype", "kv_dtype", "cases", "families", "peers_dir",
                               "json"))
        if others or args.peers:
            raise UsageError(f"argument --from-json: takes --plot only, not {_flag(others[0]) if others else '--peers'}")
        if not args.from_json.is_file():
            raise UsageError(f"argument --from-json: no file {args.from_json}")
    if args.iters < MIN_ITERS:
        raise UsageError(f"argument --iters: expected >= {MIN_ITERS} timed runs (median and spread), got {args.iters}")
    if args.plot is not None:
        try:
            require_matplotlib()
        except ImportError as e:
            raise UsageError(f"argument --plot: {e}") from None
    _writable("--json", args.json)
    _writable("--plot", args.plot)
    page_size, dtype = args.page_size or 64, args.dtype or "bf16"
    if _given(args, _SHAPE_FLAGS):
        if args.cases is not None:
            raise UsageError("argument --cases: selects cases of the default suite, not with one case's arguments")
        cases = [_single_case(args, page_size, dtype)]
    else:
        cases = _suite(args, page_size, dtype)
    peers_dir = args.peers_dir or (REPO / ".peers" if args.peers else None)
    kv_dtype = _kv_dtype(args, dtype, cases)
    return Options(cases, args.families, kv_dtype, peers_dir, args.iters, args.case_timeout, args.json, args.plot,
                   args.from_json)


def _kv_dtype(args: argparse.Namespace, dtype: str, cases: list[Case]) -> DType | None:
    """The fp8 format to time beside the 16-bit cache, or None. A case that cannot have it gets n/a rows;
    a selection where none can is a usage error."""
    kv = DType.parse(args.kv_dtype or dtype)
    if not kv.is_fp8:
        if kv.value != dtype:
            raise UsageError(f"argument --kv-dtype: a 16-bit cache has q's dtype (--dtype {dtype}), got {kv.value}")
        return None
    if args.families and not set(args.families) & set(FP8_FAMILIES):
        raise UsageError(f"argument --kv-dtype: {kv.cli_name} caches are read by the "
                         f"{', '.join(f.value for f in FP8_FAMILIES)} families, none of them in --families")
    reasons = [fp8_unsupported(c, kv) for c in cases]
    if all(reasons):
        raise UsageError(f"argument --kv-dtype: {reasons[0]}")
    return kv
