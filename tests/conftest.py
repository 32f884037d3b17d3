"""Shared fixtures.

- Every test runs with MLA_GEN_CACHE_DIR pointing at a session-wide temporary folder (unless the
  variable is set explicitly), so a test run never reads or writes the user's ~/.cache/mla_gen; `cache_root` gives one test a fresh cache of
  its own (subprocesses inherit it through os.environ).
- Tests marked `gpu` are skipped when torch is missing or sees no CUDA device; `multigpu` needs two.
- Tests marked `needs_nvcc` are skipped when the toolchain finds no nvcc.
- Tests marked `sanitizer` (compute-sanitizer runs, minutes) run only when selected, `-m sanitizer`,
  and skip without a CUDA device; neither the default run nor `-m gpu` runs them.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]


def _cuda_device_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    try:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken driver install reads as "no GPU", not as a collection error
        return 0


def _nvcc_found() -> bool:
    from generator.errors import ToolchainError
    from generator.toolchain import find_nvcc

    try:
        find_nvcc()
    except ToolchainError:
        return False
    return True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    selected_sanitizer = "sanitizer" in (config.getoption("markexpr") or "")
    for item in items:
        if item.get_closest_marker("sanitizer") and not selected_sanitizer:
            item.add_marker(pytest.mark.skip(reason="a compute-sanitizer run (minutes): select it with -m sanitizer"))
    if any(it.get_closest_marker("needs_nvcc") for it in items) and not _nvcc_found():
        for item in items:
            if item.get_closest_marker("needs_nvcc"):
                item.add_marker(pytest.mark.skip(reason="needs nvcc (none in MLA_GEN_NVCC, CUDA_HOME, PATH or "
                                                        "the pip CUDA wheels of mla-gen[cuda])"))
    needs = [it for it in items if it.get_closest_marker("gpu") or it.get_closest_marker("multigpu")
             or it.get_closest_marker("sanitizer")]
    if not needs:
        return  # do not import torch for a CPU-only selection
    count = _cuda_device_count()
    for item in needs:
        if count == 0:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is false "
                                                    "or torch is not installed)"))
        elif item.get_closest_marker("multigpu") and count < 2:
            item.add_marker(pytest.mark.skip(reason=f"needs 2 or more CUDA devices, found {count}"))


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # An explicit MLA_GEN_CACHE_DIR is kept (scripts/gpu_session.sh builds the GPU tests' variants
    # there ahead of time, in parallel); otherwise the run gets a temporary one.
    explicit = os.environ.get("MLA_GEN_CACHE_DIR", "").strip()
    root = Path(explicit) if explicit else tmp_path_factory.mktemp("mla_gen_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLA_GEN_CACHE_DIR", str(root))
        for name in ("MLA_GEN_TEMPLATE_DIR", "MLA_GEN_DISABLE_JIT"):  # would change what the tests test
            mp.delenv(name, raising=False)
        yield root


@pytest.fixture
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty cache root for this test, exported as MLA_GEN_CACHE_DIR."""
    root = tmp_path / "cache"
    monkeypatch.setenv("MLA_GEN_CACHE_DIR", str(root))
    return root


def load_file(name: str, relpath: str):
    """The module at REPO / relpath (a script or example, not a package), imported as `name` and registered in
    sys.modules (dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, REPO / relpath)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python -m generator ARGS` in a new process (the repo on PYTHONPATH), output captured."""
    full_env = dict(os.environ if env is None else env)
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "generator", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
