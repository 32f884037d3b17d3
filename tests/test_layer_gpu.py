"""The MLA layer on the GPU: the absorbed form through mla_decode in bf16 against the float64 vanilla
layer holding the same (bf16-rounded) weights and the same context, for the acceptance shapes of
issue 5 (deepseek-v2-lite, deepseek-v3 at TP 8 = 16 heads, minicpm3-4b with v_head_dim = nope)."""
from __future__ import annotations

import pytest
import torch

from layer_cases import build_case
from mla_gen.testing import LAYER_TOL, rel_l2

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = "cuda"
# case id -> (preset, heads held); hidden size scaled down to 1024, head dims real
CASES = {"deepseek-v2-lite": ("deepseek-v2-lite", None),
         "deepseek-v3-tp8": ("deepseek-v3", (16, 32)),  # rank 1 of 8
         "minicpm3-4b": ("minicpm3-4b", None)}  # 40 heads, kv_lora_rank 256, rope 32
LENGTHS = [1, 63, 64, 65, 1000, 2345]  # cached tokens before the step (page size 64)


@pytest.mark.parametrize("s_q", [1, 2])
@pytest.mark.parametrize("name", list(CASES))
def test_absorbed_bf16_kernel_vs_vanilla_float64(name, s_q):
    preset, heads = CASES[name]
    case = build_case(preset, LENGTHS, s_q=s_q, page_size=64, hidden_size=1024, head_range=heads,
                      dtype=torch.bfloat16, device=DEVICE, seed=100 + s_q)
    want = case.ref(case.x_ref, case.ref_cache, case.block_table, case.cache_seqlens, form="vanilla")
    got = case.layer(case.x, case.cache, case.block_table, case.cache_seqlens, form="absorbed")
    assert case.layer.last_backend == "mla_decode"
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert not got.isnan().any(), f"{int(got.isnan().sum())} NaN in the output"
    err = rel_l2(got, want)
    assert err <= LAYER_TOL, f"rel L2 {err:.2e} > {LAYER_TOL:.0e}"


def test_auto_picks_the_kernel_for_decode():
    case = build_case("deepseek-v3", [100, 700], s_q=1, page_size=64, hidden_size=512, head_range=(0, 16),
                      dtype=torch.bfloat16, device=DEVICE, seed=7)
    want = case.ref(case.x_ref, case.ref_cache, case.block_table, case.cache_seqlens, form="vanilla")
    got = case.layer(case.x, case.cache, case.block_table, case.cache_seqlens)
    assert (case.layer.last_form, case.layer.last_backend) == ("absorbed", "mla_decode")
    assert rel_l2(got, want) <= LAYER_TOL


def test_forms_agree_in_float64_on_the_gpu():
    """The torch latent attention (no kernel for float64) on the device: vanilla == absorbed."""
    case = build_case("minicpm3-4b", [0, 5, 64, 200], s_q=7, page_size=16, hidden_size=256,
                      dtype=torch.float64, device=DEVICE, seed=8)
    args = (case.block_table, case.cache_seqlens)
    vanilla = case.layer(case.x, case.cache, *args, form="vanilla")
    absorbed = case.layer(case.x, case.cache, *args, form="absorbed")  # rewrites the same tokens
    assert case.layer.last_backend == "torch"
    assert rel_l2(absorbed, vanilla) <= 1e-10
