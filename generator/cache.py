"""The content-addressed binary cache (DESIGN.md section 4).

Layout: <root>/<arch>/<variant-id>-<hash12>/ holding the sources, build.ninja, build.log, the
module's .so and meta.json. Invariants: an entry is published whole (built in a .tmp- folder,
meta.json written last, renamed into place) or not at all; published entries are never rebuilt
in place (a corrupt one is moved aside first); loading needs no lock and no write access.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

from generator import env
from generator.errors import CacheError

META = "meta.json"
SCHEMA = 1
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
        """meta.json; raises CacheError when missing or unreadable."""
        try:
            return json.loads((self.path / META).read_text())
        except FileNotFoundError:
            raise CacheError(f"{self.path}: meta.json is missing") from None
        except (OSError, ValueError) as e:
            raise CacheError(f"{self.path}: meta.json is unreadable: {e}") from None

    def so_path(self, meta: dict[str, Any] | None = None) -> Path:
        return self.path / (meta or self.meta())["so"]["file"]

    def problems(self) -> list[str]:
        """Why this entry cannot be loaded ([] when whole): meta, .so presence, size and checksum."""
        try:
            meta = self.meta()
        except CacheError as e:
            return [str(e)]
        if meta.get("schema") != SCHEMA:
            return [f"{self.path}: meta.json schema {meta.get('schema')!r}, expected {SCHEMA}"]
        so = self.so_path(meta)
        if not so.is_file():
            return [f"{so}: missing"]
        size = so.stat().st_size
        if size != meta["so"]["size"]:
            return [f"{so}: {size} bytes, meta.json says {meta['so']['size']} (truncated or replaced)"]
        if sha256_file(so) != meta["so"]["sha256"]:
            return [f"{so}: sha256 differs from meta.json (corrupt)"]
        return []

    def import_module(self) -> ModuleType:
        """Imports the entry's module in this process (ImportError on failure)."""
        meta = self.meta()
        so = self.so_path(meta)
        name = meta["module"]
        loader = importlib.machinery.ExtensionFileLoader(name, str(so))
        spec = importlib.util.spec_from_file_location(name, str(so), loader=loader)
        if spec is None:
            raise ImportError(f"cannot import {so}")
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        return module

    def import_check(self) -> str | None:
        """Imports the module in a fresh process; returns the error text, None when it imports."""
        meta = self.meta()
        code = ("import importlib.machinery as m, importlib.util as u, sys\n"
                f"l = m.ExtensionFileLoader({meta['module']!r}, {str(self.so_path(meta))!r})\n"
                f"s = u.spec_from_file_location({meta['module']!r}, {str(self.so_path(meta))!r}, loader=l)\n"
                "mod = u.module_from_spec(s); l.exec_module(mod); print(mod.VARIANT_ID)\n")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            return (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        if proc.stdout.strip() != meta["variant_id"]:
            return f"module reports {proc.stdout.strip()!r}, meta.json says {meta['variant_id']!r}"
        return None

    def touch(self) -> None:
        """Refreshes last_used where the cache is writable (throttled); silent when read-only."""
        try:
            meta = self.meta()
            now = time.time()
            if now - float(meta.get("last_used", 0)) < TOUCH_INTERVAL_S:
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
        """Published entries (and corrupt folders that look like entries), sorted by arch and name."""
        if not self.root.is_dir():
            return []
        out = []
        for arch_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            out += [Entry(p) for p in sorted(arch_dir.iterdir()) if p.is_dir() and not p.name.startswith(".")]
        return out

    def find(self, query: str) -> list[Entry]:
        """Entries whose name equals or starts with `query` (a variant id, id-hash, or a path)."""
        path = Path(query)
        if path.is_dir() and (path / META).exists():
            return [Entry(path.resolve())]
        return [e for e in self.entries() if e.name == query or e.name.startswith(query)]

    def prune(self, unused_days: float, dry_run: bool = False) -> list[Path]:
        """Removes entries unused for `unused_days`, plus leftover temp, trash and failed folders."""
        cutoff = time.time() - unused_days * 86400.0
        doomed: list[Path] = []
        for entry in self.entries():
            try:
                last = float(entry.meta().get("last_used", 0))
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
        if not dry_run:
            for path in doomed:
                shutil.rmtree(path, ignore_errors=True)
        return doomed

    def clear(self) -> int:
        """Removes every entry and leftover; returns the number of entries removed."""
        count = len(self.entries())
        if self.root.is_dir():
            for child in self.root.iterdir():
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
        return count
