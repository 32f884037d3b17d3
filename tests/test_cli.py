"""`python -m generator`: JSON listings, emit, one-line usage errors with exit 2, cache subcommands."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cache_fakes import ID, fake_entry
from conftest import run_cli
from generator.presets import preset_variants
from generator.spec import Arch, DType


def _json(*args: str) -> object:
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("preset, heads, ckv, rope", [
    ("deepseek-v3", {128, 64, 32, 16}, 512, 64),
    ("minicpm3-4b", {40, 20, 10, 5}, 256, 32),
])
def test_list_preset_json(preset: str, heads: set[int], ckv: int, rope: int) -> None:
    rows = _json("list", "--preset", preset, "--json")
    assert isinstance(rows, list) and rows
    assert [r["variant_id"] for r in rows] == [s.variant_id for s in preset_variants(preset, Arch.SM90A)]
    assert {r["num_heads"] for r in rows} == heads
    assert {(r["ckv_dim"], r["rope_dim"], r["arch"]) for r in rows} == {(ckv, rope, "sm90a")}
    assert all(r["smem_bytes"] > 0 and r["threads"] % 32 == 0 for r in rows)


def test_list_preset_takes_the_query_lengths() -> None:
    """--s-q applies to presets as to explicit dims: MTP's rows change narrow's tile and the family (16 heads x
    s_q 5 = 80 rows: seesaw, and wgmma for page sizes of small TMA boxes). It was ignored for presets, which listed
    (and built) the s_q 1 variants only."""
    from generator.select import dispatch_specs

    rows = _json("list", "--preset", "deepseek-v3", "--tp", "8", "--s-q", "1", "2", "5", "--json")
    want = [spec for s_q in (1, 2, 5) for spec in
            dispatch_specs(arch=Arch.SM90A, num_heads=16, ckv_dim=512, rope_dim=64, dtype=DType.BF16, s_q=s_q)]
    assert [r["variant_id"] for r in rows] == list(dict.fromkeys(s.variant_id for s in want))
    assert [r["family"] for r in rows] == ["narrow", "narrow", "seesaw", "wgmma"]
    assert rows[0]["variant_id"] != rows[1]["variant_id"]  # narrow's tile follows the rows (16, 32)
    simt = _json("list", "--preset", "deepseek-v3", "--tp", "8", "--s-q", "1", "2", "--family", "simt", "--json")
    assert len(simt) == 1  # simt's tile does not depend on the rows: one variant for both


def test_list_text_and_filter() -> None:
    proc = run_cli("list", "--preset", "deepseek-v3", "--arch", "sm_80", "--filter", "*_h16_*")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len([s for s in preset_variants("deepseek-v3", Arch.SM80) if s.num_heads == 16]) >= 1
    assert all(line.startswith("mla_decode_h16_c512_r64_") and "_sm80" in line for line in lines)


def test_list_presets_json() -> None:
    rows = {r["preset"]: r for r in _json("list", "--presets", "--json")}
    assert rows["minicpm3-4b"]["num_heads"] == 40 and rows["minicpm3-4b"]["ckv_dim"] == 256
    assert rows["deepseek-v3"]["sm_scale"] == pytest.approx(0.1352337788608801)
    assert rows["deepseek-v2"]["sm_scale"] is None


def test_emit_writes_readable_sources(tmp_path: Path) -> None:
    out = tmp_path / "emitted"
    *docs, launcher = _json("emit", "--preset", "deepseek-v3", "--out", str(out), "--json")
    specs = preset_variants("deepseek-v3", Arch.SM90A)
    assert [d["variant_id"] for d in docs] == [s.variant_id for s in specs]
    assert Path(launcher["folder"]) == out / "launcher" / launcher["launcher"]
    assert {p.name for p in Path(launcher["folder"]).iterdir()} == {"launcher.cpp", "params.h", "build.ninja"}
    for spec in specs:
        folder = out / "sm90a" / spec.variant_id
        names = {p.name for p in folder.iterdir()}
        assert {"kernel.cu", "build.ninja", "params.h", "common.cuh", f"{spec.family.value}.cuh"} <= names
        kernel = (folder / "kernel.cu").read_text()
        assert f"static constexpr int kNumHeads = {spec.num_heads};" in kernel
        assert "static constexpr int kCkvDim = 512;" in kernel and "static constexpr int kRopeDim = 64;" in kernel
        assert "code=sm_90a" in (folder / "build.ninja").read_text()
    # a second emit leaves unchanged files untouched (ninja would otherwise rebuild)
    kernel = out / "sm90a" / specs[0].variant_id / "kernel.cu"
    before = kernel.stat().st_mtime_ns
    time.sleep(0.05)
    _json("emit", "--preset", "deepseek-v3", "--out", str(out), "--json")
    assert kernel.stat().st_mtime_ns == before


@pytest.mark.parametrize("args, names", [
    (["list", "--preset", "no-such-model"], ["--preset", "no-such-model"]),
    (["list", "--heads", "16", "--ckv", "100", "--rope", "32"], ["--ckv", "100"]),
    (["list", "--heads", "0", "--ckv", "256", "--rope", "32"], ["--heads", "0"]),
    (["list", "--preset", "deepseek-v3", "--arch", "sm_99"], ["--arch", "sm_99"]),
    (["list", "--preset", "deepseek-v3", "--bogus-flag"], ["--bogus-flag"]),
    (["emit", "--preset", "deepseek-v3", "--dtype", "fp32"], ["--dtype", "fp32"]),
    (["build", "--preset", "deepseek-v3", "-j", "0"], ["--jobs"]),
    (["list", "--preset", "deepseek-v3", "--tp", "3"], ["--tp"]),
    (["list", "--heads", "16", "--ckv", "256"], ["--rope"]),
    (["list", "--id", "not_a_variant"], ["--id", "not_a_variant"]),
    (["list", "--heads", "129", "--ckv", "512", "--rope", "64"], ["--heads", "129"]),
    (["explain", "--heads", "129", "--ckv", "512", "--rope", "64"], ["--heads", "129"]),
])
def test_bad_input_exits_2_with_one_line(args: list[str], names: list[str]) -> None:
    proc = run_cli(*args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert all(n in lines[0] for n in names), lines[0]
    assert proc.stdout == ""


# -- fp8 caches (--kv-dtype) ---------------------------------------------------------------------------

@pytest.mark.parametrize("kv, spelled", [("fp8_e4m3", "fp8e4m3"), ("fp8_ds_mla", "fp8dsmla")])
def test_list_preset_with_an_fp8_cache(kv: str, spelled: str) -> None:
    rows = _json("list", "--preset", "deepseek-v3", "--kv-dtype", kv, "--json")
    assert [r["variant_id"] for r in rows] == [
        s.variant_id for s in preset_variants("deepseek-v3", Arch.SM90A, kv_dtype=DType.parse(kv))]
    assert {r["num_heads"] for r in rows} == {128, 64, 32, 16}
    assert all(f"_bf16_{spelled}_" in r["variant_id"] and r["kv_dtype"] == spelled for r in rows)
    assert {r["scale_granularity"] for r in rows} == {DType.parse(kv).scale_granularity}
    text = run_cli("list", "--preset", "deepseek-v3", "--kv-dtype", kv, "--tp", "8")
    assert text.returncode == 0 and text.stdout.split()[:3] == [rows[-1]["variant_id"], "kv", kv], text.stdout


def test_kv_dtype_defaults_to_the_q_dtype() -> None:
    plain = _json("list", "--heads", "16", "--ckv", "512", "--rope", "64", "--dtype", "fp16", "--json")
    same = _json("list", "--heads", "16", "--ckv", "512", "--rope", "64", "--dtype", "fp16", "--kv-dtype", "fp16",
                 "--json")
    assert plain == same and plain[0]["kv_dtype"] == "fp16" and plain[0]["scale_granularity"] is None


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_explicit_dims_take_the_variant_dispatch_picks(arch: str) -> None:
    """`build --heads ...` without --family makes what mla_decode loads for those rows (was: the arch's first
    family, wgmma, which dispatch no longer picks for 16..32 rows or from 40 rows on; wgmma is there for page
    sizes of small TMA boxes)."""
    from generator.select import dispatch_specs

    rows = _json("list", "--heads", "16", "40", "128", "--ckv", "512", "--rope", "64", "--arch", arch,
                 "--s-q", "1", "2", "--json")
    want = [spec for h in (16, 40, 128) for s_q in (1, 2) for spec in
            dispatch_specs(arch=Arch.parse(arch), num_heads=h, ckv_dim=512, rope_dim=64, dtype=DType.BF16, s_q=s_q)]
    assert [r["variant_id"] for r in rows] == list(dict.fromkeys(s.variant_id for s in want))
    families = [r["family"] for r in rows]
    if arch == "sm_90a":  # 16 and 32 rows: narrow; 40 rows on: seesaw and wgmma (one id per head count, s_q 1, 2)
        assert families == ["narrow", "narrow", "seesaw", "wgmma", "seesaw", "wgmma"], families
    else:
        assert set(families) == {"mma"}, families


def test_explicit_dims_with_an_fp8_cache_take_the_family_dispatch_picks() -> None:
    from generator.select import dispatch_specs

    rows = _json("list", "--heads", "16", "40", "--ckv", "256", "--rope", "32", "--kv-dtype", "fp8_e4m3", "--s-q", "1",
                 "2", "--json")
    want = [spec.variant_id for h in (16, 40) for s_q in (1, 2) for spec in
            dispatch_specs(arch=Arch.SM90A, num_heads=h, ckv_dim=256, rope_dim=32, dtype=DType.BF16, s_q=s_q,
                           kv_dtype=DType.FP8_E4M3)]
    assert [r["variant_id"] for r in rows] == list(dict.fromkeys(want))       # 40 heads: one variant for both
    # 16 and 32 rows fit narrow, 40 not: seesaw, and wgmma for page sizes of small TMA boxes
    assert [r["family"] for r in rows] == ["narrow", "narrow", "seesaw", "wgmma"]


@pytest.mark.parametrize("kv, granularity", [("fp8_e4m3", "one fp32 scale per tensor"),
                                             ("fp8_ds_mla", "one fp32 scale per 128 values"),
                                             (None, "q's dtype, unscaled")])
def test_explain_prints_the_kv_dtype_and_its_scales(kv: str | None, granularity: str) -> None:
    args = ["explain", "--heads", "16", "--ckv", "512", "--rope", "64", *(["--kv-dtype", kv] if kv else [])]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1] == f"kv       {kv or 'bf16'}, {granularity}"
    doc = _json(*args, "--json")
    assert doc["spec"]["kv_dtype"] == DType.parse(kv or "bf16").value     # the id's spelling, as list --json
    assert doc["scale_granularity"] == DType.parse(kv or "bf16").scale_granularity


@pytest.mark.parametrize("args, names", [
    (["list", "--preset", "deepseek-v3", "--kv-dtype", "fp8_ds_mla", "--family", "seesaw"],
     ["--kv-dtype", "seesaw reads fp8_e4m3 caches only"]),
    (["list", "--heads", "16", "--ckv", "512", "--rope", "64", "--kv-dtype", "fp8_e4m3", "--family", "simt"],
     ["--kv-dtype", "narrow", "family simt"]),
    (["list", "--preset", "deepseek-v3", "--kv-dtype", "fp8_e4m3", "--arch", "sm_75"], ["--kv-dtype", "sm_75"]),
    (["build", "--heads", "16", "--ckv", "512", "--rope", "64", "--kv-dtype", "fp8_ds_mla", "--arch", "sm_75"],
     ["--kv-dtype", "sm_75"]),
    (["list", "--preset", "minicpm3-4b", "--kv-dtype", "fp8_ds_mla"],
     ["--kv-dtype", "minicpm3-4b", "ckv 256 / rope 32", "ckv 512 / rope 64 only"]),
    (["emit", "--heads", "16", "--ckv", "256", "--rope", "32", "--kv-dtype", "fp8_ds_mla"],
     ["--kv-dtype", "ckv 512 and rope 64"]),
    (["list", "--heads", "16", "--ckv", "512", "--rope", "64", "--dtype", "fp16", "--kv-dtype", "fp8_ds_mla"],
     ["--dtype", "fp8_ds_mla", "bf16 queries"]),
    (["list", "--heads", "16", "--ckv", "512", "--rope", "64", "--kv-dtype", "fp16"], ["--kv-dtype", "fp16"]),
    (["list", "--preset", "deepseek-v3", "--kv-dtype", "int4"], ["--kv-dtype", "int4"]),
    (["list", "--preset", "deepseek-v3", "--dtype", "fp8_e4m3"], ["--dtype", "fp8 is a cache format"]),
    (["explain", "--heads", "16", "--ckv", "512", "--rope", "64", "--kv-dtype", "fp8_e4m3", "--family", "simt"],
     ["--kv-dtype", "family simt"]),
    (["explain", "--heads", "16", "--ckv", "512", "--rope", "64", "--kv-dtype", "fp8_e4m3", "--arch", "sm_75"],
     ["--kv-dtype", "sm_75"]),
    (["explain", "--heads", "16", "--ckv", "512", "--rope", "64", "--kv-dtype", "fp8_ds_mla", "--dtype", "fp16"],
     ["--dtype", "fp8_ds_mla"]),
])
def test_impossible_fp8_combinations_exit_2_naming_the_argument(args: list[str], names: list[str]) -> None:
    test_bad_input_exits_2_with_one_line(args, names)
    assert "Traceback" not in run_cli(*args).stderr


@pytest.mark.needs_nvcc
def test_build_fp8_variants_and_list_them_in_the_cache(cache_root: Path) -> None:
    """Both formats build with the real nvcc, without spills; cache ls shows the cache dtype."""
    rows = _json("build", "--heads", "16", "--ckv", "512", "--rope", "64", "--kv-dtype", "fp8_e4m3", "--json")
    rows += _json("build", "--preset", "deepseek-v3", "--tp", "8", "--kv-dtype", "fp8_ds_mla", "--json")
    assert [r["ok"] for r in rows] == [True, True], rows
    for r in rows:
        info = _json("cache", "info", r["variant_id"], "--json")
        assert all(k["spill_stores"] == 0 and k["spill_loads"] == 0 for k in info["meta"]["ptxas"]), info["meta"]
    kv = {r["entry"]: r["kv_dtype"] for r in _json("cache", "ls", "--json")["entries"]}
    assert sorted(kv.values(), key=str) == [None, "fp8_ds_mla", "fp8_e4m3"]          # a launcher, two variants
    lines = run_cli("cache", "ls").stdout.splitlines()
    assert {line.split()[1] for line in lines[1:]} == {"fp8_e4m3", "fp8_ds_mla", "-"}


@pytest.mark.parametrize("sub", [[], ["list"], ["emit"], ["build"], ["explain"], ["cache"], ["cache", "ls"],
                                 ["cache", "info"], ["cache", "verify"], ["cache", "prune"], ["cache", "clear"]])
def test_help(sub: list[str]) -> None:
    proc = run_cli(*sub, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m generator")
    assert len(proc.stdout.splitlines()) > 3


def test_version() -> None:
    from generator import __version__

    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"mla-gen {__version__}"


def test_heads_range_agrees_in_spec_cli_and_readme() -> None:
    from conftest import REPO
    from generator.spec import MAX_HEADS

    assert f"1..{MAX_HEADS} heads" in (REPO / "README.md").read_text()
    assert _json("list", "--heads", str(MAX_HEADS), "--ckv", "512", "--rope", "64", "--json")[0]["num_heads"] == MAX_HEADS
    assert run_cli("list", "--heads", str(MAX_HEADS + 1), "--ckv", "512", "--rope", "64").returncode == 2


@pytest.mark.parametrize("where", ["file", "under-a-file", "read-only", "proc"])
def test_emit_out_that_cannot_be_written_is_one_line_exit_2(tmp_path: Path, where: str) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    if where == "read-only":
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        out = locked / "build"
        if os.access(locked, os.W_OK):  # root writes anywhere
            pytest.skip("running as root: a read-only folder is still writable")
    elif where == "proc":
        out = Path("/proc/mla_gen_emit_test")  # no one may make a folder here, root neither
        if not Path("/proc/self").exists():
            pytest.skip("no /proc here")
    else:
        out = blocker if where == "file" else blocker / "build"
    proc = run_cli("emit", "--heads", "16", "--ckv", "256", "--rope", "32", "--out", str(out))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m generator: error: argument --out: "), proc.stderr
    assert "Traceback" not in proc.stderr and blocker.read_text() == "not a folder"


def test_readme_generator_lines_are_commands() -> None:
    """Each `python -m generator` line of README is one command that parses, not alternatives joined by |."""
    import shlex

    from conftest import REPO
    from generator.cli import make_parser

    lines = [ln.split("#")[0].strip() for ln in (REPO / "README.md").read_text().splitlines()
             if ln.startswith("python -m generator ")]
    assert len(lines) >= 6
    for line in lines:
        assert "|" not in line, line
        argv = shlex.split(line.replace("[--json]", "--json"))[3:]
        make_parser().parse_args(argv)  # UsageError on anything that is not a command


CONSOLE = ("import sys; sys.argv[0] = '/somewhere/bin/mla-gen'; "
           "from generator.cli import console_main; sys.exit(console_main())")


def test_console_script_names_itself() -> None:
    import tomllib

    from conftest import REPO

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"mla-gen": "generator.cli:console_main"}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    usage = subprocess.run([sys.executable, "-c", CONSOLE, "list", "--help"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: mla-gen list"), usage.stdout
    bad = subprocess.run([sys.executable, "-c", CONSOLE, "list", "--heads", "0", "--ckv", "256", "--rope", "32"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("mla-gen: error: argument --heads"), bad.stderr


# -- cache subcommands on hand-made entries (real builds are in test_build_cache.py) --------------------

def test_cache_commands_on_an_empty_cache(cache_root: Path) -> None:
    assert _json("cache", "ls", "--json") == {"root": str(cache_root), "entries": []}
    assert _json("cache", "verify", "--json")["corrupt"] == 0
    assert _json("cache", "prune", "--json") == {"removed": [], "dry_run": False, "failed": []}
    assert _json("cache", "clear", "--json")["removed_entries"] == 0


def test_cache_ls_info_verify(cache_root: Path) -> None:
    bad_import = fake_entry(cache_root, "aaaaaaaaaaaa")
    no_meta = fake_entry(cache_root, "bbbbbbbbbbbb", meta=False)
    (cache_root / "sm90a" / f".tmp-{ID}-cccccccccccc-1-x").mkdir()  # a builder's temp dir is no entry
    listing = _json("cache", "ls", "--json")
    rows = {r["entry"]: r for r in listing["entries"]}
    assert set(rows) == {bad_import.name, no_meta.name}
    assert rows[bad_import.name]["ok"] and rows[bad_import.name]["build_seconds"] == 1.5
    assert not rows[no_meta.name]["ok"] and "meta.json is missing" in rows[no_meta.name]["problems"][0]
    assert rows[bad_import.name]["kv_dtype"] == rows[no_meta.name]["kv_dtype"] == "bf16"   # read from the name
    assert run_cli("cache", "ls").stdout.splitlines()[1].split()[:3] == ["sm90a", "bf16", bad_import.name]

    info = _json("cache", "info", bad_import.name, "--json")
    assert info["ok"] and info["meta"]["variant_id"] == ID and info["path"] == str(bad_import)

    proc = run_cli("cache", "verify", "--json")
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["corrupt"] == 2
    problems = {Path(r["entry"]).name: r["problems"] for r in doc["entries"]}
    assert problems[bad_import.name][0].startswith("does not load")
    assert "meta.json is missing" in problems[no_meta.name][0]
    assert "0/2 entries ok" in proc.stderr

    text = run_cli("cache", "verify", bad_import.name)  # one entry by name, text output
    assert text.returncode == 1 and text.stdout.startswith(f"CORRUPT {bad_import}") and "0/1 entries ok" in text.stderr


def test_cache_prune_and_clear(cache_root: Path) -> None:
    old = fake_entry(cache_root, "dddddddddddd", age_days=40)
    fresh = fake_entry(cache_root, "eeeeeeeeeeee")
    dry = _json("cache", "prune", "--dry-run", "--json")
    assert dry == {"removed": [str(old)], "dry_run": True, "failed": []} and old.exists()
    assert _json("cache", "prune", "--json")["removed"] == [str(old)]
    assert not old.exists() and fresh.exists()
    cleared = _json("cache", "clear", "--json")
    assert cleared == {"root": str(cache_root), "removed_entries": 1, "failed": []}
    assert not fresh.exists()


def test_cache_info_unknown_entry_is_a_usage_error(cache_root: Path) -> None:
    proc = run_cli("cache", "info", "mla_decode_nothing_here")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "mla_decode_nothing_here" in proc.stderr
