"""mla_gen.layer on the CPU in float64: vanilla == absorbed for every preset's shape, both == a dense
HF-style computation written out here, DeepSeek weight names and shapes, head sharding, the
absorbed-weight cache, sm_scale, YaRN frequencies, the automatic form choice, argument errors."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from generator.errors import SpecError
from generator.presets import model_config
from layer_cases import build_case
from mla_gen.layer import MLAAttention, head_range_for
from mla_gen.reference import mla_decode_reference
from mla_gen.rope import RotaryEmbedding, rope_frequencies
from mla_gen.testing import rel_l2

# preset -> heads held (real head dims, scaled-down hidden size): TP-8 splits of the big models
PRESETS = {"deepseek-v3": (48, 64), "deepseek-v2-lite": None, "kimi-k2": (8, 16), "minicpm3-4b": None}
LENGTHS = [0, 1, 15, 16, 17, 40]  # cached tokens before the step, page size 16: ragged, page edges


def run_both(case):
    args = (case.block_table, case.cache_seqlens)
    cache2 = copy.deepcopy(case.cache)
    vanilla = case.layer(case.x, case.cache, *args, form="vanilla")
    absorbed = case.layer(case.x, cache2, *args, form="absorbed")
    return vanilla, absorbed


@pytest.mark.parametrize("s_q", [1, 2, 7])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_vanilla_equals_absorbed_float64(preset, s_q):
    case = build_case(preset, LENGTHS, s_q=s_q, head_range=PRESETS[preset], seed=s_q)
    vanilla, absorbed = run_both(case)
    assert case.layer.last_backend == "torch"
    assert not vanilla.isnan().any() and not absorbed.isnan().any()
    assert float(vanilla.abs().mean()) > 0.1  # a real signal, not zeros
    assert rel_l2(absorbed, vanilla) <= 1e-10


def hf_rope(x: torch.Tensor, pos: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor:
    """HF modeling_deepseek.apply_rotary_pos_emb: de-interleave the pairs, then rotate halves."""
    freqs = pos.double()[:, None] * rope.inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos() * rope.scale, emb.sin() * rope.scale
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    d = x.shape[-1]
    x = x.reshape(*x.shape[:-1], d // 2, 2).transpose(-1, -2).reshape(x.shape)
    rotated = torch.cat([-x[..., d // 2:], x[..., :d // 2]], dim=-1)
    return x * cos.view(shape) + rotated * sin.view(shape)


def dense_layer(layer: MLAAttention, ctx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One request, no cache, no absorption: every token's K and V from its own hidden state."""
    sd = {k: v.double() for k, v in layer.state_dict().items()}
    H, D, R, V, C = layer.num_heads, layer.nope_dim, layer.rope_dim, layer.v_dim, layer.kv_lora_rank

    def rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    every = torch.cat([ctx, x])
    n, s_q = every.shape[0], x.shape[0]
    if layer.q_lora_rank:
        q = rms(x @ sd["q_a_proj.weight"].T, sd["q_a_layernorm.weight"]) @ sd["q_b_proj.weight"].T
    else:
        q = x @ sd["q_proj.weight"].T
    q = q.view(s_q, H, D + R)
    kv_a = every @ sd["kv_a_proj_with_mqa.weight"].T
    latent = rms(kv_a[:, :C], sd["kv_a_layernorm.weight"])
    kv = (latent @ sd["kv_b_proj.weight"].T).view(n, H, D + V)
    q_pe = hf_rope(q[..., D:], torch.arange(n - s_q, n), layer.rope)
    k_pe = hf_rope(kv_a[:, C:], torch.arange(n), layer.rope)
    scores = (torch.einsum("shd,thd->sht", q[..., :D], kv[..., :D])
              + torch.einsum("shr,tr->sht", q_pe, k_pe)) * layer.sm_scale
    visible = torch.arange(n)[None, :] <= torch.arange(n - s_q, n)[:, None]
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    out = torch.einsum("sht,thv->shv", scores.softmax(-1), kv[..., D:])
    return out.reshape(s_q, H * V) @ sd["o_proj.weight"].T


@pytest.mark.parametrize("preset", ["deepseek-v3", "deepseek-v2-lite"])
def test_layer_matches_dense_hf_style_computation(preset):
    """Checks what vanilla == absorbed cannot: projections, norms, RoPE (HF's de-interleaved form
    gives the same scores as the interleaved pairs used here), the cache write, sm_scale."""
    case = build_case(preset, [0, 3, 20], s_q=3, head_range=PRESETS[preset], seed=11)
    vanilla, absorbed = run_both(case)
    for b, ctx in enumerate(case.context):
        want = dense_layer(case.layer, ctx, case.x[b])
        assert rel_l2(vanilla[b], want) <= 1e-10
        assert rel_l2(absorbed[b], want) <= 1e-10


def test_latent_attention_matches_reference_decode():
    case = build_case("deepseek-v2-lite", LENGTHS, s_q=2, seed=5)
    layer = case.layer
    lengths = case.cache_seqlens + 2
    layer.append_kv(case.x, case.cache, case.block_table, case.cache_seqlens)  # the step's own tokens
    g = torch.Generator().manual_seed(6)
    q_abs = torch.randn(len(LENGTHS), 2, layer.num_heads, layer.kv_lora_rank, generator=g, dtype=torch.float64)
    q_pe = torch.randn(len(LENGTHS), 2, layer.num_heads, layer.rope_dim, generator=g, dtype=torch.float64)
    positions = case.cache_seqlens.long()[:, None] + torch.arange(2)
    got = layer.latent_attention(q_abs, q_pe, case.cache, case.block_table, positions, lengths)
    want, _ = mla_decode_reference(q_abs, q_pe, case.cache.ckv, case.cache.kpe, case.block_table, lengths,
                                   layer.sm_scale)
    assert rel_l2(got, want) <= 1e-12


def test_cache_write_positions_and_poison_untouched():
    case = build_case("minicpm3-4b", [0, 5, 16], s_q=2, seed=2)
    case.layer(case.x, case.cache, case.block_table, case.cache_seqlens, form="vanilla")
    written = torch.zeros(case.cache.num_pages, case.cache.page_size, dtype=torch.bool)
    for b, n in enumerate([2, 7, 18]):
        for t in range(n):
            written[int(case.block_table[b, t // 16]), t % 16] = True
    assert not case.cache.ckv[written].isnan().any() and not case.cache.kpe[written].isnan().any()
    assert case.cache.ckv[~written].isnan().all() and case.cache.kpe[~written].isnan().all()
    norm = case.cache.ckv[written].pow(2).mean(-1).sqrt()  # RMS-normalized, times weights near 1
    assert float(norm.min()) > 0.5 and float(norm.max()) < 1.5


DEEPSEEK_V3_SHAPES = {  # the real checkpoint's model.layers.N.self_attn.* tensors
    "q_a_proj.weight": (1536, 7168), "q_a_layernorm.weight": (1536,), "q_b_proj.weight": (128 * 192, 1536),
    "kv_a_proj_with_mqa.weight": (512 + 64, 7168), "kv_a_layernorm.weight": (512,),
    "kv_b_proj.weight": (128 * (128 + 128), 512), "o_proj.weight": (7168, 128 * 128)}
DEEPSEEK_V2_LITE_SHAPES = {
    "q_proj.weight": (16 * 192, 2048), "kv_a_proj_with_mqa.weight": (576, 2048), "kv_a_layernorm.weight": (512,),
    "kv_b_proj.weight": (16 * 256, 512), "o_proj.weight": (2048, 16 * 128)}


@pytest.mark.parametrize("preset,shapes", [("deepseek-v3", DEEPSEEK_V3_SHAPES),
                                           ("deepseek-v2-lite", DEEPSEEK_V2_LITE_SHAPES)])
def test_weight_names_and_shapes_are_deepseeks(preset, shapes):
    layer = MLAAttention(preset, device="meta")
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == shapes


def test_loads_a_prefixed_deepseek_state_dict():
    case = build_case("deepseek-v3", [4, 9], s_q=1, hidden_size=128, head_range=(0, 4), seed=1)
    prefix = "model.layers.3.self_attn."
    checkpoint = {prefix + k: v.clone() for k, v in case.layer.state_dict().items()}
    other = MLAAttention("deepseek-v3", hidden_size=128, head_range=(0, 4), dtype=torch.float64,
                         generator=torch.Generator().manual_seed(2))
    result = other.load_state_dict({k.removeprefix(prefix): v for k, v in checkpoint.items()}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    args = (case.block_table, case.cache_seqlens)
    want = case.layer(case.x, copy.deepcopy(case.cache), *args, form="absorbed")
    assert torch.equal(other(case.x, case.cache, *args, form="absorbed"), want)


def test_head_shards_sum_to_the_full_layer():
    """TP: each rank holds heads [h0, h1) of the full weights; the o_proj partial sums add up."""
    full = build_case("deepseek-v2-lite", [3, 17], s_q=2, seed=9)
    want = full.layer(full.x, copy.deepcopy(full.cache), full.block_table, full.cache_seqlens, form="vanilla")
    total = torch.zeros_like(want)
    for rank in range(4):
        h = head_range_for(16, 4, rank)
        shard = MLAAttention("deepseek-v2-lite", hidden_size=256, head_range=h, dtype=torch.float64)
        shard.load_state_dict(MLAAttention.shard_state_dict(full.layer.state_dict(), "deepseek-v2-lite", h))
        form = "absorbed" if rank % 2 else "vanilla"
        total += shard(full.x, copy.deepcopy(full.cache), full.block_table, full.cache_seqlens, form=form)
    assert rel_l2(total, want) <= 1e-12
    with pytest.raises(ValueError, match="tp_size"):
        head_range_for(16, 3, 0)


def test_absorbed_weights_cached_and_invalidated():
    case = build_case("deepseek-v3", [5, 9], s_q=1, head_range=(0, 2))
    layer = case.layer
    first = layer.absorbed_weights()
    assert layer.absorbed_weights() is first
    with torch.no_grad():
        layer.kv_b_proj.weight.mul_(1.5)  # in place: the version counter moves
    second = layer.absorbed_weights()
    assert second is not first and torch.allclose(second.w_uk, 1.5 * first.w_uk)
    layer.load_state_dict({k: v * 2 if k == "kv_b_proj.weight" else v for k, v in layer.state_dict().items()})
    third = layer.absorbed_weights()
    assert third is not second and torch.allclose(third.w_uv, 2 * second.w_uv)
    vanilla, absorbed = run_both(case)  # still in agreement with the new weights
    assert rel_l2(absorbed, vanilla) <= 1e-10


@pytest.mark.parametrize("preset,want", [
    # 1/sqrt(nope + rope) * (0.1 * mscale_all_dim * ln(factor) + 1)^2 from models.json's rope_scaling
    ("deepseek-v3", 1 / math.sqrt(128 + 64) * (0.1 * 1.0 * math.log(40) + 1) ** 2),
    ("deepseek-v2-lite", 1 / math.sqrt(128 + 64) * (0.1 * 0.707 * math.log(40) + 1) ** 2),
    ("kimi-k2", 1 / math.sqrt(128 + 64) * (0.1 * 1.0 * math.log(64) + 1) ** 2),
    ("minicpm3-4b", 1 / math.sqrt(64 + 32)),  # no YaRN
])
def test_sm_scale_by_hand(preset, want):
    layer = MLAAttention(preset, hidden_size=64, device="meta")
    assert layer.sm_scale == pytest.approx(want, rel=1e-14)
    assert layer.sm_scale == pytest.approx(model_config(preset).sm_scale, rel=1e-14)
    assert abs(layer.sm_scale - (layer.kv_lora_rank + layer.rope_dim) ** -0.5) > 1e-3


def test_sm_scale_known_values():
    assert MLAAttention("deepseek-v3", device="meta").sm_scale == pytest.approx(0.1352337788608801, rel=1e-12)
    assert MLAAttention("deepseek-v2-lite", device="meta").sm_scale == pytest.approx(0.11472138679292614, rel=1e-12)
    with pytest.raises(SpecError, match="sm_scale"):
        MLAAttention("deepseek-v2", device="meta")  # rope scaling never read: no silent default
    assert MLAAttention("deepseek-v2", device="meta", sm_scale=0.07).sm_scale == 0.07


def test_yarn_frequencies_deepseek_v3():
    """dim 64, base 1e4, factor 40, original 4096, beta 32/1: correction range by hand
    low = floor(64 ln(4096 / (32 * 2pi)) / (2 ln 1e4)) = floor(10.47) = 10,
    high = ceil(64 ln(4096 / (1 * 2pi)) / (2 ln 1e4)) = ceil(22.51) = 23."""
    inv, scale = rope_frequencies(64, 10000.0, model_config("deepseek-v3").rope_scaling)
    base = 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    assert scale == 1.0
    assert torch.allclose(inv[:11], base[:11], rtol=1e-15)  # ramp 0 up to index low = 10
    assert torch.allclose(inv[23:], base[23:] / 40, rtol=1e-15)  # ramp 1 from index high = 23
    assert ((inv[11:23] < base[11:23]) & (inv[11:23] > base[11:23] / 40)).all()
    plain, _ = rope_frequencies(32, 10000.0, None)
    assert torch.allclose(plain, 10000.0 ** (-torch.arange(0, 32, 2, dtype=torch.float64) / 32))
    with pytest.raises(ValueError, match="rope_scaling.type"):
        rope_frequencies(64, 1e4, {"type": "longrope", "factor": 2})


def test_rope_scores_depend_on_relative_position_only():
    rope = RotaryEmbedding(64, 10000.0, model_config("deepseek-v3").rope_scaling)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 64, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 64, generator=g, dtype=torch.float64)
    dot = [float((rope(q, torch.tensor([[p + 7]])) * rope(k, torch.tensor([[p]]))).sum()) for p in (0, 100, 5000)]
    assert dot[1] == pytest.approx(dot[0], rel=1e-9) and dot[2] == pytest.approx(dot[0], rel=1e-9)


def test_auto_form_follows_the_cost_model():
    layer = MLAAttention("deepseek-v3", hidden_size=64, head_range=(0, 16), device="meta")
    assert layer.choose_form(1, 1, 4096) == "absorbed"
    assert layer.choose_form(1, 2048, 4096) == "vanilla"
    case = build_case("deepseek-v2-lite", [30, 40], s_q=1, seed=4)
    case.layer(case.x, case.cache, case.block_table, case.cache_seqlens)
    assert case.layer.last_form == "absorbed"
    prefill = build_case("deepseek-v2-lite", [0], s_q=300, page_size=64, seed=4)
    prefill.layer(prefill.x, prefill.cache, prefill.block_table, prefill.cache_seqlens)
    assert prefill.layer.last_form == prefill.layer.choose_form(1, 300, 0) == "vanilla"


def test_errors_name_the_argument():
    case = build_case("deepseek-v2-lite", [3], s_q=1)
    layer, args = case.layer, (case.cache, case.block_table, case.cache_seqlens)
    with pytest.raises(ValueError, match="^form:"):
        layer(case.x, *args, form="fast")
    with pytest.raises(TypeError, match="^hidden_states: expected dtype"):
        layer(case.x.float(), *args)
    with pytest.raises(ValueError, match="^hidden_states: expected shape"):
        layer(case.x[..., :7], *args)
    with pytest.raises(ValueError, match="^cache_seqlens:"):
        layer(case.x, case.cache, case.block_table, torch.tensor([10_000], dtype=torch.int32))
    with pytest.raises(TypeError, match="^block_table:"):
        layer(case.x, case.cache, case.block_table.float(), case.cache_seqlens)
    with pytest.raises(TypeError, match="^cache:"):
        layer(case.x, (case.cache.ckv, case.cache.kpe), case.block_table, case.cache_seqlens)
    with pytest.raises(ValueError, match="^head_range:"):
        MLAAttention("deepseek-v3", head_range=(8, 8), device="meta")
    with pytest.raises(ValueError, match="^hidden_size:"):
        MLAAttention("minicpm3-4b", device="meta")  # models.json has no hidden size for it
