"""torch.ops.mla_gen.*: registration, opcheck and torch.compile(fullgraph=True) on the CPU (the ops'
torch implementation); the CUDA side (generated kernels) is in test_engines_gpu.py."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import mla_gen  # noqa: F401  (torch is imported first: registers the ops)
from conftest import REPO
from mla_gen.layer import MLAAttention
from mla_gen.reference import mla_decode_reference
from mla_gen.testing import make_inputs


def inputs(s_q: int = 2):
    return make_inputs([5, 70, 33], heads=4, ckv=256, rope=32, s_q=s_q, page_size=16, dtype=torch.bfloat16,
                       generator=torch.Generator().manual_seed(s_q))


@pytest.mark.parametrize("s_q", [1, 2])
def test_ops_match_the_reference(s_q: int) -> None:
    inp = inputs(s_q)
    ref, ref_lse = mla_decode_reference(*inp.args())
    out = torch.ops.mla_gen.mla_decode(*inp.args())
    out2, lse = torch.ops.mla_gen.mla_decode_lse(*inp.args())
    buf, lse_buf = torch.full_like(out, float("nan")), torch.full_like(lse, float("nan"))
    assert torch.ops.mla_gen.mla_decode_out(*inp.args(), buf, lse_buf) is None
    for o in (out, out2, buf):
        assert float((o.double() - ref).abs().max()) < 2e-2 * float(ref.abs().max())
    for l_ in (lse, lse_buf):
        assert float((l_.double() - ref_lse).abs().max()) < 1e-4


def test_opcheck() -> None:
    inp = inputs()
    out = torch.empty_like(inp.q_nope)
    lse = torch.empty(inp.q_nope.shape[:3])
    for op, extra in ((torch.ops.mla_gen.mla_decode, ()), (torch.ops.mla_gen.mla_decode_lse, ()),
                      (torch.ops.mla_gen.mla_decode_out, (out, lse)), (torch.ops.mla_gen.mla_decode_out, (out,))):
        torch.library.opcheck(op, (*inp.args(), *extra))


def test_compile_fullgraph_through_the_ops() -> None:
    inp = inputs()

    def step(*args):
        out, lse = torch.ops.mla_gen.mla_decode_lse(*args)
        buf = torch.empty_like(out)
        torch.ops.mla_gen.mla_decode_out(*args, buf)
        return out.float() * 2 + buf.float(), lse

    want = step(*inp.args())
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*inp.args())
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_layer_decode_step_compiles_fullgraph_on_cpu() -> None:
    """The layer's absorbed step (its torch form on the CPU) has no graph break."""
    torch.manual_seed(0)
    layer = MLAAttention("deepseek-v3", hidden_size=64, head_range=(0, 2), dtype=torch.float32)
    cache = layer.new_cache(num_pages=8, page_size=16)
    table = torch.arange(8, dtype=torch.int32).view(2, 4)
    layer(torch.randn(2, 10, 64), cache, table, torch.zeros(2, dtype=torch.int32), form="vanilla")
    lens = torch.tensor([10, 20], dtype=torch.int32)
    x = torch.randn(2, 1, 64)
    eager = layer(x, cache, table, lens, form="absorbed")
    step = torch.compile(lambda x, lens: layer(x, cache, table, lens, form="absorbed"), fullgraph=True,
                         backend="aot_eager")
    assert torch.allclose(step(x, lens), eager, atol=1e-5)


def test_import_mla_gen_after_torch_registers_the_ops() -> None:
    code = "import torch, mla_gen\nprint(torch.ops.mla_gen.mla_decode_out.default._schema)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "mla_gen::mla_decode_out(" in proc.stdout and "!) out" in proc.stdout and "!)? lse=None" in proc.stdout
