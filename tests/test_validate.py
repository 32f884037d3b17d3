"""mla_decode rejects each class of bad input before launching, naming the argument (CPU)."""
import math

import numpy as np

import pytest
import torch

import mla_gen
from mla_gen.testing import make_inputs


def inputs(**kw):
    kw.setdefault("heads", 4)
    return make_inputs([5, 70], generator=torch.Generator().manual_seed(0), page_size=16, **kw)


def call(inp, check_values=True, **overrides):
    args = dict(q_nope=inp.q_nope, q_pe=inp.q_pe, ckv_cache=inp.ckv_cache, kpe_cache=inp.kpe_cache,
                block_table=inp.block_table, cache_seqlens=inp.cache_seqlens, sm_scale=inp.sm_scale)
    args.update(overrides)
    return mla_gen.mla_decode(**args, check_values=check_values)


def test_valid_inputs_reach_the_device_check():
    with pytest.raises(ValueError, match=r"q_nope: expected a CUDA tensor, got device cpu"):
        call(inputs())


@pytest.mark.parametrize("scale", [np.float32(0.1), np.float64(0.1), 1, 1e30, 1e-30],
                         ids=["np.float32", "np.float64", "int", "max", "min"])
def test_any_real_sm_scale_is_taken(scale):
    with pytest.raises(ValueError, match=r"q_nope: expected a CUDA tensor"):
        call(inputs(), sm_scale=scale)


@pytest.mark.parametrize("override,exc,pattern", [
    (lambda i: {"q_nope": i.q_nope.float()}, TypeError, r"q_nope: expected dtype"),
    (lambda i: {"q_pe": i.q_pe.half()}, TypeError, r"q_pe: expected dtype torch.bfloat16"),
    (lambda i: {"ckv_cache": i.ckv_cache.half()}, TypeError, r"ckv_cache: expected dtype torch.bfloat16"),
    (lambda i: {"ckv_cache": i.ckv_cache[..., :256].contiguous()}, ValueError, r"ckv_cache: expected ckv_dim .*512.*got 256"),
    (lambda i: {"kpe_cache": i.kpe_cache[..., :32].contiguous()}, ValueError, r"kpe_cache: expected rope_dim .*64.*got 32"),
    (lambda i: {"kpe_cache": i.kpe_cache[:-1]}, ValueError, r"kpe_cache: expected num_pages"),
    (lambda i: {"block_table": i.block_table.long()}, TypeError, r"block_table: expected dtype torch.int32"),
    (lambda i: {"block_table": i.block_table[:1]}, ValueError, r"block_table: expected batch"),
    (lambda i: {"cache_seqlens": i.cache_seqlens.long()}, TypeError, r"cache_seqlens: expected dtype torch.int32"),
    (lambda i: {"cache_seqlens": i.cache_seqlens[:1]}, ValueError, r"cache_seqlens: expected batch"),
    (lambda i: {"q_nope": i.q_nope[0]}, ValueError, r"q_nope: expected 4 dims"),
    (lambda i: {"q_pe": i.q_pe[:, :, :2]}, ValueError, r"q_pe: expected heads 4"),
    (lambda i: {"q_nope": i.q_nope.transpose(2, 3).contiguous().transpose(2, 3)}, ValueError, r"q_nope: expected a contiguous last dim"),
    (lambda i: {"ckv_cache": torch.zeros(i.ckv_cache.shape[0], 16, 520, dtype=torch.bfloat16)[..., 4:516]}, ValueError, r"ckv_cache: data pointer is not 16-byte aligned"),
    (lambda i: {"sm_scale": 0.0}, ValueError, r"sm_scale: expected a finite number > 0"),
    (lambda i: {"sm_scale": math.nan}, ValueError, r"sm_scale: expected a finite number > 0"),
    (lambda i: {"sm_scale": 3.1e37}, ValueError,
     r"sm_scale: expected a finite number > 0 and at most 1e\+30 .*got 3\.1e\+37"),
    (lambda i: {"sm_scale": 4.75e-247}, ValueError,
     r"sm_scale: expected a finite number of at least 1e-30 .*got 4\.75e-247"),
    (lambda i: {"sm_scale": "0.1"}, TypeError, r"sm_scale: expected a float"),
    (lambda i: {"ckv_cache": [1, 2]}, TypeError, r"ckv_cache: expected a torch.Tensor"),
    (lambda i: {"out": torch.empty(2, 1, 4, 256, dtype=torch.bfloat16)}, ValueError, r"out: expected shape"),
    (lambda i: {"lse": torch.empty(2, 1, 4, dtype=torch.float16)}, TypeError, r"lse: expected dtype torch.float32"),
    (lambda i: {"q_nope": i.q_nope[..., :0], "ckv_cache": i.ckv_cache[..., :0]}, ValueError, r"q_nope/q_pe: ckv_dim 0"),
    (lambda i: {"q_pe": i.q_pe[..., :0], "kpe_cache": i.kpe_cache[..., :0]}, ValueError, r"q_nope/q_pe: rope_dim 0"),
    (lambda i: {"out": torch.empty(1, 1, 4, 512, dtype=torch.bfloat16).expand(2, 1, 4, 512)}, ValueError,
     r"out: stride 0 of dim 0 .* overlap"),
    (lambda i: {"lse": torch.empty(2, 1, 1, dtype=torch.float32).expand(2, 1, 4)}, ValueError,
     r"lse: expected a contiguous last dim"),
    (lambda i: {"lse": torch.empty(1, 1, 4, dtype=torch.float32).expand(2, 1, 4)}, ValueError,
     r"lse: stride 0 of dim 0 .* overlap"),
])
def test_structural_errors_name_the_argument(override, exc, pattern):
    inp = inputs()
    with pytest.raises(exc, match=pattern):
        call(inp, **override(inp))


def test_seqlen_longer_than_the_pages():
    inp = inputs()
    seqlens = inp.cache_seqlens.clone()
    seqlens[1] = inp.block_table.shape[1] * 16 + 1
    with pytest.raises(ValueError, match=r"cache_seqlens: length \d+ at index 1 needs \d+ pages of 16, but block_table has"):
        call(inp, cache_seqlens=seqlens)


def test_negative_length():
    inp = inputs()
    seqlens = inp.cache_seqlens.clone()
    seqlens[0] = -3
    with pytest.raises(ValueError, match=r"cache_seqlens: negative length -3 at index 0"):
        call(inp, cache_seqlens=seqlens)


def test_s_q_larger_than_seqlen():
    inp = make_inputs([1, 9], heads=4, s_q=2, page_size=16, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"cache_seqlens: length 1 at index 0 is shorter than s_q=2"):
        call(inp)


def test_page_id_out_of_range():
    inp = inputs()
    table = inp.block_table.clone()
    table[1, 2] = inp.ckv_cache.shape[0] + 5
    with pytest.raises(ValueError, match=r"block_table: page id \d+ at \[1, 2\] is out of range"):
        call(inp, block_table=table)


def test_value_checks_are_skipped_unless_asked(monkeypatch):
    """Without check_values (or MLA_GEN_DEBUG) lengths are not read on the host: the device check fires."""
    monkeypatch.delenv("MLA_GEN_DEBUG", raising=False)
    inp = inputs()
    seqlens = inp.cache_seqlens.clone()
    seqlens[0] = -3
    with pytest.raises(ValueError, match=r"expected a CUDA tensor"):
        call(inp, check_values=None, cache_seqlens=seqlens)
    monkeypatch.setenv("MLA_GEN_DEBUG", "1")
    with pytest.raises(ValueError, match=r"negative length"):
        call(inp, check_values=None, cache_seqlens=seqlens)


def test_wrapper_takes_only_a_cuda_device():
    with pytest.raises(ValueError, match=r"^device: expected a CUDA device, got cpu"):
        mla_gen.MLADecodeWrapper("cpu")
    with pytest.raises(ValueError, match=r"^device: expected a CUDA device \('cuda', 'cuda:1', an index\), got 1.5"):
        mla_gen.MLADecodeWrapper(1.5)
    with pytest.raises(ValueError, match=r"^num_parts: expected a positive integer or None, got 0"):
        mla_gen.MLADecodeWrapper("cuda:0", num_parts=0)


def test_wrapper_plan_rejects_bad_arguments():
    w = mla_gen.MLADecodeWrapper("cuda:0")  # made without a device; plan checks its arguments first
    seqlens = torch.tensor([3, 4], dtype=torch.int32)
    base = dict(num_heads=16, page_size=64, max_pages=4, sm_scale=0.1)
    with pytest.raises(ValueError, match=r"num_heads: expected a positive integer, got 0"):
        w.plan(seqlens, **{**base, "num_heads": 0})
    with pytest.raises(TypeError, match=r"cache_seqlens: expected dtype torch.int32"):
        w.plan(seqlens.long(), **base)
    with pytest.raises(ValueError, match=r"sm_scale: expected a finite number > 0"):
        w.plan(seqlens, **{**base, "sm_scale": -1.0})
    with pytest.raises(ValueError, match=r"sm_scale: expected a finite number > 0 and at most"):
        w.plan(seqlens, **{**base, "sm_scale": 1e31})
    with pytest.raises(ValueError, match=r"cache_seqlens: expected a tensor on cuda:0"):
        w.plan(seqlens, **base)
    with pytest.raises(RuntimeError, match=r"call plan\(\) first"):
        w.run(*make_inputs([3, 4], heads=16).args()[:6])


def empty_batch(device: str = "cpu") -> dict:
    """Valid arguments for a batch of no requests (a serving step with nothing to decode)."""
    bf16 = dict(dtype=torch.bfloat16, device=device)
    return dict(q_nope=torch.empty(0, 1, 16, 512, **bf16), q_pe=torch.empty(0, 1, 16, 64, **bf16),
                ckv_cache=torch.zeros(4, 16, 512, **bf16), kpe_cache=torch.zeros(4, 16, 64, **bf16),
                block_table=torch.zeros(0, 2, dtype=torch.int32, device=device),
                cache_seqlens=torch.zeros(0, dtype=torch.int32, device=device), sm_scale=0.1)


def test_empty_batch_is_valid_input():
    """B = 0 passes every structural and value check (on the CPU it then stops at the device check)."""
    with pytest.raises(ValueError, match=r"q_nope: expected a CUDA tensor"):
        mla_gen.mla_decode(**empty_batch(), check_values=True)


def test_non_finite_q_is_rejected_when_values_are_checked():
    inp = inputs()
    for name in ("q_nope", "q_pe"):
        bad = getattr(inp, name).clone()
        bad[1, 0, 2, 5] = float("nan") if name == "q_nope" else float("inf")
        with pytest.raises(ValueError, match=rf"^{name}: .*not finite .*\[1, 0, 2\]"):
            call(inp, **{name: bad})
        with pytest.raises(ValueError, match=r"q_nope: expected a CUDA tensor"):
            call(inp, check_values=False, **{name: bad})  # not inspected without the check
