"""The skip markers of conftest.py skip cleanly: `needs_nvcc` where the toolchain finds no nvcc."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO

NO_NVCC_PLUGIN = '''
import generator.toolchain
from generator.errors import ToolchainError


def _none():
    raise ToolchainError("no nvcc (test plugin)")


generator.toolchain.find_nvcc = _none
'''


def test_needs_nvcc_skips_without_nvcc(tmp_path: Path) -> None:
    (tmp_path / "no_nvcc_plugin.py").write_text(NO_NVCC_PLUGIN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no_nvcc_plugin", "-p", "no:cacheprovider",
                           "tests/test_mma_build.py", "tests/test_wgmma_family.py", "tests/test_narrow_family.py",
                           "tests/test_seesaw_family.py", "-k", "spills"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # every selected build test (the 16-bit and fp8 variants of the four family files) skips, none runs
    summary = re.search(r"^(\d+) skipped, \d+ deselected in", proc.stdout, re.M)
    assert summary and int(summary.group(1)) >= 3 and "needs nvcc" in proc.stdout, proc.stdout[-3000:]
    assert "error" not in proc.stdout.lower().replace("errors.py", ""), proc.stdout[-3000:]
