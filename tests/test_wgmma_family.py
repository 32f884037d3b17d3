"""The wgmma family (templates/wgmma.cuh): sm_90a only, tile rules, the shared-memory formula, and (slow,
real nvcc) a build with no spills and no warnings whose SASS carries HGMMA, V read transposed."""
from __future__ import annotations

import pytest

from build_checks import assert_clean_decode_kernel, builds_with_nvcc, built_entry, reads_sass, sass as sass_of
from generator.errors import SpecError
from generator.select import decide, default_tile, families_for
from generator.spec import Arch, DType, Family, Tile, VariantSpec

BF16 = DType.BF16


def wgmma(heads: int = 128, ckv: int = 512, rope: int = 64, tile: Tile | None = None,
          arch: Arch = Arch.SM90A) -> VariantSpec:
    tile = tile or default_tile(Family.WGMMA, heads, ckv, rope, Arch.SM90A)
    return VariantSpec(heads, ckv, rope, BF16, BF16, BF16, Family.WGMMA, tile, arch)


@pytest.mark.parametrize("arch", [a for a in Arch if a is not Arch.SM90A], ids=lambda a: a.nvcc_name)
def test_wgmma_only_for_sm90a(arch: Arch) -> None:
    assert Family.WGMMA not in families_for(arch)
    with pytest.raises(SpecError, match=r"^arch: family wgmma"):
        wgmma(arch=arch)
    with pytest.raises(SpecError, match=r"^family: wgmma does not run on"):
        decide(arch=arch, num_heads=128, ckv_dim=512, rope_dim=64, dtype=BF16, family=Family.WGMMA)


def test_wgmma_offered_on_sm90a() -> None:
    assert Family.WGMMA in families_for(Arch.SM90A)
    assert Family.WGMMA.min_cc == 90


def test_default_tiles_and_shared_memory() -> None:
    big = wgmma()
    assert big.tile == Tile(64, 64, 2, 8)
    # q 64x576 + 2 stages x 64x576 + P 64x64 (16-bit) + red_max/red_sum [2][64] fp32
    assert big.smem_bytes == 64 * 576 * 2 + 2 * 64 * 576 * 2 + 64 * 64 * 2 + 2 * 2 * 64 * 4 == 230400
    assert big.smem_bytes <= Arch.SM90A.max_smem_per_block
    small = wgmma(heads=40, ckv=256, rope=32)
    assert small.tile == Tile(64, 64, 4, 8)
    assert small.smem_bytes <= Arch.SM90A.max_smem_per_block


@pytest.mark.parametrize("kwargs, field", [
    (dict(tile=Tile(32, 64, 2, 8)), "tile.block_m"),
    (dict(tile=Tile(64, 16, 2, 8)), "tile.block_n"),
    (dict(tile=Tile(64, 64, 2, 4)), "tile.warps"),
    (dict(tile=Tile(64, 64, 1, 8)), "tile.stages"),
    (dict(tile=Tile(64, 64, 3, 8)), "tile"),  # 3 x 72 KB stages do not fit
    (dict(ckv=192, tile=Tile(64, 64, 2, 8)), "ckv_dim"),
    (dict(ckv=640, tile=Tile(64, 32, 2, 8)), "ckv_dim"),
    (dict(rope=48, tile=Tile(64, 64, 2, 8)), "rope_dim"),
])
def test_invalid_tiles_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(SpecError) as info:
        wgmma(**kwargs)
    assert str(info.value).startswith(f"{field}:"), str(info.value)


@pytest.fixture(scope="module")
def wgmma_entry(tmp_path_factory):
    return built_entry(wgmma(), tmp_path_factory, "wgmma_cache")


@builds_with_nvcc
def test_wgmma_variant_has_no_spills_and_no_warnings(wgmma_entry):
    assert_clean_decode_kernel(wgmma_entry)


@reads_sass
def test_wgmma_sass_uses_hgmma(wgmma_entry):
    sass = sass_of(wgmma_entry)
    assert "HGMMA.64x32x16.F32.BF16" in sass        # S = Q K^T, 32 tokens per warpgroup
    assert "HGMMA.64x256x16.F32.BF16" in sass and ".tnspB" in sass  # O += P V, V MN-major
    assert "LDGSTS.E.BYPASS.128" in sass            # 16-byte cp.async gathers
    assert " LDL" not in sass and " STL" not in sass


@pytest.mark.parametrize("heads, s_q", [(36, 1), (33, 1), (18, 2), (13, 3)])
def test_dispatch_picks_wgmma_on_sm90a_between_narrow_and_seesaw_rows(heads: int, s_q: int) -> None:
    d = decide(arch=Arch.SM90A, num_heads=heads, ckv_dim=512, rope_dim=64, dtype=BF16, s_q=s_q)
    # more than 32 rows at ckv 512 (narrow would need several row blocks), fewer than 40 (seesaw's)
    assert d.spec.family is Family.WGMMA
    assert "also for few heads" in d.reasons[0]
    assert decide(arch=Arch.SM80, num_heads=heads, ckv_dim=512, rope_dim=64, dtype=BF16).spec.family is Family.MMA


# ---- fp8 caches (issue 13): raw stages dequantized into one fp16 tile ---------------------------------

def wgmma_fp8(kv: DType, heads: int = 128, ckv: int = 512, rope: int = 64) -> VariantSpec:
    tile = default_tile(Family.WGMMA, heads, ckv, rope, Arch.SM90A, 1, kv)
    return VariantSpec(heads, ckv, rope, BF16, kv, BF16, Family.WGMMA, tile, Arch.SM90A)


def test_fp8_tiles_and_shared_memory() -> None:
    # fp8_e4m3 512/64: 2 raw stages of 64 x 576 bytes and one fp16 tile take what 2 fp16 stages took
    e4m3 = wgmma_fp8(DType.FP8_E4M3)
    assert e4m3.tile == Tile(64, 64, 2, 8) and e4m3.smem_bytes == wgmma().smem_bytes == 230400
    # fp8_ds_mla: two 64-token stages of 656-byte tokens and the fp16 tile do not fit: 32-token tiles
    ds = wgmma_fp8(DType.FP8_DS_MLA)
    assert ds.tile == Tile(64, 32, 4, 8)
    # q, 4 raw stages (32 x 656 bytes = 20.5 KB, each padded to 21 KB), the fp16 tile, P, the exchange arrays
    assert ds.smem_bytes == 64 * 576 * 2 + 4 * 21 * 1024 + 32 * 576 * 2 + 64 * 32 * 2 + 4 * 64 * 4 == 201728
    assert wgmma_fp8(DType.FP8_E4M3, heads=40, ckv=256, rope=32).tile == Tile(64, 64, 4, 8)


@pytest.fixture(scope="module", params=[DType.FP8_E4M3, DType.FP8_DS_MLA], ids=lambda d: d.cli_name)
def wgmma_fp8_entry(request, tmp_path_factory):
    return built_entry(wgmma_fp8(request.param), tmp_path_factory, "wgmma_fp8_cache")


@builds_with_nvcc
def test_fp8_variant_has_no_spills_and_no_warnings(wgmma_fp8_entry):
    assert_clean_decode_kernel(wgmma_fp8_entry)


@reads_sass
def test_fp8_sass_dequantizes_for_fp16_hgmma(wgmma_fp8_entry):
    sass = sass_of(wgmma_fp8_entry)
    assert "HGMMA.64x" in sass and ".F32.BF16" not in sass.split("merge_kernel")[0]  # fp16 tensor cores
    assert "F2FP.F16.E4M3.UNPACK_B" in sass                  # e4m3x2 -> f16x2
    assert "LDGSTS.E.BYPASS.128" in sass and "LDS.128" in sass and "STS.128" in sass  # raw stage -> fp16 tile
    assert " LDL" not in sass and " STL" not in sass
