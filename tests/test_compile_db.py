"""`python -m generator emit --compile-commands`: compile_commands.json parses and names every
emitted .cu and .cpp, with commands clangd can read."""
from __future__ import annotations

import json
from pathlib import Path

from conftest import run_cli


def test_emit_writes_compile_commands(tmp_path: Path) -> None:
    out = tmp_path / "build"
    proc = run_cli("emit", "--heads", "16", "128", "--ckv", "512", "--rope", "64", "--arch", "sm_90a",
                   "--out", str(out), "--compile-commands")
    assert proc.returncode == 0, proc.stderr
    entries = json.loads((out / "compile_commands.json").read_text())
    sources = {str(p.resolve()) for p in out.rglob("*") if p.suffix in (".cu", ".cpp")}
    assert sources and {e["file"] for e in entries} == sources
    assert any(s.endswith("kernel.cu") for s in sources) and any(s.endswith("launcher.cpp") for s in sources)
    for e in entries:
        assert Path(e["directory"]).is_dir() and Path(e["file"]).parent == Path(e["directory"])
        args = e["arguments"]
        assert "-c" in args and "-MF" not in args and f"-I{e['directory']}" in args
        if e["file"].endswith(".cu"):
            assert args[:3] == ["clang++", "-x", "cuda"] and "--cuda-gpu-arch=sm_90a" in args
            assert not any(a.startswith(("-gencode", "--ptxas", "-Xcompiler")) for a in args)


def test_emit_without_the_flag_writes_none(tmp_path: Path) -> None:
    proc = run_cli("emit", "--heads", "16", "--ckv", "512", "--rope", "64", "--arch", "sm_90a", "--out",
                   str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "compile_commands.json").exists()
