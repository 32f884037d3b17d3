"""examples/tp_decode.py under torchrun: tensor-parallel decode vs the single-GPU layer, and one
compile per variant for ranks starting together on one empty cache."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, load_file
from mla_gen.testing import LAYER_TOL


def run_tp(nproc: int, cache: Path) -> str:
    env = {**os.environ, "MLA_GEN_CACHE_DIR": str(cache), "NCCL_NVLS_ENABLE": "0",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(REPO / "examples" / "tp_decode.py"), "--preset", "deepseek-v3", "--hidden", "512",
           "--batch", "4", "--seqlen", "300", "--steps", "5", "--cold"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def load_example():
    return load_file("tp_decode_example", "examples/tp_decode.py")


@pytest.mark.parametrize("explicit", [True, False], ids=["MLA_GEN_CACHE_DIR", "default-cache"])
def test_cold_never_touches_the_users_cache(tmp_path, monkeypatch, explicit):
    """--cold runs on a new empty cache folder, removed afterwards; the user's cache keeps its entries."""
    if explicit:
        users = tmp_path / "users-cache"
        monkeypatch.setenv("MLA_GEN_CACHE_DIR", str(users))
    else:
        monkeypatch.setenv("HOME", str(tmp_path))
        monkeypatch.delenv("MLA_GEN_CACHE_DIR", raising=False)
        users = tmp_path / ".cache" / "mla_gen"
    entry = users / "sm90a" / "mla_decode_h16_entry" / "meta.json"
    entry.parent.mkdir(parents=True)
    entry.write_text("{}")
    before = os.environ.get("MLA_GEN_CACHE_DIR")
    tp = load_example()
    shared = []
    with tp.cold_cache(lambda path: shared.append(path) or path) as cold:
        assert os.environ["MLA_GEN_CACHE_DIR"] == str(cold) == shared[0]
        assert cold.is_dir() and not any(cold.iterdir()) and not cold.is_relative_to(users)
    assert entry.read_text() == "{}"
    assert not cold.exists()
    assert os.environ.get("MLA_GEN_CACHE_DIR") == before


def check_output(text: str, nproc: int) -> None:
    errors = [float(x) for x in re.findall(r"rel L2 tp vs single-GPU layer:\s+(\S+)", text)]
    assert errors and errors[0] <= LAYER_TOL, text
    compiles = [int(n) for n in re.findall(r"compiles of \S+: (\d+)", text)]
    assert compiles and all(n == 1 for n in compiles), text  # cold cache: built once, by one rank
    assert len(re.findall(r"rank \d+: heads .* decode step", text)) == nproc, text


@pytest.mark.gpu
def test_tp_decode_world_size_one(tmp_path):
    check_output(run_tp(1, tmp_path / "cache"), 1)


@pytest.mark.multigpu
def test_tp_decode_two_ranks(tmp_path):
    check_output(run_tp(2, tmp_path / "cache"), 2)
