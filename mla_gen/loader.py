"""Variant modules for the runtime: built once per machine (the cache), imported once per process."""
from __future__ import annotations

import functools
import threading
from types import ModuleType

from generator import jit
from generator.spec import VariantSpec

_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def _load(spec: VariantSpec) -> ModuleType:
    return jit.load(spec)


def get_module(spec: VariantSpec) -> ModuleType:
    """The imported module of `spec`, building it on a cache miss. Raises BuildError,
    ToolchainError, CacheError, MissingJITCacheError."""
    with _lock:  # one build per variant per process even with threads
        return _load(spec)
