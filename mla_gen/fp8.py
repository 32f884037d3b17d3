"""The fp8 latent-cache formats serving engines use (issue 13), on the host side: quantize a 16-bit paged
cache into them and dequantize back, so a float64 reference reads exactly what an fp8 kernel must read.

- "fp8_e4m3" (vLLM's fp8 KV cache): the 576-wide latent (ckv then kpe) in float8_e4m3fn with one fp32
  scale for the whole tensor: value = fp8 * scale.
- "fp8_ds_mla" (DeepSeek-V3.2's layout, as FlashMLA and vLLM store it): 656 bytes per token = 512 e4m3
  ckv values, 4 fp32 scales (one per 128 ckv values), then the 64 rope values in bf16, unquantized.

Both keep the paged shape [num_pages, page_size, width] (an engine's own cache passes through unchanged).
`dequantize` reads either one as mla_decode takes it (the float64 reference and the MLA layer's torch
forms use it); `to_e4m3` and `quantize_ds_mla` quantize tokens as the layer appends them.
"""
from __future__ import annotations

import torch

E4M3_MAX = 448.0              # largest finite float8_e4m3fn
DS_MLA_CKV, DS_MLA_ROPE = 512, 64
DS_MLA_GROUP = 128            # ckv values per scale
DS_MLA_ROPE_OFFSET = DS_MLA_CKV + 4 * (DS_MLA_CKV // DS_MLA_GROUP)  # 528: the rope's first byte
DS_MLA_BYTES = DS_MLA_ROPE_OFFSET + 2 * DS_MLA_ROPE  # 656


def _check_cache(name: str, t: object, last: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(f"{name}: expected a paged cache [num_pages, page_size, width], got shape {tuple(t.shape)}")
    if last is not None and t.shape[2] != last:
        raise ValueError(f"{name}: expected a last dim of {last}, got {t.shape[2]}")
    return t


def _check_pair(ckv: torch.Tensor, kpe: torch.Tensor) -> None:
    _check_cache("ckv_cache", ckv)
    _check_cache("kpe_cache", kpe)
    if ckv.shape[:2] != kpe.shape[:2]:
        raise ValueError(f"kpe_cache: expected pages and page size {tuple(ckv.shape[:2])} (those of ckv_cache), "
                         f"got {tuple(kpe.shape[:2])}")
    if kpe.device != ckv.device:
        raise ValueError(f"kpe_cache: expected a tensor on {ckv.device} (ckv_cache's device), got {kpe.device}")
    for name, t in (("ckv_cache", ckv), ("kpe_cache", kpe)):
        if not t.is_floating_point() or t.element_size() < 2:
            raise TypeError(f"{name}: expected a 16- or 32-bit float cache to quantize, got {t.dtype}")


def _finite_amax(x: torch.Tensor, **dims) -> torch.Tensor:
    """The largest finite magnitude (NaN and +-inf left out: NaN stays NaN, +-inf saturates)."""
    return x.float().abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).amax(**dims)


def _scale_for(amax: torch.Tensor, pow2: bool) -> torch.Tensor:
    """fp32 scale mapping amax to e4m3's largest value; an all-zero group gets 1 (its values stay 0).
    pow2 rounds up to a power of two (FlashMLA's UE8M0-style scales)."""
    scale = torch.where(amax > 0, amax.float() / E4M3_MAX, torch.ones_like(amax, dtype=torch.float32))
    return torch.exp2(torch.ceil(torch.log2(scale))) if pow2 else scale


def to_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale in float8_e4m3fn, saturated at +-448 (NaN stays NaN). No checks: the layer's append."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def _check_scale(scale: object, device: torch.device) -> torch.Tensor:
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or scale.numel() != 1:
        raise ValueError(f"kv_scale: expected a float32 tensor of one element, got "
                         f"{scale.dtype if isinstance(scale, torch.Tensor) else type(scale).__name__}"
                         f"{'' if not isinstance(scale, torch.Tensor) else f' of shape {tuple(scale.shape)}'}")
    if scale.device != device:
        raise ValueError(f"kv_scale: expected a tensor on {device} (the cache's device), got {scale.device}")
    return scale


# -- fp8_e4m3: one scale per tensor ---------------------------------------------------------------

def quantize_per_tensor(ckv_cache: torch.Tensor, kpe_cache: torch.Tensor, scale: float | torch.Tensor | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cache [pages, page_size, C + R] float8_e4m3fn, scale [1] fp32). Without `scale`, the one that maps
    the largest finite magnitude of both parts to e4m3's maximum (NaN stays NaN, +-inf saturates)."""
    _check_pair(ckv_cache, kpe_cache)
    latent = torch.cat([ckv_cache.float(), kpe_cache.float()], dim=-1)
    if scale is None:
        scale_t = _scale_for(_finite_amax(latent), pow2=False).reshape(1)
    else:
        scale_t = torch.as_tensor(scale, dtype=torch.float32, device=latent.device).reshape(-1)
        if scale_t.numel() != 1 or not bool(torch.isfinite(scale_t).all()) or not bool((scale_t > 0).all()):
            raise ValueError(f"scale: expected one positive finite number, got {scale!r}")
    return to_e4m3(latent, scale_t), scale_t


def dequantize_per_tensor(cache: torch.Tensor, scale: torch.Tensor, ckv_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ckv, kpe) in fp32 from a per-tensor fp8 cache and its scale."""
    _check_cache("kv_cache", cache)
    if cache.dtype != torch.float8_e4m3fn:
        raise TypeError(f"kv_cache: expected dtype torch.float8_e4m3fn, got {cache.dtype}")
    _check_scale(scale, cache.device)
    if not 0 < ckv_dim < cache.shape[2]:
        raise ValueError(f"ckv_dim: expected 1..{cache.shape[2] - 1} (the cache is {cache.shape[2]} wide), got {ckv_dim}")
    full = cache.float() * scale
    return full[..., :ckv_dim], full[..., ckv_dim:]


# -- fp8_ds_mla: DeepSeek-V3.2's 656-byte token ----------------------------------------------------

def quantize_ds_mla(ckv_cache: torch.Tensor, kpe_cache: torch.Tensor, *, pow2_scales: bool = False) -> torch.Tensor:
    """uint8 cache [pages, page_size, 656]: per token 512 e4m3 ckv values, 4 fp32 scales (one per 128
    values, amax / 448, rounded up to a power of two with pow2_scales), 64 bf16 rope values."""
    _check_pair(ckv_cache, kpe_cache)
    if ckv_cache.shape[2] != DS_MLA_CKV:
        raise ValueError(f"ckv_cache: the 656-byte layout holds {DS_MLA_CKV} ckv values, got {ckv_cache.shape[2]}")
    if kpe_cache.shape[2] != DS_MLA_ROPE:
        raise ValueError(f"kpe_cache: the 656-byte layout holds {DS_MLA_ROPE} rope values, got {kpe_cache.shape[2]}")
    pages, page_size = ckv_cache.shape[:2]
    groups = ckv_cache.float().reshape(pages, page_size, DS_MLA_CKV // DS_MLA_GROUP, DS_MLA_GROUP)
    scales = _scale_for(_finite_amax(groups, dim=-1, keepdim=True), pow2_scales)
    values = to_e4m3(groups, scales).reshape(pages, page_size, DS_MLA_CKV)
    out = torch.empty(pages, page_size, DS_MLA_BYTES, dtype=torch.uint8, device=ckv_cache.device)
    out[..., :DS_MLA_CKV] = values.view(torch.uint8)
    out[..., DS_MLA_CKV:DS_MLA_ROPE_OFFSET] = scales.reshape(pages, page_size, 4).contiguous().view(torch.uint8)
    out[..., DS_MLA_ROPE_OFFSET:] = kpe_cache.to(torch.bfloat16).contiguous().view(torch.uint8)
    return out


def dequantize_ds_mla(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ckv [.., 512], kpe [.., 64]) in fp32 from a 656-byte cache (uint8 or float8_e4m3fn bytes)."""
    _check_cache("kv_cache", cache, DS_MLA_BYTES)
    if cache.dtype not in (torch.uint8, torch.float8_e4m3fn):
        raise TypeError(f"kv_cache: expected 656-byte tokens as torch.uint8 or torch.float8_e4m3fn, got {cache.dtype}")
    raw = cache.view(torch.uint8)
    pages, page_size = raw.shape[:2]
    values = raw[..., :DS_MLA_CKV].contiguous().view(torch.float8_e4m3fn).float()
    scales = raw[..., DS_MLA_CKV:DS_MLA_ROPE_OFFSET].contiguous().view(torch.float32)
    ckv = (values.reshape(pages, page_size, 4, DS_MLA_GROUP) * scales[..., None]).reshape(pages, page_size, DS_MLA_CKV)
    kpe = raw[..., DS_MLA_ROPE_OFFSET:].contiguous().view(torch.bfloat16).float()
    return ckv, kpe


# -- either format, as mla_decode takes it -----------------------------------------------------------

def dequantize(ckv_cache: torch.Tensor, kpe_cache: torch.Tensor | None = None,
               kv_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ckv, kpe) in fp32 from the caches mla_decode takes: a 656-byte fp8_ds_mla cache alone (kpe_cache
    None), or fp8_e4m3 ckv and kpe caches (views of one cache or not) with their kv_scale. Raises
    TypeError/ValueError naming the argument."""
    if kpe_cache is None:
        return dequantize_ds_mla(ckv_cache)
    _check_cache("ckv_cache", ckv_cache)
    _check_cache("kpe_cache", kpe_cache)
    for name, t in (("ckv_cache", ckv_cache), ("kpe_cache", kpe_cache)):
        if t.dtype != torch.float8_e4m3fn:
            raise TypeError(f"{name}: expected dtype torch.float8_e4m3fn, got {t.dtype}")
    scale = _check_scale(kv_scale, ckv_cache.device).reshape(())
    return ckv_cache.float() * scale, kpe_cache.float() * scale
