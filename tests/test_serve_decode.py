"""examples/serve_decode.py: DeepSeek-V3-shaped defaults (CPU), and a tiny run on the GPU whose
CUDA-graph replays match the eager steps."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO, load_file
from generator.presets import model_config


def load_example():
    return load_file("serve_decode_example", "examples/serve_decode.py")


def test_defaults_are_deepseek_v3_at_tp8() -> None:
    args = load_example().parse_args([])
    cfg = model_config(args.preset)
    assert (args.preset, args.layers, args.tp) == ("deepseek-v3", 61, 8)
    assert cfg.num_heads // args.tp == 16


@pytest.mark.gpu
def test_tiny_serving_loop_graphed_equals_eager() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, str(REPO / "examples" / "serve_decode.py"), "--layers", "3", "--hidden", "256",
           "--slots", "4", "--requests", "9", "--max-len", "700", "--max-output", "12", "--page-size", "16"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "eager:" in proc.stdout and "graph:" in proc.stdout and "tokens/s" in proc.stdout
    assert "(ok, tol" in proc.stdout, proc.stdout
