"""`python -m mla_gen.bench` on the CPU: the byte and FLOP formulas worked by hand, the roofline numbers
of a record, the CLI's usage errors, the JSON document, the table and plot from a document, the torch
baseline against the float64 reference, and the rules that mark peers n/a or absent. The GPU path
(timing, ceilings, kernels, peers) runs only on a device: `python -m mla_gen.bench --peers`."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from mla_gen.bench.args import parse_options
from mla_gen.bench.cases import Case, default_suite, subsample, work
from mla_gen.bench.impls import Peers, Reference, compare, peer_support, prepare_torch
from mla_gen.bench.report import (Check, Record, Timing, balance_lines, format_table, json_document, make_record,
                                  page_lines, read_document, target_lines)
from mla_gen.bench.roofline import Ceilings
from mla_gen.bench.runner import main
from mla_gen.cost import visible_pairs
from mla_gen.dtypes import torch_dtype
from mla_gen.testing import REF_TOL, make_inputs

CEILINGS = Ceilings(copy_gbps=3000.0, matmul_tflops=800.0, copy_bytes=2 * 2**31, matmul_n=8192)


# -- arithmetic ------------------------------------------------------------------------------------

def test_work_of_case_3_by_hand() -> None:
    """B64 S8192 H128 s_q 2, ckv/rope 512/64, bf16 (2 bytes)."""
    w = work(Case("3", 64, 128, s_q=2, seqlen=8192))
    assert w.cache_bytes == 64 * 8192 * (512 + 64) * 2 == 603_979_776      # each token's ckv + kpe once
    assert w.q_bytes == 64 * 2 * 128 * (512 + 64) * 2 == 18_874_368        # B x s_q x H x (C + R)
    assert w.out_bytes == 64 * 2 * 128 * 512 * 2 == 16_777_216             # B x s_q x H x C
    assert w.bytes == 639_631_360
    # causal: query 0 sees 8191 tokens, query 1 sees 8192, so 16383 pairs per request and head
    assert 64 * visible_pairs(2, 8192 - 2) == 64 * 16383 == 1_048_512
    assert w.flops == 2 * 128 * (512 + 64 + 512) * 1_048_512 == 292_039_950_336   # QK over C+R, PV over C
    assert w.intensity == pytest.approx(292_039_950_336 / 639_631_360)


@pytest.mark.parametrize("batch, heads, ckv, rope, s_q, seqlen", [(128, 16, 512, 64, 1, 4096),
                                                                    (64, 128, 512, 64, 2, 8192),
                                                                    (3, 40, 256, 32, 4, 77)])
def test_work_agrees_with_the_cost_model(batch: int, heads: int, ckv: int, rope: int, s_q: int, seqlen: int) -> None:
    """mla_gen.cost prices the same kernel ('latent attention'), with cache_len = tokens before the step."""
    from mla_gen.cost import AttnDims, absorbed_cost

    part = next(p for p in absorbed_cost(AttnDims(heads, ckv, rope, 128, 128), batch, s_q, seqlen - s_q).parts
                if p.name == "latent attention")
    w = work(Case("x", batch, heads, ckv, rope, s_q=s_q, seqlen=seqlen))
    assert (w.flops, w.bytes) == (part.flops, part.bytes)


def test_visible_pairs_ragged_by_hand() -> None:
    # s_q 3: a request of 5 tokens (2 cached before the step) sees 3, 4, 5 tokens; one of 3 sees 1, 2, 3
    assert visible_pairs(3, 5 - 3) + visible_pairs(3, 3 - 3) == (3 + 4 + 5) + (1 + 2 + 3) == 18


def test_work_minicpm3_dims_by_hand() -> None:
    w = work(Case("m", 2, 40, ckv=256, rope=32, seqlen=100))
    assert w.cache_bytes == 200 * (256 + 32) * 2
    assert w.flops == 2 * 40 * (256 + 32 + 256) * 200


def test_record_roofline_numbers_by_hand() -> None:
    """Case 1 (B128 S4096 H16) timed at 250 us median under a 3000 GB/s, 800 TFLOP/s device."""
    case = Case("1", 128, 16, seqlen=4096)
    w = work(case)
    assert w.bytes == 128 * 4096 * 1152 + 128 * 16 * 576 * 2 + 128 * 16 * 512 * 2 == 608_436_224
    assert w.flops == 2 * 16 * 1088 * 128 * 4096 == 18_253_611_008
    samples = tuple([240.0] * 10 + [250.0] + [260.0] * 10)
    r = make_record(case, w, "mla-gen:simt", CEILINGS, "ok", timing=Timing(samples, host_us=12.0))
    assert r.time_us == 250.0 and r.min_us == 240.0 and r.max_us == 260.0 and r.iters == 21
    assert r.gbps == pytest.approx(608_436_224 / 250e-6 / 1e9)              # 2433.7 GB/s
    assert r.tflops == pytest.approx(18_253_611_008 / 250e-6 / 1e12)         # 73.0 TFLOP/s
    assert r.bw_frac == pytest.approx(r.gbps / 3000) and r.compute_frac == pytest.approx(r.tflops / 800)
    # floor = max(608436224 B / 3000 GB/s = 202.8 us, 18.25 GFLOP / 800 TFLOP/s = 22.8 us): memory-bound
    assert r.floor_us == pytest.approx(608_436_224 / 3000e9 * 1e6) and r.bound == "memory"
    assert r.time_over_floor == pytest.approx(250 / r.floor_us)


def test_compute_bound_floor() -> None:
    r = make_record(Case("3", 64, 128, s_q=2, seqlen=8192), work(Case("3", 64, 128, s_q=2, seqlen=8192)), "x",
                    CEILINGS, "n/a", note="n/a")
    assert r.bound == "compute" and r.floor_us == pytest.approx(292_039_950_336 / 800e12 * 1e6)
    assert r.time_us is None and r.gbps is None


def test_default_suite() -> None:
    suite = {c.name: c for c in default_suite()}
    assert [(c.batch, c.heads, c.s_q, c.seqlen) for c in map(suite.get, "12345")] == [
        (128, 16, 1, 4096), (128, 128, 1, 4096), (64, 128, 2, 8192), (32, 16, 1, 1024), (1, 128, 1, 32768)]
    ragged, twin = suite["6"], suite["6eq"]
    assert ragged.seqlens_random == (1, 8192) and ragged.lengths() == default_suite()[5].lengths()  # fixed seed
    assert twin.twin_of == "6" and twin.batch == ragged.batch
    assert abs(sum(twin.lengths()) - sum(ragged.lengths())) <= twin.batch // 2
    m = suite["minicpm3"]
    assert (m.heads, m.ckv, m.rope, m.model) == (40, 256, 32, "minicpm3-4b") and m.sm_scale != 192 ** -0.5
    assert all(c.page_size == 64 and c.dtype == "bf16" for c in suite.values() if c.page_of is None)
    pages = {c.name: (c.page_of, c.page_size, c.batch, c.heads, c.seqlen) for c in suite.values() if c.page_of}
    assert pages == {"1p16": ("1", 16, 128, 16, 4096), "1p1": ("1", 1, 128, 16, 4096),
                     "2p16": ("2", 16, 128, 128, 4096), "2p1": ("2", 1, 128, 128, 4096)}


def test_subsample_keeps_extremes() -> None:
    lengths = [50, 3, 900, 7, 7, 60]
    rows = subsample(lengths, 4, seed=0)
    assert len(rows) == 4 and 1 in rows and 2 in rows and rows == sorted(rows)
    assert subsample([5], 4, 0) == [0]


# -- CLI -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, flag", [
    (["--seqlens-random", "5"], "--seqlens-random"),
    (["--heads", "16", "--ckv", "512", "--rope", "64", "--seqlens-random", "9,3"], "--seqlens-random"),
    (["--seqlens-random", "a,b"], "--seqlens-random"),
    (["--preset", "no-such-model"], "--preset"),
    (["--heads", "16"], "--heads"),
    (["--heads", "16", "--rope", "64"], "--heads"),
    (["--families", "simt,warp9"], "--families"),
    (["--families", ","], "--families"),
    (["--batch", "8"], "--batch"),
    (["--preset", "deepseek-v3", "--heads", "16"], "--preset"),
    (["--preset", "deepseek-v3", "--s-q", "4", "--seqlen", "2"], "--seqlen"),
    (["--seqlen", "5", "--seqlens-random", "1,9"], "--seqlens-random"),
    (["--iters", "5"], "--iters"),
    (["--case-timeout", "0"], "--case-timeout"),
    (["--cases", "1,99"], "--cases"),
    (["--cases", "1", "--preset", "kimi-k2"], "--cases"),
    (["--dtype", "fp8"], "--dtype"),
    (["--json", "/no/such/folder/r.json"], "--json"),
    (["--from-json", "/no/such/file.json"], "--from-json"),
])
def test_usage_errors_exit_2_with_one_line(argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("python -m mla_gen.bench: error: argument ") and flag in err, err


def test_heads_without_ckv_names_both(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--heads", "16"]) == 2
    err = capsys.readouterr().err
    assert "--heads" in err and "--ckv" in err and "--rope" in err


def test_help() -> None:
    proc = subprocess.run([sys.executable, "-m", "mla_gen.bench", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m mla_gen.bench")
    for flag in ("--preset", "--seqlens-random", "--families", "--peers-dir", "--json", "--plot", "--iters"):
        assert flag in proc.stdout


def test_options_single_case_and_suite() -> None:
    opts = parse_options(["--preset", "minicpm3-4b", "--batch", "8", "--seqlens-random", "2,300", "--s-q", "2",
                          "--page-size", "16", "--families", "simt", "--peers"])
    (case,) = opts.cases
    assert (case.batch, case.heads, case.ckv, case.rope, case.s_q, case.page_size) == (8, 40, 256, 32, 2, 16)
    assert case.seqlens_random == (2, 300) and [f.value for f in opts.families] == ["simt"]
    assert opts.peers_dir == REPO / ".peers"
    suite = parse_options(["--cases", "6,6eq", "--dtype", "fp16", "--peers-dir", "/x"])
    assert [c.name for c in suite.cases] == ["6", "6eq"] and all(c.dtype == "fp16" for c in suite.cases)
    assert suite.peers_dir == Path("/x") and suite.families is None
    assert len(parse_options([]).cases) == len(default_suite())
    # --page-size moves the suite's cases, not the small-page repeats (they are judged against page 64)
    pages = {c.name: c.page_size for c in parse_options(["--page-size", "32", "--cases", "1,1p16,2p1"]).cases}
    assert pages == {"1": 32, "1p16": 16, "2p1": 1}
    assert parse_options([]).case_timeout_s == 300 and parse_options(["--case-timeout", "20"]).case_timeout_s == 20


@pytest.mark.parametrize("hangs", [True, False])
def test_hang_watchdog_stops_a_case_that_never_finishes(hangs: bool) -> None:
    """The bench's per-case watchdog (a kernel waiting forever on an mbarrier took a whole device call): past its
    limit the process prints the stack and exits 1; a case that finishes in time disarms it."""
    body = "time.sleep(30)" if hangs else "pass"
    code = ("import time\nfrom mla_gen.bench.runner import hang_watchdog\n"
            f"with hang_watchdog(1):\n    {body}\ntime.sleep(2)\nprint('finished')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    if hangs:
        assert proc.returncode == 1 and "Timeout" in proc.stderr and "line 4" in proc.stderr, proc.stderr
        assert "finished" not in proc.stdout
    else:
        assert proc.returncode == 0 and proc.stdout.strip() == "finished", proc.stderr


def test_hang_watchdog_where_stderr_is_no_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a notebook sys.stderr has no file descriptor: the watchdog falls back to the process's own, or to none."""
    import io

    from mla_gen.bench.runner import hang_watchdog

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with hang_watchdog(60):
        pass
    monkeypatch.setattr(sys, "__stderr__", None)
    with hang_watchdog(60):
        pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the suite where there is a GPU")
def test_no_gpu_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--cases", "4"]) == 1
    assert "no CUDA device" in capsys.readouterr().err


# -- records, JSON, table, plot ---------------------------------------------------------------------

def _records() -> tuple[list[Case], list[Record]]:
    """One record of each status, built from plain numbers (no GPU)."""
    ragged = Case("6", 4, 16, seqlen=None, seqlens_random=(1, 500), seed=3)
    twin = Case("6eq", 4, 16, seqlen=round(sum(ragged.lengths()) / 4), twin_of="6")
    timing = Timing(tuple(float(x) for x in range(100, 130)), host_us=20.0)
    check = Check("reference[4 req]", 1e-3, 2e-3, 0, 0.5, REF_TOL["bf16"])
    wrong = Check("mla-gen:simt", float("nan"), float("nan"), 7, 0.5, (2e-2, 4e-2))
    records = [
        make_record(ragged, work(ragged), "mla-gen:simt", CEILINGS, "ok", timing=timing, check=check, note="id"),
        make_record(ragged, work(ragged), "torch", CEILINGS, "WRONG", check=wrong, note=wrong.why_wrong()),
        make_record(ragged, work(ragged), "vllm_triton", CEILINGS, "n/a", note="s_q > 1"),
        make_record(ragged, work(ragged), "flashmla", CEILINGS, "absent", note="ImportError: x"),
        make_record(ragged, work(ragged), "sglang_triton", CEILINGS, "error", note="RuntimeError: boom\nmore"),
        make_record(twin, work(twin), "mla-gen:simt", CEILINGS, "ok",
                    timing=Timing(tuple(float(x) for x in range(90, 120)), host_us=20.0), check=check),
    ]
    return [ragged, twin], records


def test_json_document_schema(tmp_path: Path) -> None:
    cases, records = _records()
    device = {"name": "NVIDIA H100 80GB HBM3", "arch": "sm_90a", "sm_count": 132, "torch": "2.11"}
    doc = json.loads(json.dumps(json_document(device, CEILINGS, {"iters": 30}, cases, records), allow_nan=False))
    assert {"schema", "tool", "device", "ceilings", "settings", "cases", "records"} <= set(doc)
    assert doc["device"]["name"] == "NVIDIA H100 80GB HBM3"
    assert doc["ceilings"]["copy_gbps"] == 3000.0 and doc["ceilings"]["matmul_tflops"] == 800.0
    assert doc["ceilings"]["ridge_flop_per_byte"] == pytest.approx(800e12 / 3000e9)
    fields = {f.name for f in dataclasses.fields(Record)}
    assert all(set(r) == fields for r in doc["records"])
    assert len({(r["case"], r["impl"]) for r in doc["records"]}) == len(doc["records"])
    ok = doc["records"][0]
    assert ok["status"] == "ok" and ok["time_us"] == 114.5 and ok["iters"] == 30
    assert ok["p10_us"] < ok["time_us"] < ok["p90_us"] and ok["check_against"] == "reference[4 req]"
    for key in ("gbps", "tflops", "bw_frac", "compute_frac", "floor_us", "time_over_floor", "bytes", "flops"):
        assert isinstance(ok[key], (int, float)) and ok[key] > 0
    assert {r["status"] for r in doc["records"]} == {"ok", "WRONG", "n/a", "absent", "error"}
    assert all(r["time_us"] is None for r in doc["records"] if r["status"] != "ok")
    assert doc["cases"][0]["total_tokens"] == sum(cases[0].lengths())
    wrong = doc["records"][1]
    assert wrong["status"] == "WRONG" and wrong["max_abs_diff"] is None and "7 NaN" in wrong["note"]
    device2, ceilings, back = read_document(doc)
    assert device2 == device and ceilings == CEILINGS and back == records


def test_make_record_rejects_inconsistent_status() -> None:
    case = Case("x", 1, 16)
    with pytest.raises(ValueError, match="timing"):
        make_record(case, work(case), "torch", CEILINGS, "ok")
    with pytest.raises(ValueError, match="status"):
        make_record(case, work(case), "torch", CEILINGS, "slow")


def test_table_and_balance() -> None:
    _, records = _records()
    table = format_table(records)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["case", "shape", "impl"]
    assert len(lines) == 1 + 5 + 1                      # header, rows but the absent one, the absent line
    assert "absent: flashmla: ImportError: x" in lines[-1]
    assert "WRONG" in table and "mla-gen:simt NaN" in table and "n/a" in table and "RuntimeError: boom" in table and "more" not in table
    assert balance_lines(records) == [   # 114.5 / 104.5
        "balance mla-gen:simt: time(6) / time(6eq) = 1.096 (target <= 1.05: MISSED)"]


def _timed(case: Case, impl: str, us: float, kv_dtype: str | None = None) -> Record:
    return make_record(case, work(case), impl, CEILINGS, "ok", timing=Timing((us, us), host_us=5.0), kv_dtype=kv_dtype)


def test_targets_judge_dispatchs_family_against_flashmla_and_every_peer() -> None:
    c2, c5, mini = Case("2", 128, 128, seqlen=4096), Case("5", 1, 128, seqlen=32768), Case("minicpm3", 128, 40,
                                                                                         ckv=256, rope=32, seqlen=4096)
    records = [
        _timed(c2, "mla-gen:wgmma", 349.0), _timed(c2, "mla-gen:seesaw", 340.6),
        _timed(c2, "mla-gen:wgmma+plan", 354.0),
        _timed(c2, "mla-gen:wgmma[fp8_e4m3]", 100.0, kv_dtype="fp8_e4m3"),  # fp8 rows are issue 13's, not these
        _timed(c2, "torch", 2000.0), _timed(c2, "flashmla", 233.6), _timed(c2, "flashinfer_fa3", 261.3),
        _timed(c5, "mla-gen:wgmma", 41.2), _timed(c5, "mla-gen:wgmma+plan", 45.0), _timed(c5, "flashmla", 50.8),
        _timed(c5, "flashinfer_fa3", 44.1),
        make_record(c5, work(c5), "vllm_triton", CEILINGS, "n/a", note="x"),
        _timed(mini, "mla-gen:narrow", 131.2), _timed(mini, "mla-gen:narrow+plan", 135.0),
    ]
    lines = target_lines(records)
    assert lines[0] == ("targets 2: mla-gen:wgmma 349.0 us (fastest family mla-gen:seesaw 340.6 us); "
                        "flashmla 233.6 us, flashmla / mla-gen = 0.669 (target >= 1.05: MISSED); "
                        "not faster than flashmla 233.6 us, flashinfer_fa3 261.3 us")
    assert lines[1] == ("targets 5: mla-gen:wgmma 41.2 us; flashmla 50.8 us, flashmla / mla-gen = 1.233 "
                        "(target >= 1.50: MISSED); faster than every peer")
    frac = records[-2].bw_frac
    assert lines[2] == (f"targets minicpm3: mla-gen:narrow 131.2 us; {frac:.2f} of copy (target >= 0.80: "
                        f"{'met' if frac >= 0.8 else 'MISSED'})")
    assert lines[3].startswith(f"targets: {int(frac >= 0.8)} of 3 bounds met; missed: 2 0.669 < 1.05, 5 1.233 < 1.50")
    assert lines[3].endswith("; faster than every peer on 1 of 2 cases with peers")
    assert len(lines) == 4
    assert target_lines([r for r in records if not r.impl.startswith("mla-gen:")]) == []


def test_pages_judge_dispatchs_family_against_the_same_case_at_page_64() -> None:
    c1, c2 = Case("1", 128, 16, seqlen=4096), Case("2", 128, 128, seqlen=4096)
    c1p16, c2p1 = (Case("1p16", 128, 16, seqlen=4096, page_size=16, page_of="1"),
                   Case("2p1", 128, 128, seqlen=4096, page_size=1, page_of="2"))
    records = [
        _timed(c1, "mla-gen:narrow", 150.0), _timed(c1, "mla-gen:narrow+plan", 152.0),
        _timed(c1p16, "mla-gen:narrow", 156.0), _timed(c1p16, "mla-gen:seesaw", 140.0),
        _timed(c1p16, "mla-gen:narrow+plan", 158.0), _timed(c1p16, "flashinfer_fa3", 160.0),
        _timed(c2, "mla-gen:seesaw", 245.0), _timed(c2, "mla-gen:seesaw+plan", 247.0),
        _timed(c2p1, "mla-gen:seesaw", 1300.0), _timed(c2p1, "mla-gen:narrow", 476.0),  # dispatch's wgmma not timed
    ]
    assert [r.page_of for r in records[2:6]] == ["1"] * 4
    assert page_lines(records) == [
        "pages 1p16 (B128 S4096 H16 p16): mla-gen:narrow 156.0 us / 1 mla-gen:narrow 150.0 us = 1.040 "
        "(target <= 1.05: met)",
        "pages 2p1 (B128 S4096 H128 p1): mla-gen:narrow 476.0 us / 2 mla-gen:seesaw 245.0 us = 1.943 "
        "(no verdict: dispatch's family not timed on both)"]
    assert page_lines([r for r in records if r.case != "1"]) == page_lines(records)[1:]  # no base: no line
    assert [line.split(":")[0] for line in target_lines(records)[:4]] == ["targets 1", "targets 1p16", "targets 2",
                                                                           "targets 2p1"]


def test_from_json_prints_table_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases, records = _records()
    path = tmp_path / "r.json"
    path.write_text(json.dumps(json_document({"name": "GPU", "date": "today"}, CEILINGS, {}, cases, records)))
    assert main(["--from-json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ceilings: copy 3000 GB/s" in out and "mla-gen:simt" in out and "balance" in out
    assert "L2 flushed before each timed call by a write\n" in out  # a document without the setting: before reads
    path.write_text(json.dumps(json_document({"name": "GPU"}, CEILINGS, {"flush": "read", "flush_bytes": 256 << 20},
                                             cases, records)))
    assert main(["--from-json", str(path)]) == 0
    assert "L2 flushed before each timed call by a read of 256 MB\n" in capsys.readouterr().out
    pytest.importorskip("matplotlib")
    png = tmp_path / "roofline.png"
    assert main(["--from-json", str(path), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_from_json_rejects_other_documents(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "x.json"
    path.write_text("{}")
    assert main(["--from-json", str(path)]) == 2
    assert "--from-json" in capsys.readouterr().err


# -- implementations on the CPU -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_torch_baseline_matches_reference(dtype: str) -> None:
    """Ragged lengths, s_q 2 (causal), page 16 with NaN in every slot no request may read."""
    case = Case("t", 4, 8, ckv=64, rope=16, s_q=2, seqlen=None, seqlens_random=(2, 90), page_size=16, dtype=dtype,
                seed=5)
    inp = make_inputs(case.lengths(), heads=8, ckv=64, rope=16, s_q=2, page_size=16, combined=True,
                      dtype=torch_dtype(dtype),
                      generator=torch.Generator().manual_seed(5))
    out = prepare_torch(inp, case).run()
    assert out.shape == (4, 2, 8, 64) and out.dtype == inp.q.dtype
    check = Reference.compute(inp, list(range(4))).check(out, REF_TOL[dtype])
    assert check.ok, check.why_wrong()


def test_checks_catch_nan_and_mismatch() -> None:
    ref = torch.randn(2, 1, 4, 8, dtype=torch.float64)
    good = ref.to(torch.bfloat16)
    assert compare(good, ref, "ref", REF_TOL["bf16"]).ok
    bad = good.clone()
    bad[0, 0, 0, 0] += 1.0
    assert not compare(bad, ref, "ref", REF_TOL["bf16"]).ok
    bad[1, 0, 0, 0] = float("nan")
    check = compare(bad, ref, "ref", REF_TOL["bf16"])
    assert not check.ok and check.nan_count == 1 and "NaN" in check.why_wrong()


def test_peer_support_rules() -> None:
    base = Case("x", 2, 16)
    assert all(peer_support(p, base) is None for p in ("flashmla", "vllm_triton", "sglang_triton"))
    assert "page size 64" in peer_support("flashmla", dataclasses.replace(base, page_size=16))
    assert "512/64" in peer_support("flashmla", dataclasses.replace(base, ckv=256, rope=32))
    assert peer_support("flashmla", dataclasses.replace(base, s_q=2)) is None
    assert "causal" in peer_support("vllm_triton", dataclasses.replace(base, s_q=2))
    assert peer_support("sglang_triton", dataclasses.replace(base, ckv=256, rope=32, page_size=16)) is None


def test_peers_absent_never_raise(tmp_path: Path) -> None:
    empty = Peers.load(tmp_path)
    assert empty.names == [] and set(empty.absent) == {"flashmla", "vllm_triton", "sglang_triton"}
    assert "no peers.py" in empty.absent["flashmla"]
    (tmp_path / "peers.py").write_text("raise ImportError('no triton here')\n")
    broken = Peers.load(tmp_path)
    assert broken.names == [] and "no triton here" in broken.absent["vllm_triton"]
    (tmp_path / "peers.py").write_text("def available():\n    return ['vllm_triton'], {'flashmla': 'no .so'}\n")
    some = Peers.load(tmp_path)
    assert some.names == ["vllm_triton"] and some.absent == {"flashmla": "no .so"}


def test_plot_without_matplotlib_is_a_usage_error(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert main(["--plot", "roofline.png"]) == 2
    err = capsys.readouterr().err
    assert "argument --plot: matplotlib is not installed" in err and len(err.strip().splitlines()) == 1


# -- no machine paths in what a run records ------------------------------------------------------

def _strings(doc: object):
    if isinstance(doc, str):
        yield doc
    elif isinstance(doc, dict):
        for k, v in doc.items():
            yield k
            yield from _strings(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from _strings(v)


@pytest.mark.parametrize("path", sorted((REPO / "docs").glob("*.json")), ids=lambda p: p.name)
def test_committed_bench_documents_carry_no_machine_paths(path: Path) -> None:
    absolute = [s for s in _strings(json.loads(path.read_text())) if Path(s).is_absolute()]
    assert not absolute, absolute


def test_settings_record_paths_relative_to_cwd_or_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mla_gen.bench import runner

    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    (here / "peers").mkdir(parents=True)
    elsewhere.mkdir()
    monkeypatch.chdir(here)
    argv = ["--peers-dir", str(here / "peers"), "--json", str(elsewhere / "r.json"), "--iters", "30"]
    monkeypatch.setattr(sys, "argv", ["python -m mla_gen.bench", *argv])
    opts = parse_options(argv)
    ctx = dataclasses.make_dataclass("Ctx", ["families"])([])
    settings = runner._settings(opts, ctx)
    assert settings["peers_dir"] == "peers"
    assert settings["argv"] == ["--peers-dir", "peers", "--json", "r.json", "--iters", "30"]
    assert not any(Path(s).is_absolute() for s in _strings(settings))


def test_bench_docstrings_name_only_files_in_the_repository() -> None:
    """A path in a bench module's docstring (a/b.py, X.md) exists in this checkout."""
    import ast
    import re

    path_like = re.compile(r"(?<![\w/.])((?:[\w.-]+/)+[\w.-]+\.\w+|[\w-]+\.md)\b")
    named = {}
    for module in sorted((REPO / "mla_gen" / "bench").glob("*.py")):
        for text in path_like.findall(ast.get_docstring(ast.parse(module.read_text())) or ""):
            named[text] = module.name
    assert named, "the docstrings name no files at all (the pattern is broken)"
    missing = {text: module for text, module in named.items() if not (REPO / text).exists()}
    assert not missing, missing


def test_timed_calls_whose_host_time_outgrew_the_warm_up_are_timed_again_behind_a_longer_spin() -> None:
    """A callable's spin is sized from its warm-up host time; when the timed calls took longer on the host (torch's
    baseline at B8 S16384 did: 223.5 us against a 215 us spin), the bench times them again behind a spin sized from
    the timed calls, so that no GPU time holds host time."""
    from mla_gen.bench import timing

    timer = timing.Timer.__new__(timing.Timer)
    timer.iters, timer.warmup, timer.spin_us = 30, 3, 100.0
    host_per_try = iter([230.0, 240.0, 250.0])   # the timed calls' host time, growing each try
    spins = []

    def timed(fn, iters, cycles, spin_us):
        spins.append((cycles, spin_us))
        return Timing((1.0, 2.0), next(host_per_try), spin_us)

    timer._warm_host_us = lambda fn: 110.0
    timer._timed = timed
    t = timer.time(lambda: None)
    # warm-up 110 us -> a spin of 300 us (>= 2x): 230 us fits; no second try
    assert spins == [(3 * timing.SPIN_CYCLES, 300.0)] and t.host_us == 230.0 < t.spin_us

    host_per_try = iter([320.0, 330.0, 900.0])
    spins.clear()
    t = timer.time(lambda: None)
    # 320 us >= the 300 us spin: again behind ceil(2 x 320 / 100) = 7 spins; 330 us fits
    assert spins == [(3 * timing.SPIN_CYCLES, 300.0), (7 * timing.SPIN_CYCLES, 700.0)]
    assert (t.host_us, t.spin_us) == (330.0, 700.0)

    host_per_try = iter([400.0, 1000.0, 2000.0, 4000.0])
    spins.clear()
    t = timer.time(lambda: None)
    assert len(spins) == timing.SPIN_RETRIES and t.host_us >= t.spin_us  # gives up: the report's check says so
