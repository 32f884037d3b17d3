"""Spec -> imported module, building on a miss (the exception contract of FlashInfer's JIT).

- `try_load(spec)`: the module if a whole entry is cached, else None (logs why). Never builds.
- `load(spec)`: the module, building on a miss (MissingJITCacheError when MLA_GEN_DISABLE_JIT is
  set). A corrupt entry is rebuilt with a warning. Raises BuildError, ToolchainError, CacheError.

On a machine without nvcc, a prebuilt cache still loads: the entry is matched by variant id,
rendered-sources hash and Python ABI instead of the full key.
"""
from __future__ import annotations

import logging
import warnings
from types import ModuleType

from generator import __version__, env
from generator.build import build, plan_build, sources_sha256
from generator.cache import BinaryCache, Entry
from generator.errors import CacheError, MissingJITCacheError, ToolchainError
from generator.render import render_sources
from generator.spec import VariantSpec

log = logging.getLogger("mla_gen.jit")


def _prebuilt_without_toolchain(spec: VariantSpec, cache: BinaryCache) -> Entry | None:
    """The newest whole entry built from these exact sources for this Python (no nvcc needed)."""
    import sysconfig

    want_sources = sources_sha256(render_sources(spec))
    ext = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    best: tuple[float, Entry] | None = None
    arch_dir = cache.arch_dir(spec.arch.value)
    for path in arch_dir.glob(f"{spec.variant_id}-*") if arch_dir.is_dir() else []:
        entry = Entry(path)
        try:
            meta = entry.meta()
        except CacheError:
            continue
        if (meta.get("sources_sha256") == want_sources and meta["toolchain"].get("ext_suffix") == ext
                and meta["toolchain"].get("generator_version") == __version__ and not entry.problems()):
            if best is None or meta["created"] > best[0]:
                best = (meta["created"], entry)
    return best[1] if best else None


def find_entry(spec: VariantSpec, cache: BinaryCache | None = None) -> Entry | None:
    """The whole cached entry for `spec`, or None. Never builds, never writes."""
    cache = cache or BinaryCache()
    try:
        plan = plan_build(spec)
    except ToolchainError:
        return _prebuilt_without_toolchain(spec, cache)
    entry = cache.entry(spec.arch.value, plan.entry_name)
    if not entry.path.exists():
        return None
    problems = entry.problems()
    if problems:
        log.warning("cache entry %s is corrupt: %s", entry.path, "; ".join(problems))
        return None
    return entry


_compiled: list[str] = []


def compiled_here() -> list[str]:
    """Variant ids this process compiled (not loaded from the cache): for build-once checks."""
    return list(_compiled)


def try_load(spec: VariantSpec, cache: BinaryCache | None = None) -> ModuleType | None:
    entry = find_entry(spec, cache)
    if entry is None:
        log.info("%s: not cached", spec.variant_id)
        return None
    try:
        module = entry.import_module()
    except ImportError as e:
        log.warning("%s: cached module does not import: %s", entry.path, e)
        return None
    entry.touch()
    return module


def load(spec: VariantSpec, cache: BinaryCache | None = None) -> ModuleType:
    cache = cache or BinaryCache()
    entry = find_entry(spec, cache)
    if entry is not None:
        try:
            module = entry.import_module()
        except ImportError as e:
            # NOTE(import-check): a whole entry that a fresh process imports is fine; the clash is in
            # this process (e.g. a module of that name already loaded), and a rebuild would discard
            # a good entry and fail the same way.
            if entry.import_check() is None:
                raise CacheError(f"{entry.path}: imports in a fresh process but not in this one: {e}") from None
            warnings.warn(f"mla-gen: cache entry {entry.path} does not import ({e}); rebuilding", stacklevel=2)
            cache.discard(entry)
        else:
            entry.touch()
            return module
    if env.disable_jit():
        raise MissingJITCacheError(spec.variant_id, cache.root)
    result = build(spec, cache, plan_build(spec))
    if result.built:
        _compiled.append(spec.variant_id)
    try:
        module = result.entry.import_module()
    except ImportError as e:
        raise CacheError(f"{result.entry.path}: freshly built module does not import: {e}") from None
    result.entry.touch()
    return module
