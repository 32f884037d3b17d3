"""The one table between torch dtypes and the kernels' DType (generator.spec, which holds the names
and sizes): which torch dtypes the kernels take, and the conversions both ways."""
from __future__ import annotations

import torch

from generator.errors import SpecError
from generator.spec import DType

TORCH_DTYPES = {DType.BF16: torch.bfloat16, DType.FP16: torch.float16}
KERNEL_DTYPES = tuple(TORCH_DTYPES.values())
_FROM_TORCH = {t: d for d, t in TORCH_DTYPES.items()}
# The fp8 caches (mla_gen.fp8): fp8_e4m3 is float8_e4m3fn; fp8_ds_mla's 656-byte tokens are held as
# uint8 or float8_e4m3fn bytes.
FP8 = torch.float8_e4m3fn
DS_MLA_DTYPES = (torch.uint8, FP8)


def to_dtype(dtype: object, name: str = "dtype") -> DType:
    """The kernel DType of a torch dtype. Raises TypeError naming `name` unless bf16 or fp16."""
    if not isinstance(dtype, torch.dtype) or dtype not in _FROM_TORCH:
        expected = " or ".join(str(t) for t in KERNEL_DTYPES)
        raise TypeError(f"{name}: expected {expected}, got {dtype!r}")
    return _FROM_TORCH[dtype]


def to_kv_dtype(kv_dtype: object, dtype: DType) -> DType:
    """The cache's DType for plan's kv_dtype: None (the cache holds q's `dtype`), "fp8_e4m3" (or
    torch.float8_e4m3fn) or "fp8_ds_mla". Raises ValueError naming `kv_dtype`."""
    if kv_dtype is None:
        return dtype
    if kv_dtype is FP8:
        return DType.FP8_E4M3
    if isinstance(kv_dtype, (str, DType)):
        try:
            parsed = DType.parse(kv_dtype, "kv_dtype")
        except SpecError:
            parsed = None
        if parsed is not None and parsed.is_fp8:
            return parsed
    raise ValueError(f"kv_dtype: expected None (a cache of q's dtype), 'fp8_e4m3' (or torch.float8_e4m3fn) "
                     f"or 'fp8_ds_mla', got {kv_dtype!r}")


def torch_dtype(dtype: str | DType) -> torch.dtype:
    """The torch dtype of a kernel dtype name ('bf16', 'fp16', 'bfloat16', ...). Raises SpecError for
    an unknown name."""
    return TORCH_DTYPES[DType.parse(dtype)]
