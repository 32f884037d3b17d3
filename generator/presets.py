"""Real MLA model configs (generator/models.json, copied from the project's shared data) and the
kernel variants each model needs, tensor-parallel head splits included."""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any

from generator.errors import SpecError
from generator.spec import DS_MLA_CKV, DS_MLA_ROPE, DS_MLA_TOKEN_BYTES, Arch, DType, Family, VariantSpec

_MODELS_JSON = Path(__file__).with_name("models.json")
TP_SIZES = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The attention part of an MLA model config (HF DeepSeek-V2/V3 field names)."""
    name: str
    num_heads: int
    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int | None
    q_lora_rank: int | None
    hidden_size: int | None
    dtype: DType
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    sm_scale_known: bool = True  # False where the source config's rope scaling was not read

    @property
    def mscale(self) -> float:
        """YaRN attention scale: 0.1 * mscale_all_dim * ln(factor) + 1 when YaRN applies, else 1."""
        rs = self.rope_scaling or {}
        factor, all_dim = float(rs.get("factor", 1.0)), float(rs.get("mscale_all_dim", 0.0) or 0.0)
        if rs.get("type") != "yarn" or factor <= 1.0 or all_dim <= 0.0:
            return 1.0
        return 0.1 * all_dim * math.log(factor) + 1.0

    @property
    def sm_scale(self) -> float:
        """Softmax scale from the ORIGINAL q head dim (nope + rope), times mscale^2; never 1/sqrt(576).

        Raises SpecError where the preset's rope scaling is unknown (pass sm_scale explicitly)."""
        if not self.sm_scale_known:
            raise SpecError(f"sm_scale: preset {self.name}'s rope scaling (YaRN mscale) was not read from a "
                            f"citable config; pass sm_scale explicitly")
        return (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5 * self.mscale ** 2

    def tp_heads(self) -> dict[int, int]:
        """Heads per GPU for each tensor-parallel size that divides the head count."""
        return {tp: self.num_heads // tp for tp in TP_SIZES if self.num_heads % tp == 0}


@functools.lru_cache(maxsize=1)
def _raw_models() -> dict[str, dict[str, Any]]:
    return json.loads(_MODELS_JSON.read_text())["models"]


def preset_names() -> list[str]:
    return sorted(_raw_models())


def model_config(name: str) -> ModelConfig:
    """The config of preset `name` (aliases resolved). Raises SpecError for an unknown name."""
    models = _raw_models()
    if name not in models:
        raise SpecError(f"preset: unknown preset {name!r}; expected one of {', '.join(preset_names())}")
    raw = models[name]
    if "alias_of" in raw:
        return dataclasses.replace(model_config(raw["alias_of"]), name=name)
    dtype = DType.BF16 if raw.get("torch_dtype") in (None, "bfloat16") else DType.parse(raw["torch_dtype"])
    return ModelConfig(
        name=name, num_heads=raw["num_attention_heads"], kv_lora_rank=raw["kv_lora_rank"],
        qk_rope_head_dim=raw["qk_rope_head_dim"], qk_nope_head_dim=raw["qk_nope_head_dim"],
        # NOTE(minicpm3): v_head_dim was not read from a citable config; DeepSeek models use nope.
        v_head_dim=raw.get("v_head_dim"), q_lora_rank=raw.get("q_lora_rank"),
        hidden_size=raw.get("hidden_size"), dtype=dtype, rope_theta=float(raw.get("rope_theta") or 10000.0),
        rope_scaling=raw.get("rope_scaling"), sm_scale_known=raw.get("sm_scale") is not None)


def preset_variants(name: str, arch: Arch, *, dtype: DType | None = None, families: list[Family] | None = None,
                    tp_sizes: list[int] | None = None, kv_dtype: DType | None = None,
                    s_q: tuple[int, ...] = (1,)) -> list[VariantSpec]:
    """The variants preset `name` needs on `arch`: per tensor-parallel head count and query length in
    `s_q`, the ones dispatch picks (generator.select.dispatch_specs), or one per family in `families` (duplicates
    dropped: most tiles do not depend on s_q). kv_dtype: the cache (default the q dtype). Raises SpecError."""
    from generator.select import default_tile, dispatch_specs  # select builds on spec; presets stay below it

    cfg = model_config(name)
    heads = cfg.tp_heads()
    if tp_sizes:
        bad = [tp for tp in tp_sizes if tp not in heads]
        if bad:
            raise SpecError(f"tp: {name} has {cfg.num_heads} heads; tensor-parallel sizes "
                            f"{sorted(heads)} divide them, not {bad}")
        heads = {tp: heads[tp] for tp in tp_sizes}
    dt = dtype or cfg.dtype
    kv = kv_dtype or dt
    C, R = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    if kv is DType.FP8_DS_MLA and (C, R) != (DS_MLA_CKV, DS_MLA_ROPE):
        raise SpecError(f"kv_dtype: preset {name} has ckv {C} / rope {R}; the {DS_MLA_TOKEN_BYTES}-byte fp8_ds_mla "
                        f"token holds ckv {DS_MLA_CKV} / rope {DS_MLA_ROPE} only (fp8_e4m3 takes any dims)")
    out: list[VariantSpec] = []
    for h in sorted(set(heads.values()), reverse=True):
        for q in s_q:
            if families is None:
                out += dispatch_specs(arch=arch, num_heads=h, ckv_dim=C, rope_dim=R, dtype=dt, s_q=q, kv_dtype=kv)
                continue
            for fam in families:
                out.append(VariantSpec(h, C, R, dt, kv, dt, fam, default_tile(fam, h, C, R, arch, q, kv), arch))
    return list(dict.fromkeys(out))
