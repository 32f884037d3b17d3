"""The README's layer example runs: as written on the GPU, and on the CPU with its device line changed."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def layer_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (block,) = [b for b in blocks if "MLAAttention(" in b]
    return block


def test_readme_layer_example_runs_on_the_cpu(capsys):
    """Same code on the CPU: the layer takes its torch path there, so it prints that backend."""
    example = layer_example()
    cpu = example.replace('dev, bf16 = "cuda", torch.bfloat16', 'dev, bf16 = "cpu", torch.bfloat16')
    assert cpu != example, "the README example no longer sets dev on one line"
    exec(compile(cpu, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "absorbed torch torch.Size([4, 1, 1024])"


@pytest.mark.gpu
def test_readme_layer_example_runs(capsys):
    exec(compile(layer_example(), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.startswith("absorbed mla_decode") and "(4, 1, 1024)" in printed.replace("torch.Size([4, 1, 1024])", "(4, 1, 1024)")
