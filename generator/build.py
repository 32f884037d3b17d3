"""Builds: a VariantSpec (or the launcher) -> sources + build.ninja in a temp dir -> ninja -> a
published cache entry.

`build(spec)` and `ensure(plan)` are idempotent and safe across processes: fast path without a
lock, then a per-entry file lock, a re-check, and one build. `build_many` runs several variants in
parallel, and the launcher beside them.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import re
import shutil
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import filelock

from generator import __version__, env
from generator.cache import META, SCHEMA, BinaryCache, Entry, sha256_file, write_json_atomic
from generator.errors import BuildError, CacheError
from generator.render import params_hash, render_ninja, render_sources
from generator.spec import VariantSpec
from generator.toolchain import Toolchain, toolchain

LOCK_TIMEOUT_S = 1800.0


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    """Everything one entry's build needs (a variant, or the launcher), and the cache key that names it."""
    kind: str                 # "variant" or "launcher"
    name: str                 # the variant id, or the launcher's name (it carries the Python ABI tag)
    folder: str               # the cache folder of its entries: the arch, or "launcher"
    sources: dict[str, str]
    ninja: str                # build.ninja
    binary: str               # file name of the shared object it builds
    key: str                  # sha256 hex of sources, flags and toolchain fingerprint
    meta: dict[str, Any]      # the kind's own fields of meta.json

    @property
    def entry_name(self) -> str:
        return f"{self.name}-{self.key[:12]}"

    @property
    def sources_sha256(self) -> str:
        return sources_sha256(self.sources)


def sources_sha256(sources: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(sorted(sources.items())).encode()).hexdigest()


def plan_build(spec: VariantSpec, tc: Toolchain | None = None) -> BuildPlan:
    """Renders a variant's sources and computes its cache key (no Python ABI in it: a variant is a
    plain shared object). Raises ToolchainError without nvcc."""
    from generator.launcher import plan_launcher

    tc = tc or toolchain()
    sources = render_sources(spec)
    nvcc_flags, link_flags = tc.nvcc_flags(spec.arch), tc.link_flags()
    key = spec.content_hash(sources, nvcc_flags + ["|"] + link_flags, tc.fingerprint())
    binary = spec.variant_id + ".so"
    ninja = render_ninja(spec, nvcc=str(tc.nvcc), nvcc_flags=nvcc_flags, ldflags=link_flags, so_name=binary)
    meta = {"variant_id": spec.variant_id, "spec": spec.to_dict(),
            "flags": {"nvcc": nvcc_flags, "link": link_flags},
            "toolchain": {"nvcc": str(tc.nvcc), "nvcc_version": tc.nvcc_version, "cxx": str(tc.cxx),
                          "cxx_version": tc.cxx_version_text.strip(), "generator_version": __version__},
            # any Python's launcher of this params.h opens the variant; built_with: the one of its builder
            "launcher": {"params_hash": params_hash(), "built_with": plan_launcher(tc).entry_name}}
    return BuildPlan("variant", spec.variant_id, spec.arch.value, sources, ninja, binary, key, meta)


def write_if_different(path: Path, text: str) -> None:
    """Rewrites a file only when its text changed, so ninja does not rebuild for nothing."""
    if path.is_file() and path.read_text() == text:
        return
    path.write_text(text)


def write_sources(plan: BuildPlan, folder: Path) -> None:
    """The entry's sources and build.ninja (no dates or temp paths in them)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in plan.sources.items():
        write_if_different(folder / name, text)
    write_if_different(folder / "build.ninja", plan.ninja)


_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(\S+)'")
_PTXAS_PROPS = re.compile(r"Function properties for (\S+)")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")
_KERNEL_NAME = re.compile(r"\d+((?:[a-z]+_)*kernel)")


def parse_ptxas(log: str) -> list[dict[str, object]]:
    """Per kernel: registers, stack frame, spill stores/loads, static smem, from `ptxas -v` lines. A device function
    compiled as a call (__noinline__) gets its own record (entry False: its frame and spills, no registers), so its
    figures never stand in for the kernel's."""
    out: list[dict[str, object]] = []
    current: dict[str, object] | None = None  # the entry being compiled
    target: dict[str, object] | None = None   # the function whose properties the next frame line gives
    for line in log.splitlines():
        m = _PTXAS_ENTRY.search(line)
        if m:
            short = _KERNEL_NAME.search(m.group(1))
            current = target = {"function": short.group(1) if short else m.group(1), "mangled": m.group(1),
                                "arch": m.group(2), "entry": True}
            out.append(current)
            continue
        if current is None:
            continue
        m = _PTXAS_PROPS.search(line)
        if m:
            target = current
            if m.group(1) != current["mangled"]:
                target = {"function": m.group(1), "mangled": m.group(1), "arch": current["arch"], "entry": False}
                out.append(target)
            continue
        m = _PTXAS_FRAME.search(line)
        if m and target is not None:
            target.update(stack_bytes=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = _PTXAS_USED.search(line)
        if m:
            current.update(registers=int(m.group(1)), static_smem=int(m.group(2) or 0))
    return out


def _first_errors(log: str, limit: int = 20) -> str:
    lines = [ln for ln in log.splitlines() if re.search(r"\berror\b|Error|FAILED", ln)]
    return "\n".join(lines[:limit]) or "\n".join(log.strip().splitlines()[-limit:])


def run_ninja(plan: BuildPlan, folder: Path) -> tuple[str, float]:
    """Runs ninja in `folder`; returns (log, seconds). Raises BuildError with the compiler's message."""
    ninja = shutil.which("ninja")
    if ninja is None:
        raise BuildError(plan.name, "ninja not found on PATH; `pip install ninja`", None)
    cmd = [ninja, "-C", str(folder), "-v"]
    if env.build_jobs():
        cmd += ["-j", str(env.build_jobs())]
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - start
    log = proc.stdout
    (folder / "build.log").write_text(log)
    if proc.returncode != 0:
        raise BuildError(plan.name, _first_errors(log), folder / "build.log")
    return log, seconds


def build_into(plan: BuildPlan, cache: BinaryCache) -> Entry:
    """Builds in a fresh temp dir and publishes the entry (no locking: callers hold the lock).

    Raises BuildError (the compiler failed: its temp dir is kept under .failed/ for reading) or
    CacheError (the cache could not be written, e.g. a full disk); nothing is published then."""
    temp = cache.new_temp_dir(plan.folder, plan.entry_name)
    try:
        try:
            write_sources(plan, temp)
            log, seconds = run_ninja(plan, temp)
        except BuildError as e:
            failed = cache.failed_dir(plan.folder, plan.entry_name)
            shutil.rmtree(failed, ignore_errors=True)
            failed.parent.mkdir(parents=True, exist_ok=True)
            temp.rename(failed)  # kept for reading: the log and the sources that failed
            raise BuildError(e.variant_id, e.compiler_message, failed / "build.log") from None
        for junk in list(temp.glob("*.o")) + list(temp.glob("*.d")) + list(temp.glob(".ninja_*")):
            junk.unlink()
        binary = temp / plan.binary
        now = time.time()
        meta = {"schema": SCHEMA, "kind": plan.kind, "name": plan.name, "key": plan.key, **plan.meta,
                "sources_sha256": plan.sources_sha256,
                "so": {"file": plan.binary, "sha256": sha256_file(binary), "size": binary.stat().st_size},
                "build_seconds": round(seconds, 3), "created": now, "last_used": now}
        if plan.kind == "variant":
            meta["ptxas"] = parse_ptxas(log)
        write_json_atomic(temp / META, meta)  # written last: an entry with meta.json is whole
        entry = cache.entry(plan.folder, plan.entry_name)
        cache.publish(temp, entry)
        return entry
    except OSError as e:  # ENOSPC, EFBIG, EROFS: the cache folder, not the sources, is at fault
        raise CacheError(f"{plan.name}: cannot write the build in {cache.root}: {e}; nothing was published") from None
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class BuildResult:
    entry: Entry
    built: bool        # False: it was already in the cache
    seconds: float     # wall time of this request (waiting on another builder included)


def build(spec: VariantSpec, cache: BinaryCache | None = None, plan: BuildPlan | None = None) -> BuildResult:
    """Ensures the variant is in the cache, building it at most once across processes (see ensure)."""
    return ensure(plan or plan_build(spec), cache or BinaryCache())


def ensure(plan: BuildPlan, cache: BinaryCache) -> BuildResult:
    """Ensures the planned entry is in the cache, building it at most once across processes.

    A corrupt entry is moved aside (with a warning) and rebuilt. Raises BuildError, CacheError."""
    start = time.perf_counter()
    entry = cache.entry(plan.folder, plan.entry_name)
    if entry.path.exists() and not entry.problems():
        return BuildResult(entry, False, time.perf_counter() - start)
    lock_file = cache.lock_path(plan.folder, plan.entry_name)
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CacheError(f"cannot create the lock folder {lock_file.parent}: {e}; set MLA_GEN_CACHE_DIR "
                         f"(or MLA_GEN_LOCK_DIR) to a writable folder") from None
    try:
        with filelock.FileLock(str(lock_file), timeout=LOCK_TIMEOUT_S):
            if entry.path.exists():
                problems = entry.problems()
                if not problems:
                    return BuildResult(entry, False, time.perf_counter() - start)
                warnings.warn(f"mla-gen: rebuilding corrupt cache entry {entry.path}: {'; '.join(problems)}",
                              stacklevel=3)
                cache.discard(entry)
            cache.remove_stale_temps(plan.folder, plan.entry_name)
            entry = build_into(plan, cache)
            return BuildResult(entry, True, time.perf_counter() - start)
    except filelock.Timeout:
        raise CacheError(f"{plan.name}: waited {LOCK_TIMEOUT_S:.0f} s for the build lock {lock_file}; "
                         f"is another build stuck?") from None


def build_many(specs: Iterable[VariantSpec], jobs: int, cache: BinaryCache | None = None,
               on_done: Callable[[VariantSpec, BuildResult | None, Exception | None], None] | None = None,
               on_launcher: Callable[[BuildResult], None] | None = None
               ) -> list[tuple[VariantSpec, BuildResult | None, Exception | None]]:
    """Builds variants in parallel (`jobs` at once), and this Python's launcher beside them, so that a
    warm load needs no compiler; calls on_done per variant as it finishes, on_launcher once the
    launcher is ready. Raises BuildError or CacheError when the launcher fails."""
    from generator.launcher import plan_launcher

    cache = cache or BinaryCache()
    tc = toolchain()
    specs = list(dict.fromkeys(specs))
    results: list[tuple[VariantSpec, BuildResult | None, Exception | None]] = []

    def one(spec: VariantSpec) -> BuildResult:
        return build(spec, cache, plan_build(spec, tc))

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        launcher = pool.submit(ensure, plan_launcher(tc), cache)
        futures = {pool.submit(one, s): s for s in specs}
        for fut in concurrent.futures.as_completed(futures):
            spec = futures[fut]
            try:
                res, err = fut.result(), None
            except Exception as e:  # reported per variant; the caller decides the exit code
                res, err = None, e
            results.append((spec, res, err))
            if on_done:
                on_done(spec, res, err)
        ready = launcher.result()  # a failed launcher raises here, after every variant was reported
        if on_launcher:
            on_launcher(ready)
    return results
