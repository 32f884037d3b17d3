"""MLA attention layer with DeepSeek-V2/V3 weights over a paged latent cache, in two forms.

    layer = MLAAttention("deepseek-v3", hidden_size=1024, head_range=(0, 16), dtype=torch.bfloat16, device="cuda")
    cache = layer.new_cache(num_pages=64, page_size=64)
    out = layer(hidden, cache, block_table, cache_seqlens)          # form="auto" | "vanilla" | "absorbed"

Each call projects the new tokens, appends their normalized latent (ckv) and rotated rope key
(kpe) to the cache at positions cache_seqlens[b] + i, then attends over cache_seqlens[b] + s_q
tokens, causally among the new ones, in one of two forms (an fp8 cache, `new_cache(..., kv_dtype=)`,
is quantized on append; the torch forms read it dequantized, mla_decode as it is stored):

- vanilla: kv_b_proj up-projects every cached latent into per-head K_nope (W_UK) and V (W_UV);
  K = [K_nope | shared k_pe]; ordinary attention with sm_scale; o_proj.
- absorbed: q_nope[h] @ W_UK[h] gives a kv_lora_rank-wide query; attention over the latent cache
  as one MQA head (K = [ckv | kpe], V = ckv): mla_gen.mla_decode on CUDA in bf16/fp16, else a
  torch einsum; the latent output per head goes through W_UV[h], then o_proj. W_UK and W_UV are
  not folded into q_b_proj / o_proj: that would cost more FLOPs per token (vLLM and SGLang keep
  them separate too).

sm_scale = ModelConfig.sm_scale: 1/sqrt(qk_nope + qk_rope) * YaRN mscale^2, never 1/sqrt(C + R).
RoPE: interleaved pairs on the rope part only, see mla_gen.rope. With head_range=(h0, h1) the
layer holds heads [h0, h1) of a tensor-parallel split; its output is o_proj's partial sum, which
the caller all-reduces. Inference only: forward runs under torch.no_grad().
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from generator.presets import ModelConfig, model_config
from mla_gen import cost, fp8, ops  # noqa: F401  (ops: registers torch.ops.mla_gen.*)
from mla_gen.dtypes import DS_MLA_DTYPES, KERNEL_DTYPES
from mla_gen.rope import RotaryEmbedding

FORMS = ("auto", "vanilla", "absorbed")
# Keys whose rows (out features) or columns (in features) hold per-head blocks, for shard_state_dict.
_HEAD_ROWS = ("q_proj.weight", "q_b_proj.weight", "kv_b_proj.weight")
_HEAD_COLS = ("o_proj.weight",)


class RMSNorm(nn.Module):
    """DeepseekV3RMSNorm: normalized in float32 (float64 for float64 input), then times weight."""

    def __init__(self, dim: int, eps: float = 1e-6, *, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


KV_DTYPES = (None, "fp8_e4m3", "fp8_ds_mla")


@dataclasses.dataclass
class LatentCache:
    """Paged MLA cache: ckv [num_pages, page_size, kv_lora_rank] (after kv_a_layernorm) and
    kpe [num_pages, page_size, rope] (RoPE applied), by default views of one
    [num_pages, page_size, kv_lora_rank + rope] tensor (FlashMLA's layout). In fp8 (kv_dtype, the
    formats of mla_gen.fp8; tokens are quantized as they are appended): "fp8_e4m3", ckv and kpe
    float8_e4m3fn views of one cache and kv_scale, its fixed float32 [1] scale; "fp8_ds_mla", ckv the
    [num_pages, page_size, 656] uint8 cache (per token its own scales, the rope in bf16) and kpe None."""
    ckv: torch.Tensor
    kpe: torch.Tensor | None
    kv_dtype: str | None = None
    kv_scale: torch.Tensor | None = None

    @classmethod
    def empty(cls, num_pages: int, page_size: int, kv_lora_rank: int, rope_dim: int, *,
              dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
              fill: float = 0.0, kv_dtype: str | None = None,
              kv_scale: float | torch.Tensor | None = None) -> "LatentCache":
        """A cache filled with `fill` (NaN makes stray reads of unwritten slots show). dtype: of a 16-bit
        (or any torch) cache; kv_dtype "fp8_e4m3" or "fp8_ds_mla" makes an fp8 one instead. kv_scale:
        fp8_e4m3's per-tensor scale, fixed for the cache's life (default 1.0, vLLM's when it has no
        calibrated scale). Raises ValueError naming the argument."""
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"num_pages/page_size: expected >= 1, got {num_pages}, {page_size}")
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype: expected one of {', '.join(map(repr, KV_DTYPES))}, got {kv_dtype!r}")
        if kv_dtype != "fp8_e4m3" and kv_scale is not None:
            raise ValueError(f"kv_scale: only an fp8_e4m3 cache takes a per-tensor scale, got kv_dtype {kv_dtype!r}")
        shape = (num_pages, page_size)
        if kv_dtype == "fp8_ds_mla":
            if (kv_lora_rank, rope_dim) != (fp8.DS_MLA_CKV, fp8.DS_MLA_ROPE):
                raise ValueError(f"kv_dtype: fp8_ds_mla holds {fp8.DS_MLA_CKV} ckv and {fp8.DS_MLA_ROPE} rope values "
                                 f"per token, got kv_lora_rank {kv_lora_rank}, rope {rope_dim}")
            token = fp8.quantize_ds_mla(torch.full((1, 1, kv_lora_rank), fill, device=device),
                                        torch.full((1, 1, rope_dim), fill, device=device))
            return cls(token.expand(*shape, -1).contiguous(), None, kv_dtype)
        if kv_dtype == "fp8_e4m3":
            scale = torch.as_tensor(1.0 if kv_scale is None else kv_scale, dtype=torch.float32, device=device)
            if scale.numel() != 1 or not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
                raise ValueError(f"kv_scale: expected one positive finite number, got {kv_scale!r}")
            scale = scale.reshape(1)
            byte = fp8.to_e4m3(torch.full((1,), fill, device=device), scale).view(torch.uint8)
            kv = byte.expand(*shape, kv_lora_rank + rope_dim).contiguous().view(torch.float8_e4m3fn)
            return cls(kv[..., :kv_lora_rank], kv[..., kv_lora_rank:], kv_dtype, scale)
        kv = torch.full((*shape, kv_lora_rank + rope_dim), fill, dtype=dtype, device=device)
        return cls(kv[..., :kv_lora_rank], kv[..., kv_lora_rank:])

    def gather(self, pages: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens of the pages in each row of `pages` [B, n], dequantized into `dtype`:
        ckv [B, n * page_size, C] and kpe [B, n * page_size, R]."""
        if self.kv_dtype is None:
            ckv, kpe = self.ckv[pages], self.kpe[pages]
        else:
            ckv, kpe = fp8.dequantize(self.ckv[pages].flatten(0, 1),
                                      None if self.kpe is None else self.kpe[pages].flatten(0, 1), self.kv_scale)
        batch = pages.shape[0]
        return ckv.reshape(batch, -1, ckv.shape[-1]).to(dtype), kpe.reshape(batch, -1, kpe.shape[-1]).to(dtype)

    def append(self, pages: torch.Tensor, slots: torch.Tensor, ckv: torch.Tensor, kpe: torch.Tensor) -> None:
        """Writes tokens ckv [B, s, C] and kpe [B, s, R] at (pages, slots) [B, s], quantized into an fp8 cache."""
        if self.kv_dtype is None:
            self.ckv[pages, slots] = ckv.to(self.ckv.dtype)
            self.kpe[pages, slots] = kpe.to(self.kpe.dtype)
        elif self.kv_dtype == "fp8_e4m3":
            self.ckv[pages, slots] = fp8.to_e4m3(ckv, self.kv_scale)
            self.kpe[pages, slots] = fp8.to_e4m3(kpe, self.kv_scale)
        else:  # fp8_ds_mla: whole 656-byte tokens, each with its own scales
            self.ckv[pages, slots] = fp8.quantize_ds_mla(ckv, kpe).view(self.ckv.dtype)

    @property
    def num_pages(self) -> int:
        return self.ckv.shape[0]

    @property
    def page_size(self) -> int:
        return self.ckv.shape[1]


@dataclasses.dataclass(frozen=True)
class AbsorbedWeights:
    """kv_b_proj split per head for the absorbed form: w_uk [H, nope, C] (q_abs = q_nope @ w_uk)
    and w_uv [H, C, v] (out = o_latent @ w_uv). `key` identifies the kv_b_proj weight version."""
    w_uk: torch.Tensor
    w_uv: torch.Tensor
    key: tuple


def head_range_for(num_heads: int, tp_size: int, rank: int) -> tuple[int, int]:
    """Heads [h0, h1) of `rank` in an even tensor-parallel split. Raises ValueError if tp_size does
    not divide num_heads or rank is out of range."""
    if tp_size < 1 or num_heads % tp_size:
        raise ValueError(f"tp_size: {tp_size} does not divide {num_heads} heads")
    if not 0 <= rank < tp_size:
        raise ValueError(f"rank: expected 0..{tp_size - 1}, got {rank}")
    per = num_heads // tp_size
    return rank * per, (rank + 1) * per


class MLAAttention(nn.Module):
    """MLA attention of one layer, weights named and shaped as in HF DeepSeek-V2/V3 checkpoints
    (keys under `model.layers.N.self_attn.`): q_a_proj, q_a_layernorm, q_b_proj (or q_proj when
    q_lora_rank is null), kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj (W_UK and W_UV per head),
    o_proj. No biases (attention_bias false in the presets)."""

    def __init__(self, config: ModelConfig | str, *, hidden_size: int | None = None,
                 head_range: tuple[int, int] | None = None, sm_scale: float | None = None,
                 rms_norm_eps: float = 1e-6, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, generator: torch.Generator | None = None,
                 rate: float = cost.H100_BF16_RATE, bandwidth: float = cost.H100_BANDWIDTH):
        """config: a ModelConfig or preset name. hidden_size: defaults to the preset's (scaled-down
        values are fine; head dims stay real). head_range: heads [h0, h1) this rank holds (all by
        default). sm_scale: defaults to config.sm_scale. rate/bandwidth: the device's matmul FLOP/s
        and bytes/s, for form="auto". v_head_dim null (minicpm3-4b) reads as qk_nope_head_dim.
        Weights are drawn from `generator` (see reset_parameters). Raises SpecError for an unknown
        preset or one whose sm_scale is unknown (pass sm_scale), ValueError naming a bad argument."""
        super().__init__()
        cfg = model_config(config) if isinstance(config, str) else config
        hidden = hidden_size if hidden_size is not None else cfg.hidden_size
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden_size: expected a positive integer (preset {cfg.name} has "
                             f"{cfg.hidden_size}), got {hidden!r}")
        h0, h1 = head_range if head_range is not None else (0, cfg.num_heads)
        if not 0 <= h0 < h1 <= cfg.num_heads:
            raise ValueError(f"head_range: expected 0 <= h0 < h1 <= {cfg.num_heads}, got {head_range}")
        self.config, self.hidden_size, self.head_range = cfg, hidden, (h0, h1)
        self.num_heads = h1 - h0
        self.kv_lora_rank, self.rope_dim = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.nope_dim = cfg.qk_nope_head_dim
        # NOTE(minicpm3): models.json has no citable v_head_dim; DeepSeek-style MLA uses v = nope.
        self.v_dim = cfg.v_head_dim or cfg.qk_nope_head_dim
        self.q_lora_rank = cfg.q_lora_rank or None  # DeepSeek's config_16B writes 0 for "none"
        self.sm_scale = float(sm_scale) if sm_scale is not None else cfg.sm_scale
        self.rate, self.bandwidth = rate, bandwidth
        H, qk, C, R = self.num_heads, self.nope_dim + self.rope_dim, self.kv_lora_rank, self.rope_dim
        kw = dict(bias=False, dtype=dtype, device=device)
        if self.q_lora_rank:
            self.q_a_proj = nn.Linear(hidden, self.q_lora_rank, **kw)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, rms_norm_eps, dtype=dtype, device=device)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * qk, **kw)
        else:
            self.q_proj = nn.Linear(hidden, H * qk, **kw)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, C + R, **kw)
        self.kv_a_layernorm = RMSNorm(C, rms_norm_eps, dtype=dtype, device=device)
        self.kv_b_proj = nn.Linear(C, H * (self.nope_dim + self.v_dim), **kw)
        self.o_proj = nn.Linear(H * self.v_dim, hidden, **kw)
        self.rope = RotaryEmbedding(R, cfg.rope_theta, cfg.rope_scaling)
        self._absorbed: AbsorbedWeights | None = None
        self.last_form: str | None = None
        self.last_backend: str | None = None
        self.reset_parameters(generator)

    @property
    def dtype(self) -> torch.dtype:
        return self.kv_b_proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.kv_b_proj.weight.device

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random weights drawn in float32 on the CPU (the same values for every dtype and device):
        linear weights N(0, 1/fan_in), so activations stay O(1); norm weights 1 + N(0, 0.1^2)."""
        for name, p in self.named_parameters():
            if p.is_meta:  # shapes only
                continue
            if name.endswith("layernorm.weight"):
                value = 1.0 + 0.1 * torch.randn(p.shape, generator=generator)
            else:
                value = torch.randn(p.shape, generator=generator) * p.shape[1] ** -0.5
            p.copy_(value)

    def new_cache(self, num_pages: int, page_size: int, *, fill: float = 0.0, kv_dtype: str | None = None,
                  kv_scale: float | torch.Tensor | None = None) -> LatentCache:
        """An empty cache on the layer's device, in its dtype or in fp8 (kv_dtype "fp8_e4m3" with a fixed
        per-tensor kv_scale, default 1.0, or "fp8_ds_mla"; see LatentCache.empty)."""
        return LatentCache.empty(num_pages, page_size, self.kv_lora_rank, self.rope_dim, dtype=self.dtype,
                                 device=self.device, fill=fill, kv_dtype=kv_dtype, kv_scale=kv_scale)

    # ---------------------------------------------------------------------------------- weights
    def absorbed_weights(self) -> AbsorbedWeights:
        """W_UK [H, nope, C] and W_UV^T [H, C, v] from kv_b_proj, computed once and reused until
        kv_b_proj's weight changes (new tensor, in-place update, load_state_dict, .to())."""
        w = self.kv_b_proj.weight
        if torch.compiler.is_compiling():  # traced: views of the weight, folded by the compiler, no cache
            per_head = w.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
            return AbsorbedWeights(per_head[:, :self.nope_dim], per_head[:, self.nope_dim:].transpose(1, 2), ())
        key = (id(w), w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape))
        if self._absorbed is None or self._absorbed.key != key:
            per_head = w.detach().view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
            self._absorbed = AbsorbedWeights(per_head[:, :self.nope_dim].contiguous(),
                                             per_head[:, self.nope_dim:].transpose(1, 2).contiguous(), key)
        return self._absorbed

    @staticmethod
    def shard_state_dict(state_dict: dict[str, torch.Tensor], config: ModelConfig | str,
                         head_range: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Slice a full layer's state dict (DeepSeek key names, any prefix) to heads [h0, h1):
        per-head rows of q_proj/q_b_proj/kv_b_proj, per-head columns of o_proj; the rest copied."""
        cfg = model_config(config) if isinstance(config, str) else config
        h0, h1 = head_range
        v = cfg.v_head_dim or cfg.qk_nope_head_dim
        width = {"q_proj.weight": cfg.qk_nope_head_dim + cfg.qk_rope_head_dim,
                 "q_b_proj.weight": cfg.qk_nope_head_dim + cfg.qk_rope_head_dim,
                 "kv_b_proj.weight": cfg.qk_nope_head_dim + v, "o_proj.weight": v}
        out = {}
        for key, t in state_dict.items():
            leaf = next((k for k in (*_HEAD_ROWS, *_HEAD_COLS) if key == k or key.endswith("." + k)), None)
            if leaf in _HEAD_ROWS:
                t = t[h0 * width[leaf]:h1 * width[leaf]]
            elif leaf in _HEAD_COLS:
                t = t[:, h0 * width[leaf]:h1 * width[leaf]]
            out[key] = t.clone()
        return out

    # ---------------------------------------------------------------------------------- forward
    def choose_form(self, batch: int, s_q: int, cache_len: int, kv_dtype: str | None = None) -> str:
        """'vanilla' or 'absorbed', whichever the roofline cost model (mla_gen.cost) prices lower
        for this rank's heads, the layer's dtype, the cache's format (kv_dtype: None = the layer's
        dtype, or an fp8 format) and the device's rate and bandwidth."""
        dims = cost.AttnDims(self.num_heads, self.kv_lora_rank, self.rope_dim, self.nope_dim, self.v_dim)
        e = self.dtype.itemsize
        return cost.choose_form(dims, batch, s_q, cache_len, dtype_bytes=e, kv_dtype=kv_dtype, rate=self.rate,
                                bandwidth=self.bandwidth)

    @torch.no_grad()
    def forward(self, hidden_states: torch.Tensor, cache: LatentCache, block_table: torch.Tensor,
                cache_seqlens: torch.Tensor, *, form: str = "auto", cache_len: int | None = None) -> torch.Tensor:
        """hidden_states [B, s_q, hidden] in the layer's dtype; cache_seqlens [B] = tokens cached
        before this call (new token i goes to position cache_seqlens[b] + i, its RoPE position);
        block_table [B, max_pages] int page ids. Returns [B, s_q, hidden] (o_proj's partial sum
        under head sharding). form="auto" asks the cost model, with cache_len (default: the mean of
        cache_seqlens if it is on the CPU, else the block table's capacity, so no device sync).
        Writes the new tokens into `cache`. Raises TypeError/ValueError naming the argument."""
        if form not in FORMS:
            raise ValueError(f"form: expected one of {', '.join(FORMS)}, got {form!r}")
        positions = self._check(hidden_states, cache, block_table, cache_seqlens)
        batch, s_q = hidden_states.shape[:2]
        if form == "auto":
            if cache_len is None:
                cache_len = (int(cache_seqlens.double().mean()) if cache_seqlens.device.type == "cpu"
                             else max(0, block_table.shape[1] * cache.page_size - s_q))
            form = self.choose_form(batch, s_q, cache_len, cache.kv_dtype)
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states))) if self.q_lora_rank \
            else self.q_proj(hidden_states)
        q = q.view(batch, s_q, self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q[..., :self.nope_dim], self.rope(q[..., self.nope_dim:], positions)
        self._write(hidden_states, positions, cache, block_table)
        lengths = cache_seqlens + s_q
        if form == "vanilla":
            attn = self._vanilla(q_nope, q_pe, cache, block_table, positions, lengths)
        else:
            attn = self._absorbed_attention(q_nope, q_pe, cache, block_table, positions, lengths)
        self.last_form = form
        return self.o_proj(attn.reshape(batch, s_q, self.num_heads * self.v_dim))

    @torch.no_grad()
    def append_kv(self, hidden_states: torch.Tensor, cache: LatentCache, block_table: torch.Tensor,
                  cache_seqlens: torch.Tensor) -> torch.Tensor:
        """Prefill without attention: write the tokens' latents and rope keys at positions
        cache_seqlens[b] + i. Returns the new lengths (cache_seqlens + s_q). Raises as forward."""
        positions = self._check(hidden_states, cache, block_table, cache_seqlens)
        self._write(hidden_states, positions, cache, block_table)
        return cache_seqlens + hidden_states.shape[1]

    def _check(self, hidden: torch.Tensor, cache: LatentCache, block_table: torch.Tensor,
               cache_seqlens: torch.Tensor) -> torch.Tensor:
        """Validates the inputs; returns positions [B, s_q] int64."""
        for name, t in (("hidden_states", hidden), ("block_table", block_table), ("cache_seqlens", cache_seqlens)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not isinstance(cache, LatentCache):
            raise TypeError(f"cache: expected a LatentCache, got {type(cache).__name__}")
        if hidden.dim() != 3 or hidden.shape[2] != self.hidden_size or hidden.shape[0] < 1 or hidden.shape[1] < 1:
            raise ValueError(f"hidden_states: expected shape [batch, s_q, {self.hidden_size}], "
                             f"got {tuple(hidden.shape)}")
        if hidden.dtype != self.dtype:
            raise TypeError(f"hidden_states: expected dtype {self.dtype} (the layer's), got {hidden.dtype}")
        if hidden.device != self.device:
            raise ValueError(f"hidden_states: expected a tensor on {self.device} (the layer's), got {hidden.device}")
        batch, s_q = hidden.shape[:2]
        self._check_cache(cache)
        if block_table.dim() != 2 or block_table.shape[0] != batch or block_table.shape[1] < 1:
            raise ValueError(f"block_table: expected shape [{batch}, max_pages], got {tuple(block_table.shape)}")
        if cache_seqlens.dim() != 1 or cache_seqlens.shape[0] != batch:
            raise ValueError(f"cache_seqlens: expected shape [{batch}], got {tuple(cache_seqlens.shape)}")
        for name, t in (("block_table", block_table), ("cache_seqlens", cache_seqlens)):
            if t.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"{name}: expected dtype torch.int32 or torch.int64, got {t.dtype}")
            if t.device != self.device:
                raise ValueError(f"{name}: expected a tensor on {self.device} (the layer's), got {t.device}")
        capacity = block_table.shape[1] * cache.page_size
        # checking device tensors would sync (the kernels flag those); a traced graph reads no values
        if cache_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
            low, high = int(cache_seqlens.min()), int(cache_seqlens.max())
            if low < 0 or high + s_q > capacity:
                raise ValueError(f"cache_seqlens: expected 0 <= length and length + s_q ({s_q}) <= {capacity} "
                                 f"(block_table pages x page_size), got lengths in [{low}, {high}]")
        return cache_seqlens.long()[:, None] + torch.arange(s_q, device=hidden.device)

    def _check_cache(self, cache: LatentCache) -> None:
        """The cache's tensors in the layer's dims and on its device: in its dtype, or in the cache's fp8
        format (kv_dtype). Raises TypeError/ValueError naming the field."""
        if cache.kv_dtype not in KV_DTYPES:
            raise ValueError(f"cache.kv_dtype: expected one of {', '.join(map(repr, KV_DTYPES))}, "
                             f"got {cache.kv_dtype!r}")
        dtypes = {None: (self.dtype,), "fp8_e4m3": (torch.float8_e4m3fn,), "fp8_ds_mla": DS_MLA_DTYPES}[cache.kv_dtype]
        ds_mla = cache.kv_dtype == "fp8_ds_mla"
        if ds_mla and cache.kpe is not None:
            raise ValueError("cache.kpe: expected None in an fp8_ds_mla cache (its tokens hold the rope), got a tensor")
        parts = [("cache.ckv", cache.ckv, fp8.DS_MLA_BYTES if ds_mla else self.kv_lora_rank)]
        parts += [] if ds_mla else [("cache.kpe", cache.kpe, self.rope_dim)]
        for name, t, width in parts:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 3 or t.shape[2] != width or t.shape[:2] != cache.ckv.shape[:2]:
                raise ValueError(f"{name}: expected shape [num_pages, page_size, {width}], got {tuple(t.shape)}")
            if t.dtype not in dtypes or t.device != self.device:
                raise TypeError(f"{name}: expected {' or '.join(map(str, dtypes))} on {self.device}, got {t.dtype} "
                                f"on {t.device}")
        scale = cache.kv_scale
        if (cache.kv_dtype == "fp8_e4m3") != (scale is not None):
            raise ValueError(f"cache.kv_scale: expected a tensor exactly for an fp8_e4m3 cache, got "
                             f"{type(scale).__name__} with kv_dtype {cache.kv_dtype!r}")
        if scale is not None and (not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32
                                  or scale.numel() != 1 or scale.device != self.device):
            raise TypeError(f"cache.kv_scale: expected a float32 tensor of one element on {self.device}, got {scale!r}")

    def _write(self, hidden: torch.Tensor, positions: torch.Tensor, cache: LatentCache,
               block_table: torch.Tensor) -> None:
        kv = self.kv_a_proj_with_mqa(hidden)
        latent = self.kv_a_layernorm(kv[..., :self.kv_lora_rank])
        k_pe = self.rope(kv[..., self.kv_lora_rank:], positions)
        pages = block_table.long().gather(1, torch.div(positions, cache.page_size, rounding_mode="floor"))
        slots = positions % cache.page_size
        cache.append(pages, slots, latent.detach(), k_pe.detach())  # the cache is state, not part of a graph

    @staticmethod
    def _gather(cache: LatentCache, block_table: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every token the block table can address, dequantized into `dtype`: ckv [B, T, C], kpe [B, T, R],
        zero past each length (NaN-safe), and the causal mask [B, s_q, T] (query i sees t <= its position)."""
        batch, max_pages = block_table.shape
        pages = block_table.long().clamp(0, cache.num_pages - 1)  # unused slots may hold anything
        T = max_pages * cache.page_size
        t = torch.arange(T, device=block_table.device)
        stale = (t[None, :] >= lengths.long()[:, None])[..., None]
        ckv, kpe = cache.gather(pages, dtype)
        return ckv.masked_fill(stale, 0), kpe.masked_fill(stale, 0), t[None, None, :] <= positions[:, :, None]

    def _vanilla(self, q_nope, q_pe, cache, block_table, positions, lengths) -> torch.Tensor:
        """Per-head K and V from the cached latents, then standard attention: [B, s_q, H, v]."""
        ckv, kpe, mask = self._gather(cache, block_table, positions, lengths, self.dtype)
        batch, T = ckv.shape[:2]
        kv = self.kv_b_proj(ckv).view(batch, T, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv[..., :self.nope_dim], kv[..., self.nope_dim:]
        k = torch.cat([k_nope, kpe[:, :, None, :].expand(-1, -1, self.num_heads, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask[:, None], scale=self.sm_scale)
        self.last_backend = "torch"
        return out.transpose(1, 2)

    def _absorbed_attention(self, q_nope, q_pe, cache, block_table, positions, lengths) -> torch.Tensor:
        """q_nope through W_UK, latent MQA attention, W_UV per head: [B, s_q, H, v]."""
        w = self.absorbed_weights()
        q_abs = torch.einsum("bshd,hdc->bshc", q_nope, w.w_uk)
        compiling = torch.compiler.is_compiling()
        # traced, the registered op (mla_gen.ops), which takes 16-bit caches: an fp8 one takes the torch form
        if q_abs.is_cuda and q_abs.dtype in KERNEL_DTYPES and not (compiling and cache.kv_dtype):
            args = (q_abs.contiguous(), q_pe.contiguous(), cache.ckv, cache.kpe, block_table.to(torch.int32),
                    lengths.to(torch.int32), self.sm_scale)
            if compiling:
                o_lat = torch.ops.mla_gen.mla_decode(*args)
            else:  # eager: no dispatcher in the way
                from mla_gen.api import mla_decode
                o_lat = mla_decode(*args, kv_scale=cache.kv_scale)
            self.last_backend = "mla_decode"
        else:
            o_lat = self.latent_attention(q_abs, q_pe, cache, block_table, positions, lengths)
            self.last_backend = "torch"
        return torch.einsum("bshc,hcv->bshv", o_lat, w.w_uv)

    def latent_attention(self, q_abs: torch.Tensor, q_pe: torch.Tensor, cache: LatentCache,
                         block_table: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The torch form of mla_decode (any dtype and device): one MQA head, K = [ckv | kpe],
        V = ckv, over all B x s_q x H query rows. Returns [B, s_q, H, C] in q_abs's dtype."""
        ckv, kpe, mask = self._gather(cache, block_table, positions, lengths, q_abs.dtype)
        batch, s_q, heads, C = q_abs.shape
        q = torch.cat([q_abs, q_pe], dim=-1).reshape(batch, 1, s_q * heads, -1)
        k = torch.cat([ckv, kpe], dim=-1)[:, None]
        rows_mask = mask[:, :, None, :].expand(-1, -1, heads, -1).reshape(batch, 1, s_q * heads, -1)
        out = F.scaled_dot_product_attention(q, k, ckv[:, None], attn_mask=rows_mask, scale=self.sm_scale)
        return out.view(batch, s_q, heads, C)
