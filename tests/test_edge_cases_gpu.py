"""The edge cases mla_decode defines (see its docstring and README): an empty batch, requests of only
their s_q new tokens, length-1 requests, and NaN or inf in q, for every family the device runs (GPU)."""
from __future__ import annotations

import pytest
import torch

import mla_gen
import mla_gen.api
from gpu_cases import variants
from mla_gen.reference import mla_decode_reference
from mla_gen.testing import accuracy_problems, make_inputs
from mla_gen.validate import MIN_SM_SCALE

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

def run(inp, family: str, num_parts: int | None = None):
    b, s_q, h, c = inp.q_nope.shape
    out = torch.full((b, s_q, h, c), float("nan"), dtype=inp.q_nope.dtype, device="cuda")
    lse = torch.full((b, s_q, h), float("nan"), dtype=torch.float32, device="cuda")
    mla_gen.mla_decode(*inp.args(), out=out, lse=lse, family=family, num_parts=num_parts)
    return out, lse


def test_empty_batch_returns_empty_results_without_a_launch(monkeypatch):
    from test_validate import empty_batch

    def no_wrapper(*a, **k):
        raise AssertionError("an empty batch must not plan or launch")

    monkeypatch.setattr(mla_gen.api, "_wrapper_for", no_wrapper)
    args = empty_batch("cuda")
    out = mla_gen.mla_decode(**args)
    assert out.shape == (0, 1, 16, 512) and out.dtype == torch.bfloat16 and out.is_cuda
    out, lse = mla_gen.mla_decode(**args, return_lse=True, check_values=True)
    assert lse.shape == (0, 1, 16) and lse.dtype == torch.float32


@pytest.mark.parametrize("num_parts", [None, 1, 16], ids=["auto", "unsplit", "split16"])
@pytest.mark.parametrize("family, dtype, dims, heads, s_q", variants([16], s_qs=(1, 2, 4)))
def test_requests_of_only_their_new_tokens(family, dtype, dims, heads, s_q, num_parts):
    """seqlen == s_q (nothing cached before the step; 1 for s_q 1), beside longer requests."""
    inp = make_inputs([s_q, 300, s_q, 65], heads=16, s_q=s_q, page_size=16, device="cuda",
                      generator=torch.Generator(device="cuda").manual_seed(s_q))
    out, lse = run(inp, family, num_parts)
    ref, ref_lse = mla_decode_reference(*inp.args())
    assert not accuracy_problems(out, lse, ref, ref_lse, "bf16")


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("family, dtype, dims, heads, s_q", variants([16]))
def test_non_finite_q_spoils_only_its_row(family, dtype, dims, heads, s_q, bad):
    inp = make_inputs([1, 130, 64], heads=16, s_q=1, page_size=64, device="cuda",
                      generator=torch.Generator(device="cuda").manual_seed(7))
    inp.q_nope[1, 0, 3, 10] = float(bad)
    out, lse = run(inp, family)
    assert not torch.isfinite(lse[1, 0, 3]), float(lse[1, 0, 3])
    row = out[1, 0, 3]
    assert bool(row.isnan().all()) or bool((row == 0).all()), row[:8]
    keep = torch.ones_like(lse, dtype=torch.bool)
    keep[1, 0, 3] = False
    ref, ref_lse = mla_decode_reference(*inp.args())
    problems = accuracy_problems(out[keep], lse[keep], ref[keep], ref_lse[keep], "bf16")
    assert not problems, problems
    with pytest.raises(ValueError, match=r"^q_nope: a value is not finite .* at \[1, 0, 3\]"):
        mla_gen.mla_decode(*inp.args(), family=family, check_values=True)


@pytest.mark.parametrize("family, dtype, dims, heads, s_q", variants([16, 128]))
def test_a_huge_sm_scale_gives_the_hard_max_not_nan(family, dtype, dims, heads, s_q):
    """sm_scale 6.35e8 (test_validate_props found it): the scaled scores reach ~1e10, where one fp32 rounding
    of a product is worth ~1e3 in the exponent. The softmax is then a hard max over the tokens, and no row may
    overflow to inf or NaN on the way."""
    inp = make_inputs([1, 130, 700], heads=heads, s_q=1, page_size=16, device="cuda", sm_scale=635148512.0,
                      generator=torch.Generator(device="cuda").manual_seed(11))
    out, lse = run(inp, family)
    ref, _ = mla_decode_reference(*inp.args())
    problems = accuracy_problems(out, None, ref, None, "bf16")
    assert not problems, problems
    assert bool(torch.isfinite(lse).all()), lse


@pytest.mark.parametrize("family, dtype, dims, heads, s_q", variants([16, 128]))
def test_the_smallest_sm_scale_gives_the_uniform_softmax_not_nan(family, dtype, dims, heads, s_q):
    """sm_scale 1e-30 (validate.MIN_SM_SCALE; test_validate_props drew 4.75e-247, which is 0 in float32 and gave a
    NaN row where the tile's masked scores met it): every score is ~0, so each row is the mean of its tokens' values,
    also for a request of one token in a 64-token tile."""
    inp = make_inputs([1, 130, 700], heads=heads, s_q=1, page_size=16, device="cuda", sm_scale=MIN_SM_SCALE,
                      generator=torch.Generator(device="cuda").manual_seed(13))
    out, lse = run(inp, family)
    ref, ref_lse = mla_decode_reference(*inp.args())
    problems = accuracy_problems(out, lse, ref, ref_lse, "bf16")
    assert not problems, problems


def test_a_checked_call_does_not_report_an_earlier_unchecked_one():
    """An unchecked call with a bad length writes NaN for that request; a later checked call of the same
    shape (the same cached plan) is judged on its own inputs."""
    inp = make_inputs([40, 50], heads=16, page_size=16, device="cuda", generator=torch.Generator().manual_seed(3))
    bad = inp.cache_seqlens.clone()
    bad[0] = inp.block_table.shape[1] * 16 + 1
    out = mla_gen.mla_decode(*inp.args()[:5], bad, inp.sm_scale, check_values=False)
    assert out[0].isnan().all() and not out[1].isnan().any()
    out = mla_gen.mla_decode(*inp.args(), check_values=True)
    assert not out.isnan().any()


def test_run_names_the_argument_that_differs_from_the_plan():
    small = make_inputs([40, 50], heads=16, page_size=16, device="cuda", generator=torch.Generator().manual_seed(4))
    big = make_inputs([40, 50, 60], heads=16, page_size=16, device="cuda", generator=torch.Generator().manual_seed(5))
    w = mla_gen.MLADecodeWrapper()
    w.plan(small.cache_seqlens, 1, num_heads=16, page_size=16, max_pages=small.block_table.shape[1],
           sm_scale=small.sm_scale)
    with pytest.raises(ValueError, match=r"^q_nope: batch 3 differs from the plan's 2; call plan\(\) again"):
        w.run(*big.args()[:6])
