"""The one table between torch dtypes and the kernels' DType (generator.spec, which holds the names
and sizes): which torch dtypes the kernels take, and the conversions both ways."""
from __future__ import annotations

import torch

from generator.spec import DType

TORCH_DTYPES = {DType.BF16: torch.bfloat16, DType.FP16: torch.float16}
KERNEL_DTYPES = tuple(TORCH_DTYPES.values())
_FROM_TORCH = {t: d for d, t in TORCH_DTYPES.items()}


def to_dtype(dtype: object, name: str = "dtype") -> DType:
    """The kernel DType of a torch dtype. Raises TypeError naming `name` unless bf16 or fp16."""
    if not isinstance(dtype, torch.dtype) or dtype not in _FROM_TORCH:
        expected = " or ".join(str(t) for t in KERNEL_DTYPES)
        raise TypeError(f"{name}: expected {expected}, got {dtype!r}")
    return _FROM_TORCH[dtype]


def torch_dtype(dtype: str | DType) -> torch.dtype:
    """The torch dtype of a kernel dtype name ('bf16', 'fp16', 'bfloat16', ...). Raises SpecError for
    an unknown name."""
    return TORCH_DTYPES[DType.parse(dtype)]
