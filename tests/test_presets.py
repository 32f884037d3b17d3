"""Model presets: real head counts and dims, tensor-parallel splits, sm_scale from the original head dim."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from generator.errors import SpecError
from generator.presets import model_config, preset_names, preset_variants
from generator.spec import Arch, DType, Family

PACKAGE_MODELS = REPO / "generator" / "models.json"


def _models() -> dict[str, dict]:
    return json.loads(PACKAGE_MODELS.read_text())["models"]


def test_known_presets_are_listed() -> None:
    names = preset_names()
    assert {"deepseek-v3", "deepseek-v2", "deepseek-v2-lite", "kimi-k2", "minicpm3-4b"} <= set(names)
    assert names == sorted(_models())


@pytest.mark.parametrize("name, heads", [
    ("deepseek-v3", {1: 128, 2: 64, 4: 32, 8: 16}),
    ("deepseek-r1", {1: 128, 2: 64, 4: 32, 8: 16}),
    ("kimi-k2", {1: 64, 2: 32, 4: 16, 8: 8}),
    ("minicpm3-4b", {1: 40, 2: 20, 4: 10, 8: 5}),
])
def test_tensor_parallel_head_splits(name: str, heads: dict[int, int]) -> None:
    assert model_config(name).tp_heads() == heads
    for arch in (Arch.SM80, Arch.SM90A):
        variants = preset_variants(name, arch)
        assert sorted({s.num_heads for s in variants}, reverse=True) == sorted(heads.values(), reverse=True)
        assert all(s.arch is arch for s in variants)


def test_deepseek_v3_dims() -> None:
    for spec in preset_variants("deepseek-v3", Arch.SM90A):
        assert (spec.ckv_dim, spec.rope_dim, spec.q_dtype) == (512, 64, DType.BF16)
    tp8 = preset_variants("deepseek-v3", Arch.SM90A, tp_sizes=[8])
    # the variant dispatch picks: narrow, whatever the batch
    assert [(s.num_heads, s.family) for s in tp8] == [(16, Family.NARROW)]


def test_minicpm3_dims() -> None:
    cfg = model_config("minicpm3-4b")
    assert (cfg.num_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim) == (40, 256, 32)
    variants = preset_variants("minicpm3-4b", Arch.SM80, families=[Family.SIMT])
    assert {(s.num_heads, s.ckv_dim, s.rope_dim) for s in variants} == {(40, 256, 32), (20, 256, 32),
                                                                        (10, 256, 32), (5, 256, 32)}


def test_unknown_tp_and_preset_raise() -> None:
    with pytest.raises(SpecError, match=r"^tp: "):
        preset_variants("deepseek-v3", Arch.SM90A, tp_sizes=[3])
    with pytest.raises(SpecError, match=r"^preset: unknown preset 'gpt-2'"):
        model_config("gpt-2")


def _hand_sm_scale(raw: dict) -> float:
    """(nope + rope)^-0.5 * mscale^2 with YaRN mscale = 0.1 * mscale_all_dim * ln(factor) + 1."""
    rs = raw.get("rope_scaling") or {}
    mscale = 1.0
    if rs.get("type") == "yarn" and rs.get("factor", 1) > 1 and rs.get("mscale_all_dim"):
        mscale = 0.1 * rs["mscale_all_dim"] * math.log(rs["factor"]) + 1
    return (raw["qk_nope_head_dim"] + raw["qk_rope_head_dim"]) ** -0.5 * mscale ** 2


def _with_sm_scale() -> list[str]:
    return [n for n, raw in _models().items() if raw.get("sm_scale") is not None]


@pytest.mark.parametrize("name", _with_sm_scale())
def test_sm_scale_matches_models_json(name: str) -> None:
    raw = _models()[name]
    base = _models()[raw["alias_of"]] if "alias_of" in raw else raw
    got = model_config(name).sm_scale
    assert got == pytest.approx(raw["sm_scale"], rel=1e-12)
    assert got == pytest.approx(_hand_sm_scale(base), rel=1e-12)
    assert got != pytest.approx((base["kv_lora_rank"] + base["qk_rope_head_dim"]) ** -0.5)  # never 1/sqrt(576)


def test_sm_scale_values_cover_yarn_and_plain() -> None:
    names = _with_sm_scale()
    assert {"deepseek-v3", "kimi-k2", "minicpm3-4b"} <= set(names)
    assert model_config("deepseek-v3").mscale == pytest.approx(0.1 * math.log(40) + 1)
    assert model_config("minicpm3-4b").sm_scale == pytest.approx(96 ** -0.5)  # no rope scaling


def test_deepseek_v2_sm_scale_is_unknown() -> None:
    with pytest.raises(SpecError, match=r"^sm_scale: .*deepseek-v2"):
        model_config("deepseek-v2").sm_scale


def test_package_models_json_is_a_copy_of_shared() -> None:
    shared = REPO.parent / "shared" / "models.json"
    if not shared.is_file():
        pytest.skip("no shared/models.json beside this checkout (only in the project's work tree)")
    assert json.loads(shared.read_text()) == json.loads(PACKAGE_MODELS.read_text())


def test_presets_do_not_read_shared_at_run_time(tmp_path: Path) -> None:
    """With every open() under ../shared made to fail, presets still load, from generator/models.json."""
    forbidden = tmp_path / "shared"
    code = (
        "import builtins, io, pathlib, sys\n"
        "forbidden = [pathlib.Path(p).resolve() for p in sys.argv[1:]]\n"
        "def guard(f):\n"
        "    def opener(file, *a, **k):\n"
        "        p = pathlib.Path(str(file)).resolve()\n"
        "        if any(p == d or d in p.parents for d in forbidden): raise AssertionError(f'read {file}')\n"
        "        return f(file, *a, **k)\n"
        "    return opener\n"
        "builtins.open = guard(builtins.open); io.open = guard(io.open)\n"
        "if len(forbidden) > 1: open(forbidden[1] / 'models.json')  # the guard itself must bite\n"
        "from generator import presets\n"
        "from generator.spec import Arch\n"
        "print(presets._MODELS_JSON)\n"
        "print(' '.join(s.variant_id for s in presets.preset_variants('deepseek-v3', Arch.parse('sm_90a'))))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    shared = str(REPO.parent / "shared")

    def run(*dirs: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", code, *dirs], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=60)

    proc = run(shared)
    assert proc.returncode == 0, proc.stderr
    models_path, ids = proc.stdout.strip().splitlines()
    assert Path(models_path) == PACKAGE_MODELS
    assert ids.split() == [s.variant_id for s in preset_variants("deepseek-v3", Arch.SM90A)]
    forbidden.mkdir()
    (forbidden / "models.json").write_text("{}")
    guarded = run(shared, str(forbidden))
    assert guarded.returncode != 0 and "AssertionError: read" in guarded.stderr
