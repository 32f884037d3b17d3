"""Import layering: the arithmetic of mla_gen imports without torch, and the bench package has no
import cycle."""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

NO_TORCH = textwrap.dedent("""
    import importlib, sys

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked for this test")
            return None

    sys.meta_path.insert(0, NoTorch())
    for name in sys.argv[1:]:
        importlib.import_module(name)
    import mla_gen
    assert "torch" not in sys.modules
    try:
        mla_gen.mla_decode
    except ImportError as e:
        assert "torch is blocked" in str(e), e
    else:
        raise AssertionError("mla_gen.mla_decode loaded without torch")
""")


@pytest.mark.parametrize("module", ["mla_gen", "mla_gen.cost", "mla_gen.schedule", "mla_gen.bench.cases",
                                    "mla_gen.bench.report", "mla_gen.bench.roofline", "mla_gen.bench.plot",
                                    "mla_gen.bench.args"])
def test_imports_without_torch(module: str) -> None:
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, module], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_the_blocker_blocks() -> None:
    """The same finder makes a torch-importing module fail, so the test above can fail."""
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, "mla_gen.api"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and "torch is blocked" in proc.stderr


def test_cost_cli_runs_without_torch() -> None:
    code = NO_TORCH + "\nfrom mla_gen.cost import main\nraise SystemExit(main(['--preset', 'deepseek-v3']))\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "crossover" in proc.stdout


def _bench_imports() -> dict[str, set[str]]:
    graph = {}
    for path in sorted((REPO / "mla_gen" / "bench").glob("*.py")):
        name = f"mla_gen.bench.{path.stem}"
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mla_gen.bench."):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("mla_gen.bench."))
        graph[name] = deps
    return graph


def test_bench_package_has_no_import_cycle() -> None:
    graph = _bench_imports()
    assert "mla_gen.bench.runner" in graph and graph["mla_gen.bench.__main__"] == {"mla_gen.bench.runner"}
    done: set[str] = set()

    def visit(node: str, stack: tuple[str, ...]) -> None:
        assert node not in stack, f"import cycle: {' -> '.join(stack + (node,))}"
        if node in done:
            return
        for dep in graph.get(node, ()):
            visit(dep, stack + (node,))
        done.add(node)

    for node in graph:
        visit(node, ())

