"""`pip install ".[cuda]"` into a fresh virtual environment on a machine whose CUDA toolkit is hidden
(PATH without it, no CUDA_HOME/CUDA_PATH/MLA_GEN_NVCC, /usr/local/cuda pointed elsewhere): the
toolchain finds nvcc in the CUDA 13 wheels and builds one sm_90a variant (and the launcher)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

BUILD = """
import sys
from pathlib import Path
import generator.toolchain as toolchain
toolchain.SYSTEM_CUDA = Path(sys.argv[1])  # the system toolkit, hidden
print("NVCC", toolchain.find_nvcc(), flush=True)
from generator.cli import main
sys.exit(main(["build", "--heads", "16", "--ckv", "512", "--rope", "64", "--arch", "sm_90a", "--family", "simt"]))
"""


@pytest.mark.slow
def test_pip_cuda_extra_builds_without_a_system_toolkit(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    for name in ("generator", "templates", "mla_gen"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    proc = subprocess.run([str(py), "-m", "pip", "install", "--quiet", f"{src}[cuda]"], capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    env = {k: v for k, v in os.environ.items()
           if k not in ("CUDA_HOME", "CUDA_PATH", "MLA_GEN_NVCC", "PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join([str(venv / "bin"), "/usr/bin", "/bin"])  # no /usr/local/{bin,cuda/bin}
    env["MLA_GEN_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run([str(py), "-c", BUILD, str(tmp_path / "no-system-cuda")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    nvcc = Path(proc.stdout.split("NVCC ", 1)[1].split()[0])
    assert nvcc.is_relative_to(venv) and nvcc.parts[-4:] == ("nvidia", "cu13", "bin", "nvcc"), nvcc
    built = list((tmp_path / "cache" / "sm90a").glob("mla_decode_h16_c512_r64_bf16_bf16_simt_*/*.so"))
    assert built, proc.stderr[-3000:]
