"""The content-addressed binary cache (DESIGN.md section 4).

Layout: <root>/<arch>/<variant-id>-<hash12>/ holding a variant's sources, build.ninja, build.log,
its shared object and meta.json; <root>/launcher/<launcher-name>-<hash12>/ likewise for the
launcher of one Python ABI. Invariants: an entry is published whole (built in a .tmp- folder,
meta.json written last, renamed into place) or not at all; published entries are never rebuilt
in place (a corrupt one is moved aside first); loading needs no lock and no write access; a
meta.json that is not the document build wrote (bad JSON, a key missing, a wrong type) makes the
entry corrupt, like a bad checksum.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from generator import env
from generator.errors import CacheError

log = logging.getLogger("mla_gen.jit")

META = "meta.json"
SCHEMA = 2
_NUMBER = (int, float)
# meta.json's keys and their types, common to every entry and per kind
_META_KEYS: dict[str, type | tuple[type, ...]] = {
    "schema": int, "kind": str, "name": str, "key": str, "sources_sha256": str, "so": dict,
    "toolchain": dict, "flags": dict, "build_seconds": _NUMBER, "created": _NUMBER, "last_used": _NUMBER}
_KIND_KEYS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "variant": {"variant_id": str, "spec": dict, "launcher": dict, "ptxas": list},
    "launcher": {"module": str, "ext_suffix": str, "params_hash": str},
}
_SO_KEYS: dict[str, type | tuple[type, ...]] = {"file": str, "sha256": str, "size": int}
TOUCH_INTERVAL_S = 3600.0  # last_used is refreshed at most this often (it rewrites meta.json)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


LAUNCHER_FOLDER = "launcher"  # beside the arch folders; holds one launcher entry per Python ABI


def this_ext_suffix() -> str:
    """The extension-module suffix of this Python: its ABI tag, e.g. .cpython-312-x86_64-linux-gnu.so."""
    import sysconfig

    return sysconfig.get_config_var("EXT_SUFFIX") or ".so"


def _type_problem(doc: dict[str, Any], keys: dict[str, type | tuple[type, ...]], where: str) -> str | None:
    for key, want in keys.items():
        if key not in doc:
            return f"has no {where}{key!r}"
        value = doc[key]
        if isinstance(value, bool) or not isinstance(value, want):
            return f"{where}{key!r} is {type(value).__name__}, expected {getattr(want, '__name__', 'a number')}"
    return None


def _meta_problem(meta: Any) -> str | None:
    """What makes a parsed meta.json unusable, or None."""
    if not isinstance(meta, dict):
        return f"is a JSON {type(meta).__name__}, expected an object"
    if meta.get("schema") != SCHEMA:
        return f"schema {meta.get('schema')!r}, expected {SCHEMA}"
    problem = _type_problem(meta, _META_KEYS, "")
    if problem:
        return problem
    if meta["kind"] not in _KIND_KEYS:
        return f"kind {meta['kind']!r}, expected one of {sorted(_KIND_KEYS)}"
    problem = _type_problem(meta, _KIND_KEYS[meta["kind"]], "") or _type_problem(meta["so"], _SO_KEYS, "so.")
    if problem:
        return problem
    if Path(meta["so"]["file"]).name != meta["so"]["file"] or meta["so"]["file"] in ("", ".", ".."):
        return f"so.file {meta['so']['file']!r} is not a file name"
    return None


@dataclasses.dataclass(frozen=True)
class Entry:
    """One published cache entry."""
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def arch(self) -> str:
        return self.path.parent.name

    def meta(self) -> dict[str, Any]:
        """meta.json, checked for every key and type; raises CacheError when missing, unreadable or
        malformed (the entry is then corrupt)."""
        try:
            meta = json.loads((self.path / META).read_text())
        except FileNotFoundError:
            raise CacheError(f"{self.path}: meta.json is missing") from None
        except (OSError, ValueError) as e:
            raise CacheError(f"{self.path}: meta.json is unreadable: {e}") from None
        problem = _meta_problem(meta)
        if problem:
            raise CacheError(f"{self.path}: meta.json {problem}")
        return meta

    @property
    def kind(self) -> str:
        return "launcher" if self.arch == LAUNCHER_FOLDER else "variant"

    def so_path(self, meta: dict[str, Any] | None = None) -> Path:
        return self.path / (meta or self.meta())["so"]["file"]

    def problems(self) -> list[str]:
        """Why this entry cannot be loaded ([] when whole): meta, .so presence, size and checksum."""
        try:
            meta = self.meta()
        except CacheError as e:
            return [str(e)]
        if meta["kind"] != self.kind:
            return [f"{self.path}: meta.json says kind {meta['kind']!r}, its folder holds {self.kind} entries"]
        so = self.so_path(meta)
        if not so.is_file():
            return [f"{so}: missing"]
        size = so.stat().st_size
        if size != meta["so"]["size"]:
            return [f"{so}: {size} bytes, meta.json says {meta['so']['size']} (truncated or replaced)"]
        if sha256_file(so) != meta["so"]["sha256"]:
            return [f"{so}: sha256 differs from meta.json (corrupt)"]
        return []

    def load_check(self) -> str | None:
        """Opens the shared object in a fresh process (a variant through ctypes, a launcher by import);
        returns the error text, None when it opens. A launcher of another Python is not imported here."""
        meta = self.meta()
        so = str(self.so_path(meta))
        if meta["kind"] == "variant":
            code = ("import ctypes, sys\nlib = ctypes.CDLL(sys.argv[1])\n"
                    "for name in ('mla_gen_variant_id', 'mla_gen_params_hash'):\n"
                    "    getattr(lib, name).restype = ctypes.c_char_p\n"
                    "print(lib.mla_gen_variant_id().decode(), lib.mla_gen_params_hash().decode())\n")
            args, want = [so], f"{meta['variant_id']} {meta['launcher']['params_hash']}"
        elif meta["ext_suffix"] != this_ext_suffix():
            return None
        else:
            code = ("import importlib.machinery as m, importlib.util as u, sys\n"
                    "l = m.ExtensionFileLoader(sys.argv[2], sys.argv[1])\n"
                    "mod = u.module_from_spec(u.spec_from_file_location(sys.argv[2], sys.argv[1], loader=l))\n"
                    "l.exec_module(mod); print(mod.PARAMS_HASH)\n")
            args, want = [so, meta["module"]], meta["params_hash"]
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            return (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        if proc.stdout.strip() != want:
            return f"{so} reports {proc.stdout.strip()!r}, meta.json says {want!r}"
        return None

    def touch(self) -> None:
        """Refreshes last_used where the cache is writable (throttled); silent when read-only."""
        try:
            meta = self.meta()
            now = time.time()
            if now - meta["last_used"] < TOUCH_INTERVAL_S:
                return
            meta["last_used"] = now
            write_json_atomic(self.path / META, meta)
        except (OSError, CacheError):
            pass

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


class BinaryCache:
    """A cache root: $MLA_GEN_CACHE_DIR (default ~/.cache/mla_gen), or a build --out folder."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root).expanduser() if root is not None else env.cache_dir()

    def arch_dir(self, arch: str) -> Path:
        return self.root / arch

    def entry(self, arch: str, name: str) -> Entry:
        return Entry(self.arch_dir(arch) / name)

    def lock_path(self, arch: str, name: str) -> Path:
        """Per-entry lock file (flock via filelock; the OS drops it when the holder dies)."""
        base = env.lock_dir()
        if base is not None:
            return base / f"{arch}-{name}.lock"
        return self.arch_dir(arch) / ".locks" / f"{name}.lock"

    def new_temp_dir(self, arch: str, name: str) -> Path:
        path = self.arch_dir(arch) / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path

    def failed_dir(self, arch: str, name: str) -> Path:
        return self.arch_dir(arch) / ".failed" / name

    def publish(self, temp: Path, entry: Entry) -> bool:
        """Renames a finished temp dir into place; False (and the temp dir removed) if one exists."""
        try:
            os.rename(temp, entry.path)
            return True
        except OSError:
            if entry.path.exists():
                shutil.rmtree(temp, ignore_errors=True)
                return False
            raise

    def discard(self, entry: Entry) -> None:
        """Moves a corrupt entry aside, then deletes it (never rewrites it in place)."""
        trash = entry.path.with_name(f".trash-{entry.name}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(entry.path, trash)
        except FileNotFoundError:
            return
        except OSError as e:
            raise CacheError(f"{entry.path}: corrupt and cannot be removed ({e}); remove it by hand "
                             f"or set MLA_GEN_CACHE_DIR to a writable folder") from None
        shutil.rmtree(trash, ignore_errors=True)

    def remove_stale_temps(self, arch: str, name: str) -> None:
        """Under the entry's lock: temp dirs of earlier builders of this entry are dead leftovers."""
        for stale in self.arch_dir(arch).glob(f".tmp-{name}-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def entries(self) -> list[Entry]:
        """Published entries (and corrupt folders that look like entries), sorted by folder and name.
        Raises CacheError when the root exists but is not a folder."""
        if not self.root.is_dir():
            if self.root.exists():
                raise CacheError(f"{self.root}: not a folder; the cache root (MLA_GEN_CACHE_DIR or --root) "
                                 f"must be a folder or not exist yet")
            return []
        out = []
        for arch_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            out += [Entry(p) for p in sorted(arch_dir.iterdir()) if p.is_dir() and not p.name.startswith(".")]
        return out

    def whole_entry(self, folder: str, name: str) -> Entry | None:
        """The entry `name` in `folder` when it exists and is whole; a corrupt one is logged and reads as
        missing, so the caller builds it again."""
        entry = self.entry(folder, name)
        if not entry.path.exists():
            return None
        problems = entry.problems()
        if problems:
            log.warning("cache entry %s is corrupt: %s", entry.path, "; ".join(problems))
            return None
        return entry

    def newest_whole(self, folder: str, prefix: str, accept: Callable[[dict[str, Any]], bool]) -> Entry | None:
        """The newest whole entry named `prefix-*` in `folder` whose meta.json `accept`s (no toolchain
        needed: how a prebuilt cache loads on a machine without a compiler)."""
        best: tuple[float, Entry] | None = None
        arch_dir = self.arch_dir(folder)
        for path in arch_dir.glob(f"{prefix}-*") if arch_dir.is_dir() else []:
            entry = Entry(path)
            try:
                meta = entry.meta()
            except CacheError:
                continue
            if accept(meta) and not entry.problems() and (best is None or meta["created"] > best[0]):
                best = (meta["created"], entry)
        return best[1] if best else None

    def find(self, query: str) -> list[Entry]:
        """Entries whose name equals or starts with `query` (a variant id, id-hash, or a path)."""
        path = Path(query)
        if path.is_dir() and (path / META).exists():
            return [Entry(path.resolve())]
        return [e for e in self.entries() if e.name == query or e.name.startswith(query)]

    def prune(self, unused_days: float, dry_run: bool = False) -> Removal:
        """Removes entries unused for `unused_days` (corrupt ones too), plus leftover temp, trash and
        failed folders. Raises CacheError when the root is not a folder."""
        cutoff = time.time() - unused_days * 86400.0
        doomed: list[Path] = []
        for entry in self.entries():
            try:
                last = entry.meta()["last_used"]
            except CacheError:
                last = 0.0
            if last < cutoff:
                doomed.append(entry.path)
        if self.root.is_dir():
            for arch_dir in (p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
                doomed += [p for p in arch_dir.iterdir() if p.name.startswith((".tmp-", ".trash-"))
                           and time.time() - p.stat().st_mtime > 3600]
                if (arch_dir / ".failed").exists():
                    doomed.append(arch_dir / ".failed")
        if dry_run:
            return Removal(doomed, [])
        return self._remove_all(doomed)

    def clear(self) -> Removal:
        """Removes every entry, then every leftover folder. Raises CacheError when the root is not a folder."""
        result = self._remove_all([e.path for e in self.entries()])
        if self.root.is_dir():
            kept = {path.parent for path, _ in result.failed}  # already reported, with the reason
            rest = self._remove_all([p for p in self.root.iterdir() if p.is_dir() and p not in kept])
            result.failed += rest.failed
        return result

    def _remove_all(self, paths: list[Path]) -> Removal:
        result = Removal([], [])
        for path in paths:
            why = _remove_tree(path)
            if why is None:
                result.removed.append(path)
            else:
                result.failed.append((path, why))
        return result


@dataclasses.dataclass
class Removal:
    """What prune or clear removed, and what it could not remove (with the reason)."""
    removed: list[Path]
    failed: list[tuple[Path, str]]


def _remove_tree(path: Path) -> str | None:
    """Removes a folder; returns why it could not, or None. It is renamed aside first, so a removal cut
    short leaves a .trash- folder (pruned later), never half an entry that still reads as one."""
    trash = path if path.name.startswith(".") else path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        if trash != path:
            os.rename(path, trash)
        shutil.rmtree(trash)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"{e.strerror or e} ({e.filename or path})"
    return None
