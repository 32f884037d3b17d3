"""fp8 decode inputs for the tests: mla_gen.testing's paged inputs (scattered pages, NaN in every slot no
request may read, unused block-table columns on a NaN page) with the cache quantized into one of the
fp8 formats as an engine would pass it; `ref` is the float64 reference on the dequantized cache."""
from __future__ import annotations

import dataclasses

import torch

from mla_gen import fp8
from mla_gen.reference import mla_decode_reference
from mla_gen.testing import DecodeInputs, make_inputs


@dataclasses.dataclass
class Fp8Inputs:
    base: DecodeInputs              # the 16-bit inputs the cache was quantized from (q, tables, lengths)
    kv_dtype: str                   # "fp8_e4m3" or "fp8_ds_mla"
    ckv_cache: torch.Tensor         # fp8_e4m3: float8 [P, page, C]; fp8_ds_mla: the [P, page, 656] cache
    kpe_cache: torch.Tensor | None  # fp8_e4m3: float8 [P, page, R]; fp8_ds_mla: None
    kv_scale: torch.Tensor | None   # fp8_e4m3: float32 [1]

    def args(self) -> tuple:
        b = self.base
        return b.q_nope, b.q_pe, self.ckv_cache, self.kpe_cache, b.block_table, b.cache_seqlens, b.sm_scale

    def kwargs(self) -> dict:
        return {} if self.kv_scale is None else {"kv_scale": self.kv_scale}

    def ref(self) -> tuple[torch.Tensor, torch.Tensor]:
        return mla_decode_reference(*self.args(), kv_scale=self.kv_scale)


def finite_amax(t: torch.Tensor) -> float:
    return float(t.float().nan_to_num(0.0).abs().max())


def quantize(base: DecodeInputs, kv_dtype: str, *, scale: float | None = None, separate: bool = False,
             as_float8: bool = False, pow2_scales: bool = False) -> Fp8Inputs:
    """fp8_e4m3: scale None maps the largest finite value to e4m3's 448 (the poison NaN stay NaN);
    separate=True passes contiguous ckv and kpe caches instead of views of one. fp8_ds_mla: per-128 scales
    amax / 448 (pow2_scales: rounded up to a power of two); as_float8 passes the bytes as float8_e4m3fn."""
    if kv_dtype == "fp8_e4m3":
        if scale is None:
            scale = max(finite_amax(base.ckv_cache), finite_amax(base.kpe_cache)) / fp8.E4M3_MAX
        cache, kv_scale = fp8.quantize_per_tensor(base.ckv_cache, base.kpe_cache, scale)
        ckv_dim = base.ckv_cache.shape[2]
        ckv, kpe = cache[..., :ckv_dim], cache[..., ckv_dim:]
        if separate:
            ckv, kpe = ckv.contiguous(), kpe.contiguous()
        return Fp8Inputs(base, kv_dtype, ckv, kpe, kv_scale)
    assert kv_dtype == "fp8_ds_mla", kv_dtype
    cache = fp8.quantize_ds_mla(base.ckv_cache, base.kpe_cache, pow2_scales=pow2_scales)
    return Fp8Inputs(base, kv_dtype, cache.view(torch.float8_e4m3fn) if as_float8 else cache, None, None)


def fp8_inputs(kv_dtype: str, lengths: list[int], *, heads: int = 4, ckv: int = 512, rope: int = 64, s_q: int = 1,
               page_size: int = 16, dtype: torch.dtype = torch.bfloat16, device: str = "cpu", seed: int = 0,
               **quantize_kw) -> Fp8Inputs:
    gen = torch.Generator(device=device).manual_seed(seed)
    base = make_inputs(lengths, heads=heads, ckv=ckv, rope=rope, s_q=s_q, page_size=page_size, dtype=dtype,
                       device=device, generator=gen)
    return quantize(base, kv_dtype, **quantize_kw)
