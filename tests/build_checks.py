"""What the family tests check on a real nvcc build (a cache entry): the entry of a spec built into a fresh cache,
its decode kernel with no spills, no stack and its build log with no warning; its SASS as text; the marks of such
tests."""
from __future__ import annotations

import shutil
import subprocess

import pytest


def builds_with_nvcc(test):
    """Marks a test that builds a variant with real nvcc: slow, and skipped where no nvcc is found."""
    return pytest.mark.slow(pytest.mark.needs_nvcc(test))


def reads_sass(test):
    """builds_with_nvcc, and skipped where cuobjdump is not on PATH: the test reads the variant's SASS."""
    no_cuobjdump = pytest.mark.skipif(shutil.which("cuobjdump") is None, reason="cuobjdump not on PATH")
    return builds_with_nvcc(no_cuobjdump(test))


def built_entry(spec, tmp_path_factory, name: str):
    """The cache entry of `spec` built (real nvcc) into a fresh cache directory `name`."""
    from generator.build import build
    from generator.cache import BinaryCache

    result = build(spec, BinaryCache(tmp_path_factory.mktemp(name)))
    assert result.built
    return result.entry


def assert_clean_decode_kernel(entry) -> None:
    meta = entry.meta()
    log = (entry.path / "build.log").read_text()
    decode = next(k for k in meta["ptxas"] if k["function"] == "decode_kernel")
    assert decode["spill_stores"] == 0 and decode["spill_loads"] == 0 and decode["stack_bytes"] == 0, log
    calls = [k for k in meta["ptxas"] if not k["entry"]]  # device functions compiled as calls (__noinline__)
    assert all(k["spill_stores"] == 0 and k["spill_loads"] == 0 for k in calls), log
    print(f"{meta['variant_id']}: {decode['registers']} registers, 0 spills")
    assert "warning" not in log.lower(), log


def sass(entry) -> str:
    return subprocess.run(["cuobjdump", "--dump-sass", str(entry.so_path())], capture_output=True, text=True,
                          check=True).stdout
