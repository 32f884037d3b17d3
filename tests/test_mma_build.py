"""The mma family builds for sm_90a and sm_80 with no register spills and no warnings (real nvcc),
and its SASS carries tensor-core and cp.async instructions (issue: mma family acceptance 3)."""
from __future__ import annotations

import pytest

from build_checks import assert_clean_decode_kernel, builds_with_nvcc, built_entry, reads_sass, sass as sass_of
from generator.select import default_tile
from generator.spec import Arch, DType, Family, VariantSpec


@pytest.fixture(scope="module", params=[Arch.SM90A, Arch.SM80], ids=lambda a: a.nvcc_name)
def mma_entry(request, tmp_path_factory):
    arch = request.param
    spec = VariantSpec(128, 512, 64, DType.BF16, DType.BF16, DType.BF16, Family.MMA,
                       default_tile(Family.MMA, 128, 512, 64, arch), arch)
    return built_entry(spec, tmp_path_factory, "mma_cache")


@builds_with_nvcc
def test_mma_variant_has_no_spills_and_no_warnings(mma_entry):
    assert_clean_decode_kernel(mma_entry)


@reads_sass
def test_mma_sass_uses_tensor_cores_and_cp_async(mma_entry):
    sass = sass_of(mma_entry)
    assert "HMMA.16816.F32.BF16" in sass
    assert "LDGSTS.E.BYPASS.128" in sass  # 16-byte cp.async gathers
    assert "LDSM.16.MT88.4" in sass  # V read transposed from the same kv tile
    assert " LDL" not in sass and " STL" not in sass  # nothing in local memory


# ---- fp8 caches (issue 13): raw stages dequantized into one fp16 tile ---------------------------------

@pytest.fixture(scope="module", params=[(Arch.SM80, DType.FP8_E4M3), (Arch.SM80, DType.FP8_DS_MLA),
                                        (Arch.SM90A, DType.FP8_E4M3)], ids=lambda p: f"{p[0].nvcc_name}-{p[1].cli_name}")
def mma_fp8_entry(request, tmp_path_factory):
    arch, kv = request.param
    spec = VariantSpec(16, 512, 64, DType.BF16, kv, DType.BF16, Family.MMA,
                       default_tile(Family.MMA, 16, 512, 64, arch, 1, kv), arch)
    return built_entry(spec, tmp_path_factory, "mma_fp8_cache")


@builds_with_nvcc
def test_mma_fp8_variant_has_no_spills_and_no_warnings(mma_fp8_entry):
    assert_clean_decode_kernel(mma_fp8_entry)


@reads_sass
def test_mma_fp8_sass_dequantizes_for_fp16_mma(mma_fp8_entry):
    sass = sass_of(mma_fp8_entry)
    assert "HMMA.16816.F32 " in sass and "HMMA.16816.F32.BF16" not in sass  # fp16 tensor cores
    assert "LDGSTS.E.BYPASS.128" in sass and "LDS.128" in sass and "STS.128" in sass  # raw stage -> fp16 tile
    if "sm90a" in mma_fp8_entry.meta()["variant_id"]:
        assert "F2FP.F16.E4M3.UNPACK_B" in sass  # sm_89+: one instruction per e4m3 pair
    else:
        assert "HMUL2" in sass and "F2FP.F16.E4M3" not in sass  # sm_80: bits moved by hand, times 2^8
