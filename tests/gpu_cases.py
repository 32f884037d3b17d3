"""GPU test cases named by the variant they run: the device's arch (sm_90a where there is no device,
so the cases are still collected, then skipped) and pytest params with variant-id ids."""
from __future__ import annotations

import pytest
import torch

from generator.select import decide, families_for
from generator.spec import Arch, DType, Family
from mla_gen.dispatch import device_info

ARCH = device_info(torch.cuda.current_device()).arch if torch.cuda.is_available() else Arch.SM90A


def families() -> list[str]:
    return [f.value for f in families_for(ARCH)]


def variant_id(family: str, heads: int, dims: tuple[int, int] = (512, 64), dtype: str = "bf16", s_q: int = 1) -> str:
    return decide(arch=ARCH, num_heads=heads, ckv_dim=dims[0], rope_dim=dims[1], s_q=s_q, dtype=DType.parse(dtype),
                  family=Family.parse(family)).spec.variant_id


def variants(heads: list[int], dims: tuple[tuple[int, int], ...] = ((512, 64),), dtypes: tuple[str, ...] = ("bf16",),
             s_qs: tuple[int, ...] = (1,)) -> list:
    """(family, dtype, dims, heads, s_q) per variant the device runs, each case named by its variant id
    and s_q (a narrow tile holds heads x s_q rows, so s_q can change the variant)."""
    return [pytest.param(f, dt, d, h, q, id=f"{variant_id(f, h, d, dt, q)}-sq{q}")
            for f in families() for dt in dtypes for d in dims for h in heads for q in s_qs]
