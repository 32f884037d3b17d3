"""`python -m generator`: list, emit, build, cache and explain kernel variants.

Data goes to stdout (one JSON document with --json), progress and logs to stderr. Exit codes:
0 ok, 1 build or verify failure, 2 usage error (a one-line message naming the argument).
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import time
from pathlib import Path
from typing import Any

from generator import __version__, cache_cli
from generator.argtypes import OneLineParser, UsageError, positive_int
from generator.errors import MlaGenError, SpecError, ToolchainError
from generator.spec import Arch, DType, Family, Tile, VariantSpec

PROG = "python -m generator"
DEFAULT_ARCH = "sm_90a"
KV_DTYPE_HELP = ("latent cache: the --dtype (default), fp8_e4m3 (one fp32 scale per tensor) or fp8_ds_mla (656-byte "
                 "tokens, one fp32 scale per 128 values; ckv 512, rope 64, bf16 q); fp8 caches: narrow, seesaw "
                 "(fp8_e4m3), wgmma, mma")
_FIELD_FLAGS = {"num_heads": "--heads", "ckv_dim": "--ckv", "rope_dim": "--rope", "arch": "--arch",
                "preset": "--preset", "family": "--family", "tile": "--tile", "dtype": "--dtype",
                "q_dtype": "--dtype", "kv_dtype": "--kv-dtype", "tp": "--tp", "s_q": "--s-q", "variant id": "--id"}


def _usage_message(err: SpecError) -> str:
    text = str(err)
    field = text.split(":", 1)[0]
    flag = _FIELD_FLAGS.get(field) or _FIELD_FLAGS.get(field.split(".")[0])
    return f"argument {flag}: {text}" if flag else text


# -- selection of variants ---------------------------------------------------------------------------

def _add_selection(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("variant selection (a preset, or explicit dims)")
    g.add_argument("--preset", action="append", metavar="NAME",
                   help="model preset (repeatable); see `list --presets`")
    g.add_argument("--heads", type=int, nargs="+", metavar="H", help="query heads per GPU")
    g.add_argument("--ckv", type=int, metavar="C", help="compressed kv width (kv_lora_rank), e.g. 512")
    g.add_argument("--rope", type=int, metavar="R", help="rope width (qk_rope_head_dim), e.g. 64")
    g.add_argument("--dtype", default=None, help="bf16 or fp16 (default: the preset's, else bf16)")
    g.add_argument("--kv-dtype", default=None, help=KV_DTYPE_HELP)
    g.add_argument("--arch", default=DEFAULT_ARCH, help=f"compile target, e.g. sm_80, sm_90a (default {DEFAULT_ARCH})")
    g.add_argument("--family", action="append", metavar="F",
                   help="kernel family (repeatable): simt, mma, wgmma, narrow, seesaw (default: the one dispatch "
                        "picks for the rows)")
    g.add_argument("--tile", default=None, help="tile override, e.g. m16n32s1w8")
    g.add_argument("--s-q", type=positive_int, nargs="+", default=[1], dest="s_q", metavar="N",
                   help="query tokens per request the tiles are chosen for (default 1; rows = heads x s_q)")
    g.add_argument("--tp", type=int, action="append", metavar="N", help="tensor-parallel sizes of a preset")
    g.add_argument("--id", action="append", metavar="VARIANT_ID", help="an explicit variant id (repeatable)")
    g.add_argument("--filter", default=None, metavar="GLOB", help="keep variant ids matching this glob")


def _select(args: argparse.Namespace) -> list[VariantSpec]:
    from generator.presets import preset_variants
    from generator.select import default_tile, dispatch_specs

    arch = Arch.parse(args.arch)
    dtype = DType.parse(args.dtype) if args.dtype else None
    kv_dtype = DType.parse(args.kv_dtype, "kv_dtype") if args.kv_dtype else None
    families = [Family.parse(f) for f in args.family] if args.family else None
    specs: list[VariantSpec] = [VariantSpec.from_id(i) for i in (args.id or [])]
    for name in args.preset or []:
        found = preset_variants(name, arch, dtype=dtype, families=families, tp_sizes=args.tp, kv_dtype=kv_dtype,
                                s_q=tuple(args.s_q))
        if args.tile:
            found = [VariantSpec(s.num_heads, s.ckv_dim, s.rope_dim, s.q_dtype, s.kv_dtype, s.out_dtype,
                                 s.family, Tile.parse(args.tile), s.arch) for s in found]
        specs += found
    if args.heads or args.ckv or args.rope:
        if not (args.heads and args.ckv and args.rope):
            raise UsageError("arguments --heads, --ckv and --rope go together")
        dt = dtype or DType.BF16
        kv = kv_dtype or dt
        tile = Tile.parse(args.tile) if args.tile else None
        # no --family: the variant dispatch picks for the rows, so that `build` makes what a call will load
        for h in args.heads:
            for fam in families or [None]:
                for s_q in args.s_q:
                    if fam is None:
                        specs += dispatch_specs(arch=arch, num_heads=h, ckv_dim=args.ckv, rope_dim=args.rope,
                                                dtype=dt, s_q=s_q, kv_dtype=kv, tile=tile)
                    else:
                        specs.append(VariantSpec(h, args.ckv, args.rope, dt, kv, dt, fam,
                                                 tile or default_tile(fam, h, args.ckv, args.rope, arch, s_q, kv), arch))
    if not specs:
        raise UsageError("no variants selected: give --preset, --heads/--ckv/--rope or --id")
    specs = list(dict.fromkeys(specs))
    if args.filter:
        specs = [s for s in specs if fnmatch.fnmatch(s.variant_id, args.filter)]
    return specs


def _spec_row(spec: VariantSpec) -> dict[str, Any]:
    return {"variant_id": spec.variant_id, **spec.to_dict(), "scale_granularity": spec.kv_dtype.scale_granularity,
            "smem_bytes": spec.smem_bytes, "threads": spec.threads}


# -- commands -----------------------------------------------------------------------------------------

def cmd_list(args: argparse.Namespace) -> int:
    if args.presets:
        from generator.presets import model_config, preset_names

        rows = []
        for name in preset_names():
            cfg = model_config(name)
            rows.append({"preset": name, "num_heads": cfg.num_heads, "ckv_dim": cfg.kv_lora_rank,
                         "rope_dim": cfg.qk_rope_head_dim, "tp_heads": cfg.tp_heads(),
                         "sm_scale": cfg.sm_scale if cfg.sm_scale_known else None})
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for r in rows:
                print(f"{r['preset']:20s} heads {r['num_heads']:4d}  ckv {r['ckv_dim']}  rope {r['rope_dim']}  "
                      f"tp heads {r['tp_heads']}  sm_scale "
                      + (f"{r['sm_scale']:.6f}" if r["sm_scale"] is not None else "unknown (pass it explicitly)"))
        return 0
    specs = _select(args)
    if args.json:
        print(json.dumps([_spec_row(s) for s in specs], indent=2))
    else:
        for s in specs:
            print(f"{s.variant_id}  kv {s.kv_dtype.cli_name}  smem {s.smem_bytes} B  threads {s.threads}")
    return 0


def _write_folder(folder: Path, files: dict[str, str]) -> None:
    """emit's files into `folder`; a folder that cannot be made or written is a usage error of --out."""
    from generator.build import write_if_different

    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            write_if_different(folder / name, text)
    except OSError as e:
        raise UsageError(f"argument --out: cannot write {e.filename or folder}: {e.strerror}") from None


def cmd_emit(args: argparse.Namespace) -> int:
    from generator.render import render_sources

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"argument --out: {out} is a file, expected a folder")
    try:
        from generator.toolchain import toolchain
        tc = toolchain()
    except ToolchainError:
        tc = None  # sources are still worth reading; build.ninja then names plain `nvcc` and `c++`
    written = []
    for spec in _select(args):
        folder = out / spec.arch.value / spec.variant_id
        _write_folder(folder, {**render_sources(spec), "build.ninja": _emit_ninja(spec, tc)})
        written.append({"variant_id": spec.variant_id, "folder": str(folder)})
    written.append(_emit_launcher(out, tc))
    if args.compile_commands:
        from generator.compile_db import write

        db = write(out, [Path(w["folder"]) for w in written])
        print(f"wrote {db}", file=sys.stderr)
    if args.json:
        print(json.dumps(written, indent=2))
    else:
        for w in written:
            print(w["folder"])
    return 0


def _emit_ninja(spec: VariantSpec, tc: Any) -> str:
    from generator.render import render_ninja

    if tc is not None:
        return render_ninja(spec, nvcc=str(tc.nvcc), nvcc_flags=tc.nvcc_flags(spec.arch), ldflags=tc.link_flags(),
                            so_name=spec.variant_id + ".so")
    return render_ninja(spec, nvcc="nvcc", nvcc_flags=["-std=c++17", "-O3", spec.arch.gencode, "-Xcompiler", "-fPIC",
                        "-I."], ldflags=["-shared"], so_name=spec.variant_id + ".so")


def _emit_launcher(out: Path, tc: Any) -> dict[str, str]:
    """The launcher's sources (shared by every variant) into OUT/launcher/<name>/."""
    from generator.cache import LAUNCHER_FOLDER, this_ext_suffix
    from generator.launcher import launcher_name, plan_launcher
    from generator.render import LAUNCHER_MODULE, render_launcher_ninja, render_launcher_sources

    if tc is not None:
        plan = plan_launcher(tc)
        name, sources, ninja = plan.name, plan.sources, plan.ninja
    else:
        name, sources = launcher_name(this_ext_suffix()), render_launcher_sources()
        ninja = render_launcher_ninja(launcher_name=name, cxx="c++", cxx_flags=["-std=c++17", "-O2", "-fPIC", "-I."],
                                      ldflags=["-shared", "-ldl"], so_name=LAUNCHER_MODULE + this_ext_suffix())
    folder = out / LAUNCHER_FOLDER / name
    _write_folder(folder, {**sources, "build.ninja": ninja})
    return {"launcher": name, "folder": str(folder)}


def cmd_build(args: argparse.Namespace) -> int:
    from generator.build import build_many
    from generator.cache import BinaryCache

    specs = _select(args)
    cache = BinaryCache(args.out) if args.out else BinaryCache()
    total, done = len(specs), [0]
    rows: list[dict[str, Any]] = []

    def progress(spec, res, err) -> None:
        done[0] += 1
        if err is None:
            what = f"built in {res.seconds:.1f} s" if res.built else f"cached ({res.seconds * 1e3:.0f} ms)"
            print(f"[{done[0]}/{total}] {spec.variant_id}: {what} -> {res.entry.path}", file=sys.stderr, flush=True)
            rows.append({"variant_id": spec.variant_id, "ok": True, "built": res.built,
                         "seconds": round(res.seconds, 3), "entry": str(res.entry.path)})
        else:
            print(f"[{done[0]}/{total}] {spec.variant_id}: FAILED\n{err}", file=sys.stderr, flush=True)
            rows.append({"variant_id": spec.variant_id, "ok": False, "error": str(err)})

    def launcher_ready(res) -> None:
        what = f"built in {res.seconds:.1f} s" if res.built else "cached"
        print(f"launcher for this Python {res.entry.name}: {what} -> {res.entry.path}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    build_many(specs, args.jobs, cache, progress, launcher_ready)
    failed = sum(not r["ok"] for r in rows)
    print(f"{total - failed}/{total} variants ready in {time.perf_counter() - start:.1f} s (cache {cache.root})",
          file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2))
    return 1 if failed else 0


def cmd_explain(args: argparse.Namespace) -> int:
    from generator.select import decide

    decision = decide(arch=Arch.parse(args.arch), num_heads=args.heads, ckv_dim=args.ckv, rope_dim=args.rope,
                      dtype=DType.parse(args.dtype), s_q=args.s_q, sm_count=args.sm_count,
                      ctas_per_sm=args.ctas_per_sm, family=Family.parse(args.family) if args.family else None,
                      num_parts=args.num_parts, batch=args.batch, mean_seqlen=args.seqlen,
                      kv_dtype=DType.parse(args.kv_dtype, "kv_dtype") if args.kv_dtype else None,
                      page_size=args.page_size)
    kv = decision.spec.kv_dtype
    if args.json:
        print(json.dumps({**decision.to_dict(), "scale_granularity": kv.scale_granularity}, indent=2))
    else:
        print(f"variant  {decision.spec.variant_id}")
        print(f"kv       {kv.cli_name}, " + (f"one fp32 scale per {kv.scale_granularity}" if kv.is_fp8
                                              else "q's dtype, unscaled"))
        print(f"grid     {decision.m_blocks} row block(s) x {decision.num_parts} parts, "
              f"{decision.spec.threads} threads, {decision.spec.smem_bytes} B shared memory per CTA")
        print("why:")
        for r in decision.reasons:
            print(f"  - {r}")
    return 0


# -- parser -------------------------------------------------------------------------------------------

def make_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description="mla-gen's kernel compiler: list, emit, build and cache MLA decode "
                                       "kernel variants, and explain dispatch decisions.")
    p.add_argument("--version", action="version", version=f"mla-gen {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=OneLineParser)

    s = sub.add_parser("list", help="list the variants of a preset or of explicit dims",
                       description="List variants (id, shared memory, threads). --presets lists the model presets.")
    _add_selection(s)
    s.add_argument("--presets", action="store_true", help="list the model presets instead")
    s.add_argument("--json", action="store_true", help="print one JSON document")
    s.set_defaults(fn=cmd_list)

    s = sub.add_parser("emit", help="write sources and build.ninja to a folder",
                       description="Render each variant's sources and build.ninja into OUT/<arch>/<variant-id>/, "
                                   "and the launcher's (one per Python, shared by every variant) into "
                                   "OUT/launcher/<name>/.")
    _add_selection(s)
    s.add_argument("--out", default="build", help="output folder (default build/)")
    s.add_argument("--json", action="store_true", help="print one JSON document")
    s.add_argument("--compile-commands", action="store_true",
                   help="also write OUT/compile_commands.json (clangd) over the emitted .cu and .cpp")
    s.set_defaults(fn=cmd_emit)

    s = sub.add_parser("build", help="compile variants into the cache (or --out)",
                       description="Compile variants ahead of time, -j at once; one progress line per variant.")
    _add_selection(s)
    s.add_argument("--out", default=None, help="cache root to build into (default $MLA_GEN_CACHE_DIR)")
    s.add_argument("-j", "--jobs", type=positive_int, default=2, help="variants built at once (default 2)")
    s.add_argument("--json", action="store_true", help="print one JSON document")
    s.set_defaults(fn=cmd_build)

    cache_cli.add_parser(sub)

    s = sub.add_parser("explain", help="print the dispatch decision for a shape and why",
                       description="The variant, grid and split-kv plan that dispatch picks, with reasons.")
    s.add_argument("--heads", type=int, required=True)
    s.add_argument("--ckv", type=int, required=True)
    s.add_argument("--rope", type=int, required=True)
    s.add_argument("--dtype", default="bf16")
    s.add_argument("--kv-dtype", default=None, help=KV_DTYPE_HELP)
    s.add_argument("--arch", default=DEFAULT_ARCH)
    s.add_argument("--batch", type=positive_int, default=None)
    s.add_argument("--seqlen", type=positive_int, default=None, help="mean cache length per request")
    s.add_argument("--s-q", type=positive_int, default=1, dest="s_q", help="query tokens per request")
    s.add_argument("--page-size", type=positive_int, default=None, help="the cache's page size (default: one of "
                   "whole TMA boxes, e.g. 64)")
    s.add_argument("--sm-count", type=positive_int, default=132, help="SMs of the device (default 132, H100 SXM)")
    s.add_argument("--ctas-per-sm", type=positive_int, default=None)
    s.add_argument("--family", default=None)
    s.add_argument("--num-parts", type=positive_int, default=None)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_explain)
    return p


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Runs one command; `prog` names the program in usage lines and errors."""
    parser = make_parser(prog)
    try:
        args = parser.parse_args(argv)
        return args.fn(args)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except SpecError as e:
        print(f"{prog}: error: {_usage_message(e)}", file=sys.stderr)
        return 2
    except MlaGenError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `... | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0


def console_main() -> int:
    """The `mla-gen` console script: the same commands, named as the user typed them."""
    return main(prog=Path(sys.argv[0]).name or PROG)
