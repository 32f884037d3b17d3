"""`python -m generator cache`: ls, info, verify, prune and clear the binary cache.

Data on stdout (one JSON document with --json), what could not be done on stderr. Exit codes: 0 ok,
1 a corrupt entry (verify) or something that could not be removed (prune, clear), 2 usage error.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from typing import Any

from generator.argtypes import OneLineParser, UsageError
from generator.errors import SpecError
from generator.spec import VariantSpec


def add_parser(sub: Any) -> None:
    """The `cache` command and its subcommands, on the main parser's subparsers."""
    s = sub.add_parser("cache", help="inspect and manage the binary cache",
                       description="ls: entries; info QUERY: one entry's meta.json; verify [QUERY]: checksums "
                                   "and a test load (exit 1 if any is corrupt); prune: drop unused entries "
                                   "and leftovers; clear: drop everything.")
    s.add_argument("--root", default=None, help="cache root (default $MLA_GEN_CACHE_DIR or ~/.cache/mla_gen)")
    csub = s.add_subparsers(dest="cache_cmd", parser_class=OneLineParser)  # none given: run() lists them
    c = csub.add_parser("ls", help="list entries")
    c.add_argument("--json", action="store_true")
    c = csub.add_parser("info", help="show one entry's metadata")
    c.add_argument("query", help="variant id, id prefix, entry name or entry path")
    c.add_argument("--json", action="store_true", help="print meta.json and the checks as one JSON document")
    c = csub.add_parser("verify", help="check checksums and that binaries load (read-only)")
    c.add_argument("query", nargs="?", default=None)
    c.add_argument("--json", action="store_true")
    c = csub.add_parser("prune", help="remove entries unused for N days and leftovers")
    c.add_argument("--unused-days", type=float, default=30.0, help="default 30")
    c.add_argument("--dry-run", action="store_true")
    c.add_argument("--json", action="store_true")
    c = csub.add_parser("clear", help="remove every entry")
    c.add_argument("--json", action="store_true")
    s.set_defaults(fn=run)


def _fmt_time(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M") if ts else "-"


def run(args: argparse.Namespace) -> int:
    from generator.cache import BinaryCache

    cache = BinaryCache(args.root) if args.root else BinaryCache()
    commands = {"ls": _cache_ls, "info": _cache_info, "verify": _cache_verify, "prune": _cache_prune,
                "clear": _cache_clear}
    if args.cache_cmd not in commands:
        raise UsageError(f"cache: expected a command: {', '.join(commands)}")
    return commands[args.cache_cmd](cache, args)


def _kv_dtype(e: Any) -> str | None:
    """A variant entry's cache dtype, read from its name (<variant id>-<hash12>), so a corrupt entry shows
    it too; None for a launcher or a name that holds no variant id."""
    if e.kind != "variant":
        return None
    try:
        return VariantSpec.from_id(e.name.rsplit("-", 1)[0]).kv_dtype.cli_name
    except SpecError:
        return None


def _entry_row(e: Any) -> dict[str, Any]:
    problems = e.problems()
    meta = {} if problems else e.meta()
    return {"entry": e.name, "kind": e.kind, "arch": e.arch, "kv_dtype": _kv_dtype(e), "path": str(e.path),
            "ok": not problems, "problems": problems, "size_bytes": e.size_bytes(),
            "build_seconds": meta.get("build_seconds"), "created": meta.get("created"), "last_used": meta.get("last_used")}


def _cache_ls(cache: Any, args: argparse.Namespace) -> int:
    rows = [_entry_row(e) for e in cache.entries()]
    if args.json:
        print(json.dumps({"root": str(cache.root), "entries": rows}, indent=2))
        return 0
    print(f"# cache {cache.root}: {len(rows)} entries")
    for r in rows:
        state = "ok" if r["ok"] else "CORRUPT"
        print(f"{r['arch']:8s} {r['kv_dtype'] or '-':10s} {r['entry']}  {r['size_bytes'] / 1e6:6.2f} MB  built "
              f"{_fmt_time(r['created'])} in {r['build_seconds'] or 0:.1f} s  used {_fmt_time(r['last_used'])}  {state}")
    return 0


def _launchers_for(cache: Any, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The launcher entries of this cache that open a variant (one per Python), this Python's marked."""
    from generator.cache import this_ext_suffix

    out = []
    for e in cache.entries():
        if e.kind == "launcher" and not e.problems():
            lm = e.meta()
            if lm["params_hash"] == meta["launcher"]["params_hash"]:
                out.append({"path": str(e.path), "ext_suffix": lm["ext_suffix"],
                            "this_python": lm["ext_suffix"] == this_ext_suffix()})
    return out


def _cache_info(cache: Any, args: argparse.Namespace) -> int:
    found = cache.find(args.query)
    if not found:
        raise UsageError(f"argument query: no cache entry matches {args.query!r} in {cache.root}")
    docs = []
    for e in found:
        problems = e.problems()
        meta = None if any("meta.json" in p for p in problems) else e.meta()
        doc = {"path": str(e.path), "kind": e.kind, "ok": not problems, "problems": problems, "meta": meta}
        if meta is not None and e.kind == "variant":
            doc["launchers"] = _launchers_for(cache, meta)
        docs.append(doc)
    if args.json:
        print(json.dumps(docs if len(docs) > 1 else docs[0], indent=2))
        return 0
    for doc in docs:
        meta = doc["meta"] or {}
        print(f"{doc['path']}  {doc['kind']}  {'ok' if doc['ok'] else 'CORRUPT'}")
        for p in doc["problems"]:
            print(f"    {p}")
        if meta:
            tc = meta["toolchain"]
            compilers = ", ".join(filter(None, [tc.get("nvcc_version") and f"nvcc {tc['nvcc_version']}",
                                                tc.get("cxx_version")]))
            print(f"  built    {_fmt_time(meta['created'])} in {meta['build_seconds']:.1f} s, used "
                  f"{_fmt_time(meta['last_used'])}; {compilers}")
            print(f"  binary   {meta['so']['file']} ({meta['so']['size']} bytes, sha256 {meta['so']['sha256'][:16]})")
        if doc["kind"] == "launcher" and meta:
            print(f"  python   {meta['ext_suffix']}; params.h {meta['params_hash']}")
        if doc["kind"] == "variant" and meta:
            print(f"  launcher params.h {meta['launcher']['params_hash']}, built with {meta['launcher']['built_with']}")
            for lr in doc["launchers"]:
                print(f"           {lr['path']} ({lr['ext_suffix']}{', this Python' if lr['this_python'] else ''})")
            for k in meta["ptxas"]:
                print(f"  ptxas    {k['function']}: {k.get('registers')} registers, spill "
                      f"{k.get('spill_stores')}/{k.get('spill_loads')} B")
    return 0


def _cache_verify(cache: Any, args: argparse.Namespace) -> int:
    import os

    entries = cache.find(args.query) if args.query else cache.entries()
    rows, bad = [], 0
    for e in entries:
        problems = e.problems()
        if not problems:
            err = e.load_check()
            if err:
                problems = [f"does not load: {err}"]
        if problems and not os.access(e.path.parent, os.W_OK):
            problems.append(f"the cache is read-only here ({e.path.parent}): the entry cannot be rebuilt; "
                            f"rebuild it where the cache is writable")
        bad += bool(problems)
        rows.append({"entry": str(e.path), "ok": not problems, "problems": problems})
        if not args.json:
            print(f"{'ok     ' if not problems else 'CORRUPT'} {e.path}" + "".join(f"\n    {p}" for p in problems))
    if args.json:
        print(json.dumps({"root": str(cache.root), "entries": rows, "corrupt": bad}, indent=2))
    print(f"{len(entries) - bad}/{len(entries)} entries ok", file=sys.stderr)
    return 1 if bad else 0


def _report_removal(cache: Any, result: Any, args: argparse.Namespace, doc: dict[str, Any]) -> int:
    """Prints what was removed (stdout) and what could not be (stderr); exit 1 if anything stayed."""
    failed = [{"path": str(p), "error": why} for p, why in result.failed]
    if args.json:
        print(json.dumps({**doc, "failed": failed}, indent=2))
    for f in failed:
        print(f"error: could not remove {f['path']}: {f['error']}", file=sys.stderr)
    return 1 if failed else 0


def _cache_prune(cache: Any, args: argparse.Namespace) -> int:
    result = cache.prune(args.unused_days, dry_run=args.dry_run)
    if not args.json:
        for p in result.removed:
            print(("would remove " if args.dry_run else "removed ") + str(p))
    return _report_removal(cache, result, args, {"removed": [str(p) for p in result.removed], "dry_run": args.dry_run})


def _cache_clear(cache: Any, args: argparse.Namespace) -> int:
    result = cache.clear()
    n = sum(p.parent.parent == cache.root for p in result.removed)
    if not args.json:
        print(f"removed {n} entries from {cache.root}")
    return _report_removal(cache, result, args, {"root": str(cache.root), "removed_entries": n})
