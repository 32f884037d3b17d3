"""Spec -> opened variant, building on a miss (the exception contract of FlashInfer's JIT).

- `try_load(spec)`: the variant if it and this Python's launcher are cached whole, else None (logs
  why). Never builds.
- `load(spec)`: the variant, building it (and the launcher) on a miss (MissingJITCacheError when
  MLA_GEN_DISABLE_JIT is set). A corrupt entry is rebuilt with a warning. Raises BuildError,
  ToolchainError, CacheError.

A variant is opened by the launcher (generator/launcher.py): the object returned has decode (whose
CTAs plan the work list), merge, run (the two in one call), launch (run with a call's pointers),
max_active_ctas, DecodeParams, variant_id and path. On a machine without nvcc, a prebuilt cache still
loads: entries are matched by name and rendered-sources hash instead of the full key.
"""
from __future__ import annotations

import concurrent.futures
import logging
import warnings
from typing import Any, Protocol, overload

from generator import __version__, env
from generator.build import build, plan_build, sources_sha256
from generator.cache import BinaryCache, Entry
from generator.errors import CacheError, MissingJITCacheError, ToolchainError
from generator.launcher import load_launcher, try_load_launcher
from generator.render import render_sources
from generator.spec import VariantSpec

log = logging.getLogger("mla_gen.jit")


class Variant(Protocol):
    """A variant's kernels, opened by the launcher (what the runtime calls)."""
    variant_id: str
    path: str
    DecodeParams: Any  # the launcher's params class: p = variant.DecodeParams(); p.batch = ...

    def decode(self, params: Any, stream: int) -> None: ...
    def merge(self, params: Any, stream: int) -> None: ...
    def run(self, params: Any, stream: int, replan: bool = True) -> None: ...
    @overload
    def launch(self, params: Any, stream: int, q_nope: int, q_pe: int, ckv: int, kpe: int, block_table: int,
               seqlens: int, out: int, lse: int, replan: bool) -> None: ...
    @overload  # an fp8_e4m3 cache: its kv_scale pointer too
    def launch(self, params: Any, stream: int, q_nope: int, q_pe: int, ckv: int, kpe: int, block_table: int,
               seqlens: int, out: int, lse: int, kv_scale: int, replan: bool) -> None: ...
    def max_active_ctas(self) -> int: ...


def find_entry(spec: VariantSpec, cache: BinaryCache | None = None) -> Entry | None:
    """The whole cached entry for `spec`, or None. Never builds, never writes."""
    cache = cache or BinaryCache()
    try:
        plan = plan_build(spec)
    except ToolchainError:
        want = sources_sha256(render_sources(spec))
        return cache.newest_whole(spec.arch.value, spec.variant_id, lambda meta: (
            meta["kind"] == "variant" and meta["sources_sha256"] == want
            and meta["toolchain"].get("generator_version") == __version__))
    return cache.whole_entry(spec.arch.value, plan.entry_name)


_compiled: list[str] = []


def compiled_here() -> list[str]:
    """Variant ids this process compiled (not loaded from the cache): for build-once checks."""
    return list(_compiled)


def try_load(spec: VariantSpec, cache: BinaryCache | None = None) -> Variant | None:
    cache = cache or BinaryCache()
    entry = find_entry(spec, cache)
    launcher = try_load_launcher(cache)
    if entry is None or launcher is None:
        log.info("%s: not cached", spec.variant_id if entry is None else "the launcher")
        return None
    try:
        variant = launcher.Variant(str(entry.so_path()))
    except ImportError as e:
        log.warning("%s: cached variant does not open: %s", entry.path, e)
        return None
    entry.touch()
    return variant


def _built(spec: VariantSpec, cache: BinaryCache) -> Entry:
    if env.disable_jit():
        raise MissingJITCacheError(spec.variant_id, cache.root)
    result = build(spec, cache, plan_build(spec))
    if result.built:
        _compiled.append(spec.variant_id)
    return result.entry


def load(spec: VariantSpec, cache: BinaryCache | None = None) -> Variant:
    cache = cache or BinaryCache()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        # on a fresh cache the host compiler builds the launcher while nvcc builds the variant
        launcher_future = pool.submit(load_launcher, cache)
        entry = find_entry(spec, cache) or _built(spec, cache)
        launcher = launcher_future.result()
    try:
        variant = launcher.Variant(str(entry.so_path()))
    except ImportError as e:
        # NOTE(load-check): a whole entry that a fresh process opens is fine; the clash is in this
        # process, and a rebuild would discard a good entry and fail the same way.
        if entry.load_check() is None:
            raise CacheError(f"{entry.path}: opens in a fresh process but not in this one: {e}") from None
        warnings.warn(f"mla-gen: cache entry {entry.path} does not open ({e}); rebuilding", stacklevel=2)
        cache.discard(entry)
        entry = _built(spec, cache)
        try:
            variant = launcher.Variant(str(entry.so_path()))
        except ImportError as e:
            raise CacheError(f"{entry.path}: freshly built variant does not open: {e}") from None
    entry.touch()
    return variant
