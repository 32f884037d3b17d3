"""The narrow family (templates/narrow.cuh): sm_90a only, tile rules (rows on wgmma n, at most 128 O^T
accumulators per thread), the shared-memory formula, dispatch for few rows, and (slow, real nvcc) a build
with no spills and no warnings whose SASS carries HGMMA with the query rows as n."""
from __future__ import annotations

import pytest

from build_checks import assert_clean_decode_kernel, builds_with_nvcc, built_entry, reads_sass, sass as sass_of
from generator.errors import SpecError
from generator.select import decide, default_tile, families_for
from generator.spec import Arch, DType, Family, Tile, VariantSpec, narrow_max_rows

BF16 = DType.BF16


def narrow(heads: int = 16, ckv: int = 512, rope: int = 64, tile: Tile | None = None, s_q: int = 1,
           arch: Arch = Arch.SM90A) -> VariantSpec:
    tile = tile or default_tile(Family.NARROW, heads, ckv, rope, Arch.SM90A, s_q)
    return VariantSpec(heads, ckv, rope, BF16, BF16, BF16, Family.NARROW, tile, arch)


@pytest.mark.parametrize("arch", [a for a in Arch if a is not Arch.SM90A], ids=lambda a: a.nvcc_name)
def test_narrow_only_for_sm90a(arch: Arch) -> None:
    assert Family.NARROW not in families_for(arch)
    with pytest.raises(SpecError, match=r"^arch: family narrow"):
        narrow(arch=arch)


@pytest.mark.parametrize("heads, s_q, ckv, rope, rows", [
    (1, 1, 512, 64, 8), (16, 1, 512, 64, 16), (20, 1, 512, 64, 24), (16, 2, 512, 64, 32),
    (40, 1, 512, 64, 32), (128, 1, 512, 64, 32), (40, 1, 256, 32, 40), (128, 2, 256, 32, 40)])
def test_default_tile_rows(heads: int, s_q: int, ckv: int, rope: int, rows: int) -> None:
    spec = narrow(heads, ckv, rope, s_q=s_q)
    assert spec.tile == Tile(rows, 64, 2, 8)
    assert spec.smem_bytes <= Arch.SM90A.max_smem_per_block


def test_max_rows_keep_o_accumulators_at_128() -> None:
    assert narrow_max_rows(512) == 32 and narrow_max_rows(256) == 40 and narrow_max_rows(128) == 40
    for ckv in (128, 256, 512):
        assert ckv // 64 * narrow_max_rows(ckv) // 2 <= 128


def test_shared_memory_formula() -> None:
    # q 16x512 + 16x64 (each 1024-aligned), 2 stages of 64x576, P^T 2x16x64, [2][4][16] + [2][16] + [16] fp32
    assert narrow().smem_bytes == 16 * 512 * 2 + 2048 + 2 * 64 * 576 * 2 + 2 * 16 * 64 * 2 + 11 * 16 * 4 == 170688
    # rope 32 at 24 rows: the q rope panel (1536 B) is padded to 2048 before the kv stages
    spec = narrow(heads=24, ckv=256, rope=32)
    assert spec.smem_bytes == 24 * 256 * 2 + 2048 + 2 * 64 * 288 * 2 + 2 * 24 * 64 * 2 + 11 * 24 * 4


@pytest.mark.parametrize("kwargs, field", [
    (dict(tile=Tile(12, 64, 2, 8)), "tile.block_m"),
    (dict(tile=Tile(40, 64, 2, 8)), "tile.block_m"),   # 8 m-tiles x 20 > 128 accumulators at ckv 512
    (dict(tile=Tile(16, 32, 2, 8)), "tile.block_n"),
    (dict(tile=Tile(16, 64, 3, 8)), "tile.stages"),
    (dict(tile=Tile(16, 64, 2, 4)), "tile.warps"),
    (dict(ckv=480, tile=Tile(16, 64, 2, 8)), "ckv_dim"),
    (dict(ckv=640, tile=Tile(16, 64, 2, 8)), "ckv_dim"),
    (dict(rope=48, tile=Tile(16, 64, 2, 8)), "rope_dim"),
])
def test_invalid_tiles_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(SpecError) as info:
        narrow(**kwargs)
    assert str(info.value).startswith(f"{field}:"), str(info.value)


@pytest.mark.parametrize("heads, s_q, ckv, rope", [(1, 1, 512, 64), (16, 1, 512, 64), (16, 2, 512, 64),
                                                   (32, 1, 512, 64), (36, 1, 256, 32), (16, 2, 256, 32)])
def test_dispatch_picks_narrow_for_few_rows(heads: int, s_q: int, ckv: int, rope: int) -> None:
    d = decide(arch=Arch.SM90A, num_heads=heads, ckv_dim=ckv, rope_dim=rope, dtype=BF16, s_q=s_q)
    assert d.spec.family is Family.NARROW and d.m_blocks == 1
    assert d.reasons[0].startswith("family narrow:")


@pytest.fixture(scope="module")
def narrow_entry(tmp_path_factory):
    return built_entry(narrow(heads=32), tmp_path_factory, "narrow_cache")


@builds_with_nvcc
def test_narrow_variant_has_no_spills_and_no_warnings(narrow_entry):
    assert_clean_decode_kernel(narrow_entry)


@reads_sass
def test_narrow_sass_uses_hgmma_with_rows_as_n(narrow_entry):
    sass = sass_of(narrow_entry)
    # 36 k16 steps of S^T = K Q^T and 8 m-tiles x 4 k16 steps of O^T = V^T P^T, all m64 n32
    assert sass.count("HGMMA.64x32x16.F32.BF16") == 36 + 32
    assert "LDGSTS.E.BYPASS.128" in sass
    assert " LDL" not in sass and " STL" not in sass


# ---- fp8 caches (issue 13): the dequantizing gather -------------------------------------------------

E4M3, DS = DType.FP8_E4M3, DType.FP8_DS_MLA


def narrow_fp8(kv: DType, heads: int = 16, ckv: int = 512, rope: int = 64, q: DType = BF16) -> VariantSpec:
    tile = default_tile(Family.NARROW, heads, ckv, rope, Arch.SM90A, 1, kv)
    return VariantSpec(heads, ckv, rope, q, kv, q, Family.NARROW, tile, Arch.SM90A)


def test_fp8_rows_leave_registers_for_the_gather() -> None:
    # the tile's bytes wait in registers next to O^T: half the O^T accumulators of the 16-bit limit
    assert narrow_max_rows(512, E4M3) == narrow_max_rows(512, DS) == 16
    assert narrow_max_rows(256, E4M3) == 32
    assert narrow_fp8(E4M3, heads=40, ckv=256, rope=32).tile.block_m == 32


def test_the_e4m3_tensor_core_paths_quantize_q() -> None:
    assert narrow_fp8(E4M3).quantizes_q and narrow_fp8(DS).quantizes_q and not narrow().quantizes_q
    seesaw = decide(arch=Arch.SM90A, num_heads=128, ckv_dim=512, rope_dim=64, dtype=BF16, kv_dtype=E4M3)
    assert seesaw.spec.family is Family.SEESAW and seesaw.spec.quantizes_q
    assert "Q K^T in e4m3 straight from a ring of the cache's TMA-loaded bytes" in seesaw.reasons[0], seesaw.reasons
    assert not decide(arch=Arch.SM90A, num_heads=128, ckv_dim=512, rope_dim=64, dtype=BF16).spec.quantizes_q
    d = decide(arch=Arch.SM90A, num_heads=16, ckv_dim=512, rope_dim=64, dtype=BF16, kv_dtype=E4M3)
    assert d.spec.quantizes_q and "Q K^T in e4m3 straight from the cache's bytes" in d.reasons[0], d.reasons


def test_fp8_shared_memory_formula() -> None:
    # fp8_e4m3 (narrow_e4m3.cuh): q hi and lo 2 x 16 x (512 + 128), 3 raw stages 64 x (512 + 128), P^T 2 x 16 x 64
    # fp16, O 2 x 16 x (512 + 4) fp32 (an area per warpgroup), the row arrays (1 + 8 + 2 + 1) x 16 fp32, 6 mbarriers;
    # a producer warpgroup
    assert narrow_fp8(E4M3).smem_bytes == 20480 + 3 * 64 * 640 + 4096 + 2 * 16 * 516 * 4 + 12 * 16 * 4 + 48 == 214320
    assert narrow_fp8(E4M3, heads=32, ckv=256, rope=32).smem_bytes == (24576 + 4 * 64 * 384 + 2 * 32 * 64 * 2 +
                                                                        2 * 32 * 260 * 4 + 12 * 32 * 4 + 64)
    assert (narrow_fp8(E4M3).threads, narrow_fp8(DS).threads, narrow().threads) == (384, 384, 256)
    # fp8_ds_mla: the same, each stage with its tokens' scales [64][4] fp32
    assert narrow_fp8(DS).smem_bytes == narrow_fp8(E4M3).smem_bytes + 3 * 64 * 4 * 4 == 214320 + 3072 <= 227 * 1024


# per row count: fp8_e4m3's family and fp8_ds_mla's (seesaw reads fp8_e4m3 only), row blocks
@pytest.mark.parametrize("heads, s_q, families, blocks", [
    (16, 1, (Family.NARROW, Family.NARROW), 1), (5, 1, (Family.NARROW, Family.NARROW), 1),
    (8, 2, (Family.NARROW, Family.NARROW), 1), (16, 2, (Family.WGMMA, Family.WGMMA), 1),
    (128, 1, (Family.SEESAW, Family.WGMMA), 2), (20, 2, (Family.SEESAW, Family.WGMMA), 1)])
@pytest.mark.parametrize("kv", [E4M3, DS], ids=lambda d: d.cli_name)
def test_fp8_dispatch_narrow_up_to_16_rows_then_seesaw_or_wgmma(kv: DType, heads: int, s_q: int,
                                                                families: tuple[Family, Family], blocks: int) -> None:
    family = families[0] if kv is E4M3 else families[1]
    d = decide(arch=Arch.SM90A, num_heads=heads, ckv_dim=512, rope_dim=64, dtype=BF16, s_q=s_q, kv_dtype=kv)
    assert d.spec.family is family and d.spec.kv_dtype is kv and d.m_blocks == blocks
    assert d.reasons[0].startswith(f"family {family.value}:")


@pytest.mark.parametrize("arch", [Arch.SM80, Arch.SM86, Arch.SM90])
def test_fp8_without_narrow_is_mma(arch: Arch) -> None:
    d = decide(arch=arch, num_heads=16, ckv_dim=512, rope_dim=64, dtype=BF16, kv_dtype=E4M3)
    assert d.spec.family is Family.MMA and d.spec.kv_dtype is E4M3


def test_fp8_before_sm80_names_kv_dtype() -> None:
    with pytest.raises(SpecError,
                       match=r"^kv_dtype: fp8_e4m3 caches are read by the narrow, seesaw, wgmma, mma families"):
        decide(arch=Arch.SM75, num_heads=16, ckv_dim=512, rope_dim=64, dtype=BF16, kv_dtype=E4M3)


@pytest.mark.parametrize("family, message", [
    (Family.SEESAW, r"^kv_dtype: seesaw reads fp8_e4m3 caches only .*got fp8_ds_mla"),
    (Family.SIMT, r"^kv_dtype: fp8_ds_mla caches are read by the narrow, seesaw, wgmma, mma families only"),
])
def test_fp8_in_a_family_without_the_path_names_kv_dtype(family: Family, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        decide(arch=Arch.SM90A, num_heads=64, ckv_dim=512, rope_dim=64, dtype=BF16, kv_dtype=DS, family=family)


@pytest.mark.parametrize("kwargs, field", [
    (dict(kv=DS, ckv=256, rope=32), "kv_dtype"),   # the 656-byte token is 512 + 64
    (dict(kv=DS, q=DType.FP16), "q_dtype"),         # its rope is bf16
])
def test_fp8_ds_mla_shape_errors_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(SpecError) as info:
        narrow_fp8(**kwargs)
    assert str(info.value).startswith(f"{field}:"), str(info.value)


@pytest.fixture(scope="module", params=[E4M3, DS], ids=lambda d: d.cli_name)
def fp8_entry(request, tmp_path_factory):
    return built_entry(narrow_fp8(request.param), tmp_path_factory, "narrow_fp8_cache")


@builds_with_nvcc
def test_fp8_variant_has_no_spills_and_no_warnings(fp8_entry):
    assert_clean_decode_kernel(fp8_entry)


@reads_sass
def test_fp8_sass_reads_the_raw_cache_with_e4m3_qgmma(fp8_entry):
    # both formats (narrow_e4m3.cuh): P V in fp16 with V^T from registers (8 m-tiles x 4 k16 steps; twice: a copy
    # that masks the last tile's tokens), converted there; the tiles by TMA, the producer's registers handed over
    sass = sass_of(fp8_entry)
    assert sass.count("HGMMA.64x16x16.F32 ") == 2 * 32 and "F2FP.F16.E4M3.UNPACK_B" in sass
    assert "UTMALDG.3D" in sass and "USETMAXREG.TRY_ALLOC" in sass
    assert " LDL" not in sass and " STL" not in sass
    if "fp8e4m3" in fp8_entry.meta()["variant_id"]:
        # Q K^T in e4m3 from the raw tile (16 + 2 k32 steps, q's hi and lo parts as one n32 operand)
        assert sass.count("QGMMA.64x32x32.F32.E4M3.E4M3 ") == 18
        assert "PRMT" in sass and "LDS.128" in sass  # V^T fragments
        assert "USETMAXREG.DEALLOC" in sass
    else:
        # fp8_ds_mla: Q K^T in e4m3 per scale group (16 k32 steps), the bf16 rope in 4 k16 steps, each token's scale
        # multiplied into V^T (HMUL2), the scales by boxes of their own map (bulk copies per token below 8-row boxes)
        assert sass.count("QGMMA.64x32x32.F32.E4M3.E4M3 ") == 16 and sass.count("HGMMA.64x16x16.F32.BF16 ") == 4
        assert "HMUL2" in sass and "UBLKCP" in sass
