"""The launcher: one small pybind11 module per Python ABI (and host compiler and params.h), built
once and shared by every variant. It binds DecodeParams and opens a variant's shared object through
its C entry points (params.h), so a variant compiles only its kernel code and needs no Python.

Its entries live in <root>/launcher/<launcher-name>-<hash12>/; the name, key and meta.json carry the
Python ABI tag, and a launcher built for another Python is never imported.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import logging
import re
import threading
import warnings
from pathlib import Path
from types import ModuleType

from generator import __version__, env
from generator.build import BuildPlan, ensure, sources_sha256
from generator.cache import LAUNCHER_FOLDER, BinaryCache, Entry, this_ext_suffix
from generator.errors import CacheError, MissingJITCacheError, ToolchainError
from generator.render import LAUNCHER_MODULE, params_hash, render_launcher_ninja, render_launcher_sources
from generator.toolchain import Toolchain, toolchain

log = logging.getLogger("mla_gen.jit")


def launcher_name(ext_suffix: str) -> str:
    """e.g. launcher_cpython_312_x86_64_linux_gnu for .cpython-312-x86_64-linux-gnu.so"""
    tag = re.sub(r"[^a-z0-9]+", "_", ext_suffix.lower().removesuffix(".so")).strip("_")
    return f"launcher_{tag}" if tag else "launcher"


def plan_launcher(tc: Toolchain | None = None) -> BuildPlan:
    """The launcher's sources and cache key for this Python. Raises ToolchainError."""
    tc = tc or toolchain()
    sources = render_launcher_sources()
    cxx_flags, link_flags = tc.launcher_cxx_flags(), tc.launcher_link_flags()
    name = launcher_name(tc.ext_suffix)
    binary = LAUNCHER_MODULE + tc.ext_suffix
    # include folders are left out of the key: one pybind11 release in two venvs builds the same module
    flags = [f for f in cxx_flags if not f.startswith("-isystem")] + ["|"] + link_flags
    key = hashlib.sha256(json.dumps({"sources": sorted(sources.items()), "flags": flags,
                                     "toolchain": tc.launcher_fingerprint()}, sort_keys=True).encode()).hexdigest()
    ninja = render_launcher_ninja(launcher_name=name, cxx=str(tc.cxx), cxx_flags=cxx_flags, ldflags=link_flags,
                                  so_name=binary)
    meta = {"module": LAUNCHER_MODULE, "ext_suffix": tc.ext_suffix, "params_hash": params_hash(),
            "flags": {"cxx": cxx_flags, "link": link_flags},
            "toolchain": {"cxx": str(tc.cxx), "cxx_version": tc.cxx_version_text.strip(),
                          "generator_version": __version__, "pybind11_version": tc.pybind11_version}}
    return BuildPlan("launcher", name, LAUNCHER_FOLDER, sources, ninja, binary, key, meta)


def _fits_this_python(meta: dict) -> bool:
    return (meta["kind"] == "launcher" and meta["ext_suffix"] == this_ext_suffix()
            and meta["params_hash"] == params_hash() and meta["toolchain"].get("generator_version") == __version__)


def find_launcher(cache: BinaryCache) -> Entry | None:
    """This Python's whole launcher entry, or None. Never builds, never writes. Without a toolchain,
    the newest whole entry built from the same sources for this Python."""
    try:
        plan = plan_launcher()
    except ToolchainError:
        want = sources_sha256(render_launcher_sources())
        return cache.newest_whole(LAUNCHER_FOLDER, launcher_name(this_ext_suffix()),
                                  lambda meta: _fits_this_python(meta) and meta["sources_sha256"] == want)
    return cache.whole_entry(LAUNCHER_FOLDER, plan.entry_name)


def import_launcher(entry: Entry) -> ModuleType:
    """Imports a launcher entry's module; ImportError when it was built for another Python or fails."""
    meta = entry.meta()
    if not _fits_this_python(meta):
        raise ImportError(f"{entry.path}: a launcher for {meta['ext_suffix']} (params.h {meta['params_hash']}), "
                          f"this Python needs {this_ext_suffix()} (params.h {params_hash()})")
    so = str(entry.so_path(meta))
    loader = importlib.machinery.ExtensionFileLoader(meta["module"], so)
    spec = importlib.util.spec_from_file_location(meta["module"], so, loader=loader)
    if spec is None:
        raise ImportError(f"cannot import {so}")
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


_loaded: dict[Path, ModuleType] = {}
_lock = threading.Lock()


def _import_once(entry: Entry) -> ModuleType:
    """Imports a launcher entry once per process (callers hold _lock); ImportError as import_launcher."""
    if entry.path not in _loaded:
        _loaded[entry.path] = import_launcher(entry)
        entry.touch()
    return _loaded[entry.path]


def try_load_launcher(cache: BinaryCache) -> ModuleType | None:
    """This Python's launcher if it is cached whole and imports, else None (logs why). Never builds."""
    with _lock:
        entry = find_launcher(cache)
        if entry is None:
            return None
        try:
            return _import_once(entry)
        except ImportError as e:
            log.warning("%s: cached launcher does not import: %s", entry.path, e)
            return None


def load_launcher(cache: BinaryCache) -> ModuleType:
    """This Python's launcher module, building it on a miss (MissingJITCacheError when
    MLA_GEN_DISABLE_JIT is set); imported once per process. Raises BuildError, ToolchainError,
    CacheError."""
    with _lock:
        entry = find_launcher(cache)
        if entry is not None:
            try:
                return _import_once(entry)
            except ImportError as e:
                # NOTE(load-check): as for variants (jit.load), a launcher that imports in a fresh
                # process is whole; a rebuild would not help this process.
                if entry.load_check() is None:
                    raise CacheError(f"{entry.path}: imports in a fresh process but not in this one: {e}") from None
                warnings.warn(f"mla-gen: cache entry {entry.path} does not import ({e}); rebuilding", stacklevel=2)
                cache.discard(entry)
        if env.disable_jit():
            raise MissingJITCacheError("the launcher", cache.root)
        entry = ensure(plan_launcher(), cache).entry
        try:
            return _import_once(entry)
        except ImportError as e:
            raise CacheError(f"{entry.path}: freshly built launcher does not import: {e}") from None
