"""mla_gen.fp8 (CPU): the two fp8 cache formats round-trip within e4m3's precision, lay bytes out as the
engines do (656-byte tokens: e4m3 ckv, fp32 scales, bf16 rope), and bad input names its argument."""
from __future__ import annotations

import pytest
import torch

from mla_gen.fp8 import (DS_MLA_BYTES, E4M3_MAX, dequantize_ds_mla, dequantize_per_tensor, quantize_ds_mla,
                         quantize_per_tensor)

E4M3_REL = 2.0 ** -4  # e4m3 keeps 3 mantissa bits: rounding error at most half an ulp, 2^-4 of the value


def caches(pages: int = 3, page_size: int = 16, ckv: int = 512, rope: int = 64, seed: int = 0, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    c = (torch.randn(pages, page_size, ckv, generator=g) * scale).to(torch.bfloat16)
    k = (torch.randn(pages, page_size, rope, generator=g) * scale).to(torch.bfloat16)
    return c, k


def within_e4m3(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor) -> bool:
    """|got - want| <= 2^-4 |want| + the smallest e4m3 step times the scale (values near 0 are subnormal)."""
    return bool(((got - want).abs() <= E4M3_REL * want.abs() + 2.0 ** -9 * scale).all())


@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 300.0])
def test_per_tensor_round_trip(magnitude: float) -> None:
    ckv, kpe = caches(scale=magnitude)
    cache, scale = quantize_per_tensor(ckv, kpe)
    assert cache.dtype == torch.float8_e4m3fn and cache.shape == (3, 16, 576) and scale.dtype == torch.float32
    assert float(cache.float().abs().max()) == E4M3_MAX  # the largest magnitude lands on e4m3's maximum
    c2, k2 = dequantize_per_tensor(cache, scale, 512)
    assert within_e4m3(c2, ckv.float(), scale) and within_e4m3(k2, kpe.float(), scale)


def test_per_tensor_takes_a_given_scale_not_a_power_of_two() -> None:
    ckv, kpe = caches()
    cache, scale = quantize_per_tensor(ckv, kpe, scale=0.0123)
    assert float(scale) == pytest.approx(0.0123)
    c2, _ = dequantize_per_tensor(cache, scale, 512)
    # values past 448 x scale saturate at e4m3's maximum instead of becoming NaN
    assert torch.isfinite(c2).all() and float(c2.abs().max()) <= E4M3_MAX * 0.0123 * (1 + 1e-6)


@pytest.mark.parametrize("pow2", [False, True])
def test_ds_mla_layout_and_round_trip(pow2: bool) -> None:
    ckv, kpe = caches(seed=1)
    ckv[0, 0, :128] = 0  # an all-zero group: scale 1, values 0
    ckv[1, 2, 256:384] *= 50  # one loud group among quiet ones: its own scale
    cache = quantize_ds_mla(ckv, kpe, pow2_scales=pow2)
    assert cache.dtype == torch.uint8 and cache.shape == (3, 16, DS_MLA_BYTES) == (3, 16, 656)
    scales = cache[..., 512:528].contiguous().view(torch.float32)
    amax = ckv.float().reshape(3, 16, 4, 128).abs().amax(-1)
    want = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    if pow2:
        assert torch.equal(scales, torch.exp2(torch.ceil(torch.log2(want))))
    else:
        assert torch.allclose(scales, want)
    # the rope part is the bf16 input, bit for bit
    assert torch.equal(cache[..., 528:].contiguous().view(torch.bfloat16), kpe)
    c2, k2 = dequantize_ds_mla(cache)
    assert torch.equal(k2, kpe.float())
    per_value_scale = scales.repeat_interleave(128, dim=-1)
    assert within_e4m3(c2, ckv.float(), per_value_scale)
    assert torch.equal(c2[0, 0, :128], torch.zeros(128))
    # the same bytes read as float8_e4m3fn (FlashMLA's cache dtype) dequantize the same
    assert torch.equal(dequantize_ds_mla(cache.view(torch.float8_e4m3fn))[0], c2)


def test_values_near_e4m3_max_stay_finite() -> None:
    ckv, kpe = caches()
    ckv[0, 0, 0] = 3.0e38  # bf16 can hold it; its group's scale takes it to 448
    cache = quantize_ds_mla(ckv, kpe)
    c2, _ = dequantize_ds_mla(cache)
    assert torch.isfinite(c2).all()
    assert float(c2[0, 0, 0]) == pytest.approx(float(ckv[0, 0, 0]), rel=E4M3_REL)


@pytest.mark.parametrize("call, match", [
    (lambda c, k: quantize_ds_mla(c[..., :256], k), r"^ckv_cache: the 656-byte layout holds 512"),
    (lambda c, k: quantize_ds_mla(c, k[..., :32]), r"^kpe_cache: the 656-byte layout holds 64 rope"),
    (lambda c, k: quantize_ds_mla(c, k[:2]), r"^kpe_cache: expected pages and page size"),
    (lambda c, k: quantize_ds_mla(c.to(torch.int16), k), r"^ckv_cache: expected a 16- or 32-bit float"),
    (lambda c, k: quantize_ds_mla(c[0], k), r"^ckv_cache: expected a paged cache"),
    (lambda c, k: quantize_per_tensor(c, k, scale=0.0), r"^scale: expected one positive finite"),
    (lambda c, k: quantize_per_tensor(c, k, scale=[1.0, 2.0]), r"^scale: expected one positive finite"),
    (lambda c, k: dequantize_ds_mla(torch.zeros(2, 4, 576, dtype=torch.uint8)), r"^kv_cache: expected a last dim of 656"),
    (lambda c, k: dequantize_ds_mla(torch.zeros(2, 4, 656)), r"^kv_cache: expected 656-byte tokens"),
    (lambda c, k: dequantize_per_tensor(torch.zeros(2, 4, 576), torch.ones(1), 512), r"^kv_cache: expected dtype"),
    (lambda c, k: dequantize_per_tensor(quantize_per_tensor(c, k)[0], torch.ones(2), 512), r"^kv_scale: expected a float32"),
    (lambda c, k: dequantize_per_tensor(quantize_per_tensor(c, k)[0], torch.ones(1, dtype=torch.float64), 512),
     r"^kv_scale: expected a float32"),
    (lambda c, k: dequantize_per_tensor(quantize_per_tensor(c, k)[0], torch.ones(1), 576), r"^ckv_dim: expected 1..575"),
])
def test_bad_input_names_the_argument(call, match) -> None:
    ckv, kpe = caches()
    with pytest.raises((TypeError, ValueError), match=match):
        call(ckv, kpe)


def test_scales_come_from_the_finite_values() -> None:
    """A cache with NaN (poisoned slots) and inf: the scales are those of the finite values, NaN stays NaN and
    inf saturates at e4m3's largest value, in both formats."""
    g = torch.Generator().manual_seed(7)
    ckv = torch.randn(3, 4, 512, generator=g).to(torch.bfloat16)
    kpe = torch.randn(3, 4, 64, generator=g).to(torch.bfloat16)
    finite = max(float(ckv.float().abs().max()), float(kpe.float().abs().max()))
    ckv[0, 0, 5] = float("nan")
    ckv[1, 2, 7] = float("inf")
    cache, scale = quantize_per_tensor(ckv, kpe)
    assert float(scale) == pytest.approx(finite / E4M3_MAX)
    assert torch.isnan(cache[0, 0, 5].float()) and float(cache[1, 2, 7].float()) == E4M3_MAX
    ds = quantize_ds_mla(ckv, kpe)
    d_ckv, _ = dequantize_ds_mla(ds)
    assert torch.isnan(d_ckv[0, 0, 5]) and torch.isfinite(d_ckv[0, 0, 6])  # the group's scale is finite
    group_amax = float(ckv[1, 2, :128].float().nan_to_num(0, 0, 0).abs().max())
    assert float(d_ckv[1, 2, 7]) == pytest.approx(group_amax, rel=0.07)
