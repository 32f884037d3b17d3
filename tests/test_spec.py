"""VariantSpec: validation names the field, ids round-trip, content hashes are stable and sensitive."""
from __future__ import annotations

import dataclasses
import re

import pytest

from generator.errors import SpecError
from generator.presets import preset_names, preset_variants
from generator.spec import Arch, DType, Family, Tile, VariantSpec

BF16 = DType.BF16


def simt(heads: int = 16, ckv: int = 256, rope: int = 32, tile: Tile = Tile(16, 32, 1, 4),
         arch: Arch = Arch.SM90A) -> VariantSpec:
    return VariantSpec(heads, ckv, rope, BF16, BF16, BF16, Family.SIMT, tile, arch)


def test_valid_spec_has_readable_id() -> None:
    spec = VariantSpec(128, 512, 64, BF16, BF16, BF16, Family.SIMT, Tile(16, 32, 1, 8), Arch.SM90A)
    assert spec.variant_id == "mla_decode_h128_c512_r64_bf16_bf16_simt_m16n32s1w8_sm90a"
    assert re.fullmatch(r"[a-z0-9_]+", spec.variant_id)
    assert spec.head_dim == 576 and spec.threads == 256


@pytest.mark.parametrize("kwargs, field", [
    (dict(ckv=100), "ckv_dim"),
    (dict(ckv=8), "ckv_dim"),
    (dict(rope=40), "rope_dim"),
    (dict(heads=0), "num_heads"),
    (dict(heads=2000), "num_heads"),
    (dict(heads=129), "num_heads"),
    (dict(tile=Tile(16, 8, 1, 4)), "tile.block_n"),
    (dict(tile=Tile(16, 32, 2, 4)), "tile.stages"),
    (dict(tile=Tile(16, 32, 1, 3)), "tile.warps"),
    (dict(tile=Tile(16, 32, 1, 8)), "tile.warps"),      # 64*8 = 512 does not divide ckv 256
    (dict(tile=Tile(128, 32, 1, 4)), "tile.block_m"),
])
def test_invalid_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(SpecError) as info:
        simt(**kwargs)
    assert str(info.value).startswith(f"{field}:"), str(info.value)


def test_bool_is_not_an_int() -> None:
    with pytest.raises(SpecError, match=r"^num_heads: expected an integer"):
        simt(heads=True)  # type: ignore[arg-type]


@pytest.mark.parametrize("parse, text, field", [
    (DType.parse, "fp32", "dtype"),
    (Family.parse, "tensorcore", "family"),
    (Arch.parse, "sm_99", "arch"),
    (Arch.parse, "banana", "arch"),
    (Tile.parse, "16x32", "tile"),
])
def test_unknown_names_raise_spec_error(parse, text: str, field: str) -> None:
    with pytest.raises(SpecError) as info:
        parse(text)
    msg = str(info.value)
    assert msg.startswith(f"{field}:") and repr(text) in msg, msg


def test_wrong_types_for_enum_fields() -> None:
    with pytest.raises(SpecError, match=r"^family: expected a Family"):
        VariantSpec(16, 256, 32, BF16, BF16, BF16, "simt", Tile(16, 32, 1, 4), Arch.SM90A)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match=r"^q_dtype: expected a DType"):
        VariantSpec(16, 256, 32, "bf16", BF16, BF16, Family.SIMT, Tile(16, 32, 1, 4), Arch.SM90A)  # type: ignore[arg-type]


def test_mixed_dtypes_are_rejected_naming_the_field() -> None:
    with pytest.raises(SpecError, match=r"^kv_dtype:"):
        VariantSpec(16, 256, 32, BF16, DType.FP16, BF16, Family.SIMT, Tile(16, 32, 1, 4), Arch.SM90A)
    with pytest.raises(SpecError, match=r"^out_dtype:"):
        VariantSpec(16, 256, 32, BF16, BF16, DType.FP16, Family.SIMT, Tile(16, 32, 1, 4), Arch.SM90A)


def test_shared_memory_limit_per_arch() -> None:
    big = Tile(16, 64, 1, 8)  # 16x576 fp32 q + 64x576 bf16 kv: about 111 KB
    spec = simt(heads=128, ckv=512, rope=64, tile=big, arch=Arch.SM90A)
    assert spec.smem_bytes > Arch.SM75.max_smem_per_block
    with pytest.raises(SpecError) as info:
        simt(heads=128, ckv=512, rope=64, tile=big, arch=Arch.SM75)
    msg = str(info.value)
    assert msg.startswith("tile:") and str(spec.smem_bytes) in msg and "sm_75" in msg, msg


def test_arch_parse_spellings() -> None:
    for text in ("sm_90a", "sm90a", "SM_90A", "90a"):
        assert Arch.parse(text) is Arch.SM90A
    assert Arch.SM90A.gencode == "-gencode=arch=compute_90a,code=sm_90a"
    assert Arch.SM80.nvcc_name == "sm_80" and Arch.SM90A.cc == 90
    assert Arch.for_capability(9, 0) is Arch.SM90A and Arch.for_capability(8, 0) is Arch.SM80
    with pytest.raises(SpecError, match=r"^device: compute capability 6\.1"):
        Arch.for_capability(6, 1)


ROUND_TRIP_ARCHS = [Arch.SM75, Arch.SM80, Arch.SM86, Arch.SM90A, Arch.SM120]


def _preset_specs() -> list[VariantSpec]:
    specs = [s for arch in ROUND_TRIP_ARCHS for name in preset_names() for s in preset_variants(name, arch)]
    return list(dict.fromkeys(specs))


@pytest.mark.parametrize("spec", _preset_specs(), ids=lambda s: s.variant_id)
def test_id_round_trip(spec: VariantSpec) -> None:
    assert VariantSpec.from_id(spec.variant_id) == spec
    assert VariantSpec.from_dict(spec.to_dict()) == spec


def test_round_trip_covers_every_preset_and_arch() -> None:
    specs = _preset_specs()
    assert {s.arch for s in specs} == set(ROUND_TRIP_ARCHS)
    assert {40, 20, 10, 5, 128, 64, 32, 16} <= {s.num_heads for s in specs}
    assert len({s.variant_id for s in specs}) == len(specs)  # ids are unique per spec


@pytest.mark.parametrize("bad", ["", "mla_decode_h16", "mla_decode_h16_c256_r32_bf16_bf16_simt_m16n32s1w4_sm91",
                                 "mla_decode_h16_c256_r32_fp32_fp32_simt_m16n32s1w4_sm90a",
                                 "mla_decode_h16_c100_r32_bf16_bf16_simt_m16n32s1w4_sm90a"])
def test_from_id_rejects_bad_ids(bad: str) -> None:
    with pytest.raises(SpecError):
        VariantSpec.from_id(bad)


SOURCES = {"kernel.cu": "// k\n", "binding.cpp": "// b\n"}
FLAGS = ["-O3", "-gencode=arch=compute_90a,code=sm_90a"]
TOOLCHAIN = {"nvcc": "Cuda compilation tools, release 13.0, V13.0.88", "generator": "0.1.0",
             "cxx": "g++ 12.2.0", "ext_suffix": ".cpython-311-x86_64-linux-gnu.so"}


def test_content_hash_is_stable_sha256() -> None:
    spec = simt()
    h = spec.content_hash(SOURCES, FLAGS, TOOLCHAIN)
    assert re.fullmatch(r"[0-9a-f]{64}", h)
    # same inputs, rebuilt objects and reordered dicts: same hash
    again = VariantSpec.from_id(spec.variant_id).content_hash(dict(reversed(list(SOURCES.items()))), list(FLAGS),
                                                              dict(reversed(list(TOOLCHAIN.items()))))
    assert again == h


@pytest.mark.parametrize("change", ["spec", "source", "flag", "flag_order", "nvcc", "generator", "ext_suffix"])
def test_content_hash_changes_with_every_input(change: str) -> None:
    spec, sources, flags, tc = simt(), dict(SOURCES), list(FLAGS), dict(TOOLCHAIN)
    base = spec.content_hash(sources, flags, tc)
    if change == "spec":
        spec = dataclasses.replace(spec, num_heads=32)
    elif change == "source":
        sources["kernel.cu"] += " "
    elif change == "flag":
        flags.append("-lineinfo")
    elif change == "flag_order":
        flags.reverse()
    elif change == "nvcc":
        tc["nvcc"] = tc["nvcc"].replace("V13.0.88", "V13.0.89")
    elif change == "generator":
        tc["generator"] = "0.1.1"
    else:
        tc["ext_suffix"] = ".cpython-312-x86_64-linux-gnu.so"
    assert spec.content_hash(sources, flags, tc) != base
