"""The mma family builds for sm_90a and sm_80 with no register spills and no warnings (real nvcc),
and its SASS carries tensor-core and cp.async instructions (issue: mma family acceptance 3)."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from generator.build import build
from generator.cache import BinaryCache
from generator.select import default_tile
from generator.spec import Arch, DType, Family, VariantSpec


@pytest.fixture(scope="module", params=[Arch.SM90A, Arch.SM80], ids=lambda a: a.nvcc_name)
def mma_entry(request, tmp_path_factory):
    arch = request.param
    spec = VariantSpec(128, 512, 64, DType.BF16, DType.BF16, DType.BF16, Family.MMA,
                       default_tile(Family.MMA, 128, 512, 64, arch), arch)
    result = build(spec, BinaryCache(tmp_path_factory.mktemp("mma_cache")))
    assert result.built
    return result.entry


@pytest.mark.slow
@pytest.mark.needs_nvcc
def test_mma_variant_has_no_spills_and_no_warnings(mma_entry):
    meta = mma_entry.meta()
    log = (mma_entry.path / "build.log").read_text()
    spill_lines = [ln for ln in log.splitlines() if "spill stores" in ln]
    assert spill_lines and all("0 bytes spill stores, 0 bytes spill loads" in ln for ln in spill_lines), log
    decode = next(k for k in meta["ptxas"] if k["function"] == "decode_kernel")
    assert decode["spill_stores"] == 0 and decode["spill_loads"] == 0 and decode["stack_bytes"] == 0
    print(f"{meta['variant_id']}: {decode['registers']} registers, 0 spills")
    assert "warning" not in log.lower(), log


@pytest.mark.slow
@pytest.mark.needs_nvcc
@pytest.mark.skipif(shutil.which("cuobjdump") is None, reason="cuobjdump not on PATH")
def test_mma_sass_uses_tensor_cores_and_cp_async(mma_entry):
    so = mma_entry.so_path()
    sass = subprocess.run(["cuobjdump", "--dump-sass", str(so)], capture_output=True, text=True, check=True).stdout
    assert "HMMA.16816.F32.BF16" in sass
    assert "LDGSTS.E.BYPASS.128" in sass  # 16-byte cp.async gathers
    assert "LDSM.16.MT88.4" in sass  # V read transposed from the same kv tile
    assert " LDL" not in sass and " STL" not in sass  # nothing in local memory
