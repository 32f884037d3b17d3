"""Variants for the runtime: built once per machine (the cache), opened once per process by the launcher."""
from __future__ import annotations

import functools
import threading

from generator import jit
from generator.spec import VariantSpec

_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def _load(spec: VariantSpec) -> jit.Variant:
    return jit.load(spec)


def get_module(spec: VariantSpec) -> jit.Variant:
    """The opened variant `spec` (plan, decode, merge, max_active_ctas, DecodeParams), building it on a
    cache miss. Raises BuildError, ToolchainError, CacheError, MissingJITCacheError."""
    with _lock:  # one build per variant per process even with threads
        return _load(spec)
