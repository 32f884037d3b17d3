"""The README's layer example runs as written (GPU)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def layer_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (block,) = [b for b in blocks if "MLAAttention(" in b]
    return block


def test_readme_has_a_ten_line_layer_example():
    lines = [ln for ln in layer_example().splitlines() if ln.strip()]
    assert len(lines) <= 12


@pytest.mark.gpu
def test_readme_layer_example_runs(capsys):
    exec(compile(layer_example(), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.startswith("absorbed mla_decode") and "(4, 1, 1024)" in printed.replace("torch.Size([4, 1, 1024])", "(4, 1, 1024)")
