"""Cache faults on hand-made entries (no compiler runs): malformed meta.json, a cache root that is a
file, MLA_GEN_NVCC naming no nvcc, and the `cache` command's own usage. The faults that need real
builds (read-only cache, full disk, two nvcc versions) are in test_build_cache.py."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest

from cache_fakes import fake_entry
from conftest import run_cli
from generator.cache import BinaryCache, Entry
from generator.errors import CacheError, ToolchainError
from generator.toolchain import find_nvcc


def _drop(key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda meta: {k: v for k, v in meta.items() if k != key}


def _set(key: str, value: Any, inner: str | None = None) -> Callable[[dict[str, Any]], Any]:
    def change(meta: dict[str, Any]) -> Any:
        (meta[inner] if inner else meta)[key] = value
        return meta
    return change


MALFORMED: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "not_json": (lambda meta: "{not json", "unreadable"),
    "a_list": (lambda meta: [meta], "is a JSON list"),
    "no_so": (_drop("so"), "has no 'so'"),
    "no_kind": (_drop("kind"), "has no 'kind'"),
    "no_last_used": (_drop("last_used"), "has no 'last_used'"),
    "so_a_string": (_set("so", "x.so"), "'so' is str"),
    "size_as_text": (_set("size", "15", inner="so"), "so.'size' is str"),
    "no_sha256": (lambda meta: {**meta, "so": {"file": meta["so"]["file"], "size": 15}}, "so.'sha256'"),
    "last_used_text": (_set("last_used", "yesterday"), "'last_used' is str"),
    "unknown_kind": (_set("kind", "binding"), "kind 'binding'"),
    "so_outside_entry": (_set("file", "../../x.so", inner="so"), "is not a file name"),
    "old_schema": (_set("schema", 1), "schema 1, expected"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_meta_json_is_a_corrupt_entry_everywhere(case: str, cache_root: Path) -> None:
    path = fake_entry(cache_root, "a" * 12)
    change, says = MALFORMED[case]
    doc = change(json.loads((path / "meta.json").read_text()))
    (path / "meta.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))
    entry = Entry(path)
    with pytest.raises(CacheError, match="meta.json"):
        entry.meta()
    problems = entry.problems()
    assert len(problems) == 1 and says in problems[0], problems
    entry.touch()  # a corrupt entry is left alone, without an error

    (row,) = json.loads(run_cli("cache", "ls", "--json").stdout)["entries"]
    assert not row["ok"] and says in row["problems"][0]
    assert "CORRUPT" in run_cli("cache", "ls").stdout
    info = run_cli("cache", "info", path.name, "--json")
    assert info.returncode == 0 and not json.loads(info.stdout)["ok"], info.stderr
    verify = run_cli("cache", "verify")
    assert verify.returncode == 1 and f"CORRUPT {path}" in verify.stdout and says in verify.stdout
    assert "Traceback" not in verify.stderr + info.stderr
    prune = run_cli("cache", "prune", "--unused-days", "1000")  # a corrupt entry counts as unused
    assert prune.returncode == 0 and f"removed {path}" in prune.stdout and not path.exists()


@pytest.mark.parametrize("command", [["ls"], ["verify"], ["prune"], ["clear"], ["info", "x"]])
def test_a_cache_root_that_is_a_file_is_an_error_naming_it(command: list[str], tmp_path: Path) -> None:
    root = tmp_path / "not_a_folder"
    root.write_text("x")
    for args, env in ((["cache", "--root", str(root), *command], None),
                      (["cache", *command], {**__import__("os").environ, "MLA_GEN_CACHE_DIR": str(root)})):
        proc = run_cli(*args, env=env)
        assert proc.returncode == 1, (proc.stdout, proc.stderr)
        assert f"{root}: not a folder" in proc.stderr and "0 entries" not in proc.stdout
        assert len(proc.stderr.strip().splitlines()) == 1
    assert root.read_text() == "x"
    with pytest.raises(CacheError, match="not a folder"):
        BinaryCache(root).entries()


@pytest.mark.parametrize("what", ["missing", "not_executable", "a_folder"])
def test_mla_gen_nvcc_naming_no_nvcc_is_an_error(what: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "nvcc"
    if what == "not_executable":
        bad.write_text("#!/bin/sh\n")
    elif what == "a_folder":
        bad.mkdir()
    monkeypatch.setenv("MLA_GEN_NVCC", str(bad))
    with pytest.raises(ToolchainError, match=f"MLA_GEN_NVCC={bad}: expected an executable nvcc file"):
        find_nvcc()
    proc = run_cli("build", "--heads", "16", "--ckv", "256", "--rope", "32", "--family", "simt")
    assert proc.returncode == 1 and f"MLA_GEN_NVCC={bad}" in proc.stderr, proc.stderr
    assert "built in" not in proc.stderr and "Warning" not in proc.stderr


def test_cache_alone_lists_its_commands() -> None:
    proc = run_cli("cache")
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert all(name in line for name in ("ls", "info", "verify", "prune", "clear")), line


def test_cache_info_prints_text_and_json_only_with_json(cache_root: Path) -> None:
    path = fake_entry(cache_root, "b" * 12)
    text = run_cli("cache", "info", path.name)
    assert text.returncode == 0 and text.stdout.startswith(f"{path}  variant  ok")
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.stdout)
    doc = json.loads(run_cli("cache", "info", path.name, "--json").stdout)
    assert doc["path"] == str(path) and doc["ok"] and doc["meta"]["variant_id"] in path.name


def test_a_full_disk_while_writing_the_build_is_a_cache_error_and_publishes_nothing(
        cache_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from generator import build as build_mod
    from generator.select import default_tile
    from generator.spec import Arch, DType, Family, VariantSpec

    def no_space(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(cache_root))

    monkeypatch.setattr(build_mod, "write_sources", no_space)
    tile = default_tile(Family.SIMT, 16, 256, 32, Arch.SM90A)
    spec = VariantSpec(16, 256, 32, DType.BF16, DType.BF16, DType.BF16, Family.SIMT, tile, Arch.SM90A)
    with pytest.raises(CacheError, match=f"{spec.variant_id}: cannot write the build in .*No space left"):
        build_mod.build(spec)
    assert BinaryCache(cache_root).entries() == [] and not list(cache_root.glob("*/.tmp-*"))
