"""Rotary position embedding of MLA's rope part: plain RoPE and DeepSeek's YaRN, interleaved pairs.

Convention: the rope dims are rotated as interleaved pairs (x[2i], x[2i+1]) by the angle
pos * inv_freq[i] (GPT-J style, `is_neox_style=False` in vLLM; DeepSeek's own inference/model.py
does the same with complex numbers). HF's modeling_deepseek.py de-interleaves the pairs first and
then rotates halves; its outputs are a fixed permutation of these, identical in every q.k dot
product, so the weights of a DeepSeek checkpoint work unchanged. Only the order of the rope
columns stored in the kpe cache differs (here: interleaved, like vLLM's and SGLang's caches).

YaRN follows DeepseekV3YarnRotaryEmbedding (HF): frequencies blend the extrapolated and the
interpolated ones over the correction range of beta_fast/beta_slow, and cos/sin are scaled by
yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim) (1 for the presets). The softmax
scale's mscale^2 is not applied here; it is part of ModelConfig.sm_scale.
"""
from __future__ import annotations

import math
from typing import Any

import torch


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """0.1 * mscale * ln(factor) + 1 for factor > 1, else 1."""
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def _correction_dim(rotations: float, dim: int, base: float, max_pos: int) -> float:
    return dim * math.log(max_pos / (rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_frequencies(dim: int, theta: float, rope_scaling: dict[str, Any] | None) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim // 2] float64, cos/sin scale) for a rope width, base and HF rope_scaling dict.

    Raises ValueError for an odd or non-positive dim, and for a rope_scaling type other than
    yarn, linear or none (naming rope_scaling.type)."""
    if dim < 2 or dim % 2:
        raise ValueError(f"qk_rope_head_dim: expected a positive even number, got {dim}")
    exponent = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    extra = 1.0 / theta ** exponent
    kind = (rope_scaling or {}).get("type", (rope_scaling or {}).get("rope_type"))
    if rope_scaling is None or kind in (None, "default"):
        return extra, 1.0
    factor = float(rope_scaling.get("factor", 1.0))
    if kind == "linear":
        return extra / factor, 1.0
    if kind != "yarn":
        raise ValueError(f"rope_scaling.type: {kind!r} is not supported (yarn, linear or none)")
    orig = int(rope_scaling.get("original_max_position_embeddings", 4096))
    beta_fast, beta_slow = float(rope_scaling.get("beta_fast", 32)), float(rope_scaling.get("beta_slow", 1))
    low = max(math.floor(_correction_dim(beta_fast, dim, theta, orig)), 0)
    high = min(math.ceil(_correction_dim(beta_slow, dim, theta, orig)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extra_weight = 1.0 - ramp  # 1: keep the original frequency (high frequencies), 0: interpolate
    inv_freq = extra / factor * (1 - extra_weight) + extra * extra_weight
    scale = (yarn_mscale(factor, float(rope_scaling.get("mscale", 1.0)))
             / yarn_mscale(factor, float(rope_scaling.get("mscale_all_dim", 0.0))))
    return inv_freq, scale


class RotaryEmbedding:
    """Applies RoPE to the last dim of x at integer positions. Not an nn.Module on purpose: its
    float64 frequencies must not be cast by module.to(bfloat16)."""

    def __init__(self, dim: int, theta: float, rope_scaling: dict[str, Any] | None):
        self.dim = dim
        self.inv_freq, self.scale = rope_frequencies(dim, theta, rope_scaling)
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, S, ..., dim], positions [B, S] integer -> rotated x, same shape and dtype.

        Angles and the rotation run in float64 for float64 x, else float32."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"x: expected a last dim of {self.dim} (the rope width), got {tuple(x.shape)}")
        ctype = torch.float64 if x.dtype == torch.float64 else torch.float32
        inv = self._on_device.get(x.device)
        if inv is None:
            inv = self._on_device[x.device] = self.inv_freq.to(x.device)
        angles = positions.to(torch.float64)[..., None] * inv  # [B, S, dim/2]
        angles = angles.reshape(angles.shape[:2] + (1,) * (x.dim() - 3) + angles.shape[-1:])
        cos, sin = (angles.cos() * self.scale).to(ctype), (angles.sin() * self.scale).to(ctype)
        xc = x.to(ctype)
        even, odd = xc[..., 0::2], xc[..., 1::2]
        rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
        return rotated.flatten(-2).to(x.dtype)
