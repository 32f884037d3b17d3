"""A real wheel ships the templates: build it, install it into a bare target dir, emit from outside the repo."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO


@pytest.mark.slow
def test_wheel_ships_templates_and_emits_outside_the_repo(tmp_path: Path) -> None:
    # build from a copy, so the build does not write build/ or *.egg-info into the checkout
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, src / name)
    for name in ("generator", "templates", "mla_gen"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path / "dist"
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(src)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = dist.glob("mla_gen-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = {p.name for p in (REPO / "templates").iterdir() if p.suffix in (".jinja", ".cuh", ".h")}
    assert {f"generator/templates/{t}" for t in templates} <= names
    assert "generator/models.json" in names and "generator/cli.py" in names
    assert {"mla_gen/api.py", "mla_gen/bench/__main__.py", "mla_gen/bench/runner.py"} <= names
    assert {"mla_gen/ops.py", "mla_gen/compat/flash_mla.py", "mla_gen/compat/flashinfer.py"} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)

    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--quiet",
                           "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import generator, generator.render as r; "
                            "print(generator.__file__); print(r.templates_dir())"],
                           cwd=outside, env=env, capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr
    module_file, templates_dir = where.stdout.split()
    assert Path(module_file).is_relative_to(target) and Path(templates_dir) == target / "generator" / "templates"

    out = tmp_path / "emitted"
    emit = subprocess.run([sys.executable, "-m", "generator", "emit", "--preset", "deepseek-v3", "--out", str(out)],
                          cwd=outside, env=env, capture_output=True, text=True, timeout=120)
    assert emit.returncode == 0, emit.stderr
    *folders, launcher = [Path(line) for line in emit.stdout.split()]
    assert folders and all((f / "kernel.cu").is_file() for f in folders)
    assert launcher.parent == out / "launcher" and (launcher / "launcher.cpp").is_file()
    tp1 = [f for f in folders if f.name.startswith("mla_decode_h128_c512_r64_bf16_bf16_")]
    assert tp1 and all(f.parent == out / "sm90a" for f in folders)
    assert "static constexpr int kNumHeads = 128;" in (tp1[0] / "kernel.cu").read_text()
    assert not list(outside.iterdir())  # nothing written to the working directory
