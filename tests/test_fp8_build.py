"""fp8 caches with a real compiler (CPU, issue 13): the launcher's launch() overload hands a variant the
kv_scale pointer of each call in DecodeParams (and the eight-pointer form leaves the params' own, 0 for
16-bit sites). The fp8 variants' builds and SASS are checked with their families (test_narrow_family.py,
test_wgmma_family.py, test_mma_build.py)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import REPO
from generator.cache import BinaryCache


# A variant that launches nothing and keeps the kv_scale and q_nope each launch() handed it.
FAKE_VARIANT = r"""
#include "params.h"
static uint64_t seen[2];
MLA_GEN_EXPORT const char* mla_gen_variant_id() { return "fake_fp8_variant"; }
MLA_GEN_EXPORT const char* mla_gen_params_hash() { return PARAMS_HASH; }
MLA_GEN_EXPORT int mla_gen_decode(const mla_gen::DecodeParams* p, uint64_t) {
  seen[0] = p->kv_scale;
  seen[1] = p->q_nope;
  return 0;
}
MLA_GEN_EXPORT int mla_gen_merge(const mla_gen::DecodeParams* p, uint64_t) { return 0; }
MLA_GEN_EXPORT int mla_gen_max_active_ctas(int* n) { *n = 1; return 0; }
MLA_GEN_EXPORT const char* mla_gen_error_string(int) { return "fake error"; }
MLA_GEN_EXPORT const uint64_t* fake_seen() { return seen; }
"""


@pytest.mark.needs_nvcc
def test_launch_passes_kv_scale_per_call(tmp_path: Path) -> None:
    import ctypes

    from generator.launcher import load_launcher
    from generator.render import params_hash
    from generator.toolchain import toolchain

    src, so = tmp_path / "fake.cpp", tmp_path / "fake.so"
    src.write_text(FAKE_VARIANT)
    subprocess.run([str(toolchain().cxx), "-shared", "-fPIC", f'-DPARAMS_HASH="{params_hash()}"',
                    f"-I{REPO / 'templates'}", str(src), "-o", str(so)], check=True)
    launcher = load_launcher(BinaryCache())
    variant = launcher.Variant(str(so))
    fake_seen = ctypes.CDLL(str(so)).fake_seen
    fake_seen.restype = ctypes.POINTER(ctypes.c_uint64)
    p = launcher.DecodeParams()
    variant.launch(p, 0, 16, 0, 0, 0, 0, 0, 0, 0, 4096, True)  # after lse: kv_scale
    assert (fake_seen()[0], fake_seen()[1]) == (4096, 16)
    variant.launch(p, 0, 32, 0, 0, 0, 0, 0, 0, 0, 8192, False)  # another scale tensor, same params
    assert (fake_seen()[0], fake_seen()[1]) == (8192, 32) and p.kv_scale == 0  # launch works on a copy
    variant.launch(p, 0, 48, 0, 0, 0, 0, 0, 0, 0, True)  # eight pointers: the params' own kv_scale
    assert (fake_seen()[0], fake_seen()[1]) == (0, 48)
    p.kv_scale = 1024
    variant.launch(p, 0, 64, 0, 0, 0, 0, 0, 0, 0, True)
    assert fake_seen()[0] == 1024
