"""mla_gen.layer with an fp8 latent cache, on the CPU (issue 13): tokens are quantized on append exactly as
mla_gen.fp8 quantizes a cache, both forms read the same dequantized values (vanilla == absorbed), the
result stays within e4m3's rounding of the exact layer's, and bad caches or options name the field."""
from __future__ import annotations

import copy

import pytest
import torch

from layer_cases import build_case
from mla_gen import fp8
from mla_gen.layer import LatentCache, MLAAttention
from mla_gen.testing import rel_l2

# preset -> heads held; fp8_ds_mla needs kv_lora_rank 512 and rope 64, so minicpm3-4b (256/32) is e4m3 only
CASES = [("deepseek-v3", (48, 64), "fp8_e4m3"), ("deepseek-v3", (48, 64), "fp8_ds_mla"),
         ("deepseek-v2-lite", None, "fp8_ds_mla"), ("minicpm3-4b", None, "fp8_e4m3")]
LENGTHS = [0, 1, 15, 16, 17, 40]


def forms(case):
    args = (case.block_table, case.cache_seqlens)
    return (case.layer(case.x, copy.deepcopy(case.cache), *args, form="vanilla"),
            case.layer(case.x, case.cache, *args, form="absorbed"))


@pytest.mark.parametrize("s_q", [1, 3])
@pytest.mark.parametrize("preset, heads, kv_dtype", CASES, ids=[f"{p}-{k}" for p, _, k in CASES])
def test_forms_agree_on_an_fp8_cache(preset, heads, kv_dtype, s_q):
    case = build_case(preset, LENGTHS, s_q=s_q, head_range=heads, seed=s_q, kv_dtype=kv_dtype,
                      kv_scale=0.0213 if kv_dtype == "fp8_e4m3" else None)
    vanilla, absorbed = forms(case)
    assert case.layer.last_backend == "torch"
    assert not vanilla.isnan().any() and float(vanilla.abs().mean()) > 0.1
    assert rel_l2(absorbed, vanilla) <= 1e-10
    exact = build_case(preset, LENGTHS, s_q=s_q, head_range=heads, seed=s_q)  # same weights, inputs, context
    want = exact.layer(exact.x, exact.cache, exact.block_table, exact.cache_seqlens, form="vanilla")
    err = rel_l2(vanilla, want)
    assert 1e-4 < err < 0.1, f"rel L2 {err:.2e} against the float64 cache: not e4m3's rounding (2^-4 at most)"


@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "fp8_ds_mla"])
def test_append_quantizes_as_mla_gen_fp8(kv_dtype):
    layer = MLAAttention("deepseek-v3", hidden_size=128, head_range=(0, 4), generator=torch.Generator().manual_seed(0))
    exact = layer.new_cache(6, 16, fill=float("nan"))
    cache = layer.new_cache(6, 16, fill=float("nan"), kv_dtype=kv_dtype,
                            kv_scale=torch.tensor([0.011]) if kv_dtype == "fp8_e4m3" else None)
    table = torch.tensor([[4, 1, 0], [2, 5, 3]], dtype=torch.int32)
    hidden = torch.randn(2, 37, 128, generator=torch.Generator().manual_seed(1))
    for c in (exact, cache):
        layer.append_kv(hidden, c, table, torch.tensor([0, 5], dtype=torch.int32))
    if kv_dtype == "fp8_e4m3":
        whole = torch.cat([fp8.to_e4m3(exact.ckv, cache.kv_scale), fp8.to_e4m3(exact.kpe, cache.kv_scale)], dim=-1)
        got = torch.cat([cache.ckv, cache.kpe], dim=-1)
    else:
        whole, got = fp8.quantize_ds_mla(exact.ckv, exact.kpe), cache.ckv
    assert torch.equal(got.view(torch.uint8), whole.view(torch.uint8))  # unwritten slots (NaN) included


def test_e4m3_cache_defaults_to_scale_one():
    cache = LatentCache.empty(2, 16, 512, 64, kv_dtype="fp8_e4m3")
    assert cache.kv_scale.dtype == torch.float32 and cache.kv_scale.tolist() == [1.0]
    assert cache.ckv.dtype == torch.float8_e4m3fn and cache.ckv.data_ptr() + 512 == cache.kpe.data_ptr()
    ds = LatentCache.empty(2, 16, 512, 64, kv_dtype="fp8_ds_mla")
    assert ds.ckv.shape == (2, 16, 656) and ds.ckv.dtype == torch.uint8 and ds.kpe is None and ds.kv_scale is None


@pytest.mark.parametrize("kw, exc, pattern", [
    (dict(kv_dtype="fp8"), ValueError, r"^kv_dtype: expected one of None, 'fp8_e4m3', 'fp8_ds_mla'"),
    (dict(kv_dtype="fp8_ds_mla", kv_scale=0.1), ValueError, r"^kv_scale: only an fp8_e4m3 cache"),
    (dict(kv_scale=0.1), ValueError, r"^kv_scale: only an fp8_e4m3 cache"),
    (dict(kv_dtype="fp8_e4m3", kv_scale=0.0), ValueError, r"^kv_scale: expected one positive finite number"),
    (dict(kv_dtype="fp8_e4m3", kv_scale=float("inf")), ValueError, r"^kv_scale: expected one positive finite"),
    (dict(kv_dtype="fp8_e4m3", kv_scale=[0.1, 0.2]), ValueError, r"^kv_scale: expected one positive finite"),
])
def test_new_cache_options_name_the_argument(kw, exc, pattern):
    layer = MLAAttention("deepseek-v3", hidden_size=64, head_range=(0, 2))
    with pytest.raises(exc, match=pattern):
        layer.new_cache(2, 16, **kw)


def test_ds_mla_needs_512_ckv_and_64_rope():
    layer = MLAAttention("minicpm3-4b", hidden_size=64, head_range=(0, 2))
    with pytest.raises(ValueError, match=r"^kv_dtype: fp8_ds_mla holds 512 ckv and 64 rope values per token, got "
                                         r"kv_lora_rank 256, rope 32"):
        layer.new_cache(2, 16, kv_dtype="fp8_ds_mla")


def _bad(layer: MLAAttention, what: str) -> LatentCache:
    e4m3 = layer.new_cache(4, 16, kv_dtype="fp8_e4m3")
    ds = layer.new_cache(4, 16, kv_dtype="fp8_ds_mla")
    plain = layer.new_cache(4, 16)
    return {"ds with kpe": LatentCache(ds.ckv, e4m3.kpe, "fp8_ds_mla"),
            "ds not 656": LatentCache(ds.ckv[..., :576], None, "fp8_ds_mla"),
            "e4m3 without scale": LatentCache(e4m3.ckv, e4m3.kpe, "fp8_e4m3"),
            "e4m3 float64 scale": LatentCache(e4m3.ckv, e4m3.kpe, "fp8_e4m3", e4m3.kv_scale.double()),
            "e4m3 of floats": LatentCache(e4m3.ckv.float(), e4m3.kpe, "fp8_e4m3", e4m3.kv_scale),
            "16-bit with scale": LatentCache(plain.ckv, plain.kpe, None, e4m3.kv_scale),
            "unknown format": LatentCache(e4m3.ckv, e4m3.kpe, "fp8e5m2", e4m3.kv_scale)}[what]


@pytest.mark.parametrize("what, exc, pattern", [
    ("ds with kpe", ValueError, r"^cache.kpe: expected None in an fp8_ds_mla cache"),
    ("ds not 656", ValueError, r"^cache.ckv: expected shape \[num_pages, page_size, 656\]"),
    ("e4m3 without scale", ValueError, r"^cache.kv_scale: expected a tensor exactly for an fp8_e4m3 cache"),
    ("e4m3 float64 scale", TypeError, r"^cache.kv_scale: expected a float32 tensor of one element"),
    ("e4m3 of floats", TypeError, r"^cache.ckv: expected torch.float8_e4m3fn on cpu, got torch.float32"),
    ("16-bit with scale", ValueError, r"^cache.kv_scale: expected a tensor exactly for an fp8_e4m3 cache"),
    ("unknown format", ValueError, r"^cache.kv_dtype: expected one of"),
])
def test_bad_fp8_caches_name_the_field(what, exc, pattern):
    layer = MLAAttention("deepseek-v3", hidden_size=64, head_range=(0, 2))
    table = torch.zeros(1, 2, dtype=torch.int32)
    with pytest.raises(exc, match=pattern):
        layer(torch.randn(1, 1, 64), _bad(layer, what), table, torch.zeros(1, dtype=torch.int32))
