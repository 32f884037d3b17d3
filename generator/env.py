"""Every environment variable mla-gen reads, in one place. A bad value warns and falls back, except
MLA_GEN_NVCC: a compiler named on purpose is never silently replaced (toolchain.find_nvcc raises).

- MLA_GEN_CACHE_DIR: binary cache root (default ~/.cache/mla_gen).
- MLA_GEN_LOCK_DIR: a local folder for build locks when the cache sits on a network filesystem.
- MLA_GEN_NVCC: the nvcc to use, ahead of CUDA_HOME (or CUDA_PATH) and PATH.
- MLA_GEN_TEMPLATE_DIR: render from this folder instead of the packaged templates (template
  development, and tests that inject a broken template into a copy).
- MLA_GEN_DISABLE_JIT: a cache miss raises MissingJITCacheError instead of compiling.
- MLA_GEN_BUILD_JOBS: ninja jobs per variant build.
- MLA_GEN_DEBUG: value checks that need a device sync on every call.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path


def _flag(name: str) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    warnings.warn(f"{name}={value!r} is not a boolean (1/0/true/false); treating it as off")
    return False


def cache_dir() -> Path:
    """MLA_GEN_CACHE_DIR, default ~/.cache/mla_gen."""
    value = os.environ.get("MLA_GEN_CACHE_DIR", "").strip()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "mla_gen"


def lock_dir() -> Path | None:
    """MLA_GEN_LOCK_DIR: a local folder for build locks when the cache sits on a network filesystem."""
    value = os.environ.get("MLA_GEN_LOCK_DIR", "").strip()
    return Path(value).expanduser() if value else None


def nvcc_override() -> str | None:
    """MLA_GEN_NVCC: the nvcc to use, ahead of CUDA_HOME and PATH."""
    return os.environ.get("MLA_GEN_NVCC", "").strip() or None


def template_dir() -> Path | None:
    """MLA_GEN_TEMPLATE_DIR: a templates folder to render from instead of the packaged one.

    A folder without kernel.cu.jinja warns and falls back to the packaged templates."""
    value = os.environ.get("MLA_GEN_TEMPLATE_DIR", "").strip()
    if not value:
        return None
    path = Path(value).expanduser()
    if not (path / "kernel.cu.jinja").is_file():
        warnings.warn(f"MLA_GEN_TEMPLATE_DIR={value!r} holds no kernel.cu.jinja; using the packaged templates")
        return None
    return path.resolve()


def cuda_home() -> str | None:
    return (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "").strip() or None


def disable_jit() -> bool:
    """MLA_GEN_DISABLE_JIT=1: a cache miss raises MissingJITCacheError instead of compiling."""
    return _flag("MLA_GEN_DISABLE_JIT")


# NOTE(hot-env): debug() runs on every mla_decode call. os.environ.get encodes the key on each call (about
# 1 us); when the variable is unset, a look-up of the key encoded once in os.environ's own mapping (which
# setenv, putenv through os.environ and monkeypatch all update) answers in a few tens of ns.
_DEBUG = "MLA_GEN_DEBUG"
_ENV_DATA = getattr(os.environ, "_data", None)
_DEBUG_KEY = os.environ.encodekey(_DEBUG) if hasattr(os.environ, "encodekey") else None


def debug() -> bool:
    """MLA_GEN_DEBUG=1: value checks that need a device sync (lengths, page ids) on every call."""
    if _ENV_DATA is not None and _DEBUG_KEY is not None and _DEBUG_KEY not in _ENV_DATA:
        return False
    return _flag(_DEBUG)


def build_jobs() -> int:
    """MLA_GEN_BUILD_JOBS: ninja jobs per variant build (default: ninja's own choice)."""
    value = os.environ.get("MLA_GEN_BUILD_JOBS", "").strip()
    if not value:
        return 0
    try:
        jobs = int(value)
        if jobs < 1:
            raise ValueError
        return jobs
    except ValueError:
        warnings.warn(f"MLA_GEN_BUILD_JOBS={value!r} is not a positive integer; using ninja's default")
        return 0
