"""scripts/ablate.py: every ablation still applies to the current templates (its edits found exactly as often as
it expects) and, with real nvcc, builds its kernel without spills or warnings; a missing edit fails, naming it,
and leaves no copy behind."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from build_checks import assert_clean_decode_kernel, builds_with_nvcc, built_entry
from conftest import load_file
from generator.select import default_tile
from generator.spec import Arch, DType, Family, VariantSpec

ablate = load_file("ablate", "scripts/ablate.py")


@pytest.mark.parametrize("name", list(ablate.ABLATIONS))
def test_ablation_applies_to_the_templates(name: str, tmp_path: Path) -> None:
    out = ablate.ablate(name, tmp_path)
    edited = {e.file for e in ablate.ABLATIONS[name].edits}
    for e in ablate.ABLATIONS[name].edits:
        text = (out / e.file).read_text()
        assert e.old not in text or e.old in e.new, e
        assert e.new in text, e
    for src in ablate.TEMPLATES.iterdir():
        if src.name not in edited:
            assert (out / src.name).read_bytes() == src.read_bytes(), src.name


def test_a_moved_edit_fails_naming_it_and_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "templates"
    shutil.copytree(ablate.TEMPLATES, src)
    seesaw = src / "seesaw.cuh"
    anchor = "mbarrier_wait(free_bar, free_parity);"
    seesaw.write_text(seesaw.read_text().replace(anchor, "mbarrier_wait(free_bar, free_parity) ;"))
    with pytest.raises(ValueError, match=r"^no-loads: seesaw.cuh holds 0 copies of 'mbarrier_wait\(free_bar"):
        ablate.ablate("no-loads", tmp_path / "out", src)
    assert not (tmp_path / "out" / "no-loads").exists()


def test_unknown_ablation_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^ablation: expected one of no-loads, .*got 'no-such'"):
        ablate.ablate("no-such", tmp_path)


def test_cli_lists_and_makes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ablate.main(["--list"]) == 0
    assert list(ablate.ABLATIONS) == [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert ablate.main([str(tmp_path), "no-loads", "eighth-boxes"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eighth-boxes", "no-loads"]


@builds_with_nvcc
@pytest.mark.parametrize("name", list(ablate.ABLATIONS))
def test_ablation_builds_clean(name: str, tmp_path_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    family, kv = Family(ablate.ABLATIONS[name].family), DType.parse(ablate.ABLATIONS[name].kv_dtype)
    heads = 16 if family is Family.NARROW else 128  # a head count the family is dispatched for
    monkeypatch.setenv("MLA_GEN_TEMPLATE_DIR", str(ablate.ablate(name, tmp_path_factory.mktemp("ablations"))))
    spec = VariantSpec(heads, 512, 64, DType.BF16, kv, DType.BF16, family,
                       default_tile(family, heads, 512, 64, Arch.SM90A, kv_dtype=kv), Arch.SM90A)
    assert_clean_decode_kernel(built_entry(spec, tmp_path_factory, f"ablation_{name}"))
