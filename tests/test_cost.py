"""mla_gen.cost: a hand count of one case, the crossover's sanity, the CLI table and its errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from generator.presets import model_config
from mla_gen import cost

V3_TP8 = cost.AttnDims.from_config(model_config("deepseek-v3"), tp=8)


def test_hand_count_deepseek_v3_tp8():
    """H=16 heads, C=512, R=64, D=128, V=128; batch B=2, s_q S=2, 10 cached tokens, bf16 (e=2).
    L = 10 + 2 = 12 tokens after the step; visible pairs per head and request
    P = S*L - S*(S-1)/2 = 24 - 1 = 23 (query 0 sees 11 tokens, query 1 sees 12)."""
    assert V3_TP8 == cost.AttnDims(heads=16, kv_lora_rank=512, rope=64, nope=128, v=128)
    assert cost.visible_pairs(2, 10) == 11 + 12 == 23
    a = cost.absorbed_cost(V3_TP8, batch=2, s_q=2, cache_len=10, dtype_bytes=2)
    q_absorb, attention, out_up = a.parts
    # q absorb: 2*B*S*H*D*C = 2*2*2*16*128*512; bytes 2*(B*S*H*D + H*D*C + B*S*H*C)
    assert q_absorb.flops == 8_388_608
    assert q_absorb.bytes == 2 * (4 * 16 * 128 + 16 * 128 * 512 + 4 * 16 * 512) == 2 * 1_089_536
    # latent attention: 2*B*P*H*(C+R) for QK + 2*B*P*H*C for PV = 2*2*23*16*1088
    assert attention.flops == 1_601_536
    # bytes 2*(q_abs and q_pe B*S*H*(C+R) + cache once per request B*L*(C+R) + o_lat B*S*H*C)
    assert attention.bytes == 2 * (4 * 16 * 576 + 24 * 576 + 4 * 16 * 512) == 2 * 83_456
    # out up-proj: 2*B*S*H*C*V; bytes 2*(B*S*H*C + H*C*V + B*S*H*V)
    assert out_up.flops == 8_388_608
    assert out_up.bytes == 2 * (32_768 + 1_048_576 + 8_192) == 2_179_072
    assert a.flops == 18_378_752 and a.bytes == 4_525_056

    v = cost.vanilla_cost(V3_TP8, batch=2, s_q=2, cache_len=10, dtype_bytes=2)
    up, attn = v.parts
    # kv up-proj of all B*L = 24 cached latents: 2*24*512*16*256; bytes 2*(24*512 + 16*256*512 + 24*16*256)
    assert up.flops == 100_663_296
    assert up.bytes == 2 * (12_288 + 2_097_152 + 98_304) == 4_415_488
    # attention: 2*B*P*H*(D+R) + 2*B*P*H*V = 2*2*23*16*320
    assert attn.flops == 471_040
    # bytes 2*(q B*S*H*(D+R) + K B*L*(H*D + R) + V B*L*H*V + out B*S*H*V)
    assert attn.bytes == 2 * (12_288 + 24 * (2048 + 64) + 49_152 + 8_192) == 240_640
    assert v.flops == 101_134_336 and v.bytes == 4_656_128

    # roofline on the H100 defaults: both memory bound here (4.5 MB / 3.02 TB/s = 1.498 us)
    assert a.time() == pytest.approx(4_525_056 / 3.02e12) and a.time() > a.flops / 795e12
    assert v.time() == pytest.approx(4_656_128 / 3.02e12)
    assert cost.choose_form(V3_TP8, 2, 2, 10) == "absorbed"


def test_kv_token_bytes_by_hand():
    assert cost.kv_token_bytes("bf16", 512, 64) == (1024, 128)           # 1152 B per token
    assert cost.kv_token_bytes("fp8_e4m3", 512, 64) == (512, 64)         # 576: one byte per value
    assert cost.kv_token_bytes("fp8_ds_mla", 512, 64) == (512 + 4 * 4, 2 * 64)   # values + 4 fp32 scales, bf16 rope
    assert sum(cost.kv_token_bytes("fp8_ds_mla", 512, 64)) == 656
    assert cost.kv_token_bytes("fp8_e4m3", 256, 32) == (256, 32)
    with pytest.raises(ValueError, match="^kv_dtype: .*656-byte.*ckv 256, rope 32"):
        cost.kv_token_bytes("fp8_ds_mla", 256, 32)
    with pytest.raises(ValueError, match="^kv_dtype: unknown"):
        cost.kv_token_bytes("int4", 512, 64)


@pytest.mark.parametrize("kv, kc, kr", [("fp8_e4m3", 512, 64), ("fp8_ds_mla", 528, 128)])
def test_hand_count_with_an_fp8_cache(kv, kc, kr):
    """The case of test_hand_count_deepseek_v3_tp8 (B=2, S=2, L=12: 24 cached tokens, bf16 elsewhere) with
    an fp8 cache: only the cache's bytes change, kc + kr per token instead of 2 * 576; FLOPs do not."""
    bf16 = cost.form_costs(V3_TP8, batch=2, s_q=2, cache_len=10)
    fp8 = cost.form_costs(V3_TP8, batch=2, s_q=2, cache_len=10, kv_dtype=kv)
    _, attention, _ = fp8["absorbed"].parts
    # q_abs and q_pe, o_lat in bf16 + the cache once per request
    assert attention.bytes == 2 * (4 * 16 * 576 + 4 * 16 * 512) + 24 * (kc + kr)      # 153_088 or 155_008
    up, attn = fp8["vanilla"].parts
    assert up.bytes == 2 * (16 * 256 * 512 + 24 * 16 * 256) + 24 * kc                 # the latent read in fp8
    assert attn.bytes == 2 * (12_288 + 24 * 2048 + 49_152 + 8_192) + 24 * kr          # the rope key from the cache
    for form in cost.FORMS:
        assert fp8[form].flops == bf16[form].flops
        assert bf16[form].bytes - fp8[form].bytes == 24 * (1152 - kc - kr)
    # ds_mla keeps the rope in bf16: vanilla's attention reads what it reads from a bf16 cache
    assert (attn.bytes == bf16["vanilla"].parts[1].bytes) == (kv == "fp8_ds_mla")


def test_visible_pairs_brute_force():
    for s_q in (1, 2, 7):
        for cached in (0, 1, 33):
            assert cost.visible_pairs(s_q, cached) == sum(cached + i + 1 for i in range(s_q))


def test_crossover_is_a_sign_change():
    cross = cost.crossover(V3_TP8, 1, 4096)
    assert cross is not None and 32 <= cross <= 1024  # decode absorbed, prefill vanilla
    for s in [1, 2, 4, 16, 64, cross - 1]:
        assert cost.choose_form(V3_TP8, 1, s, 4096) == "absorbed", s
    for s in [cross, cross + 1, 2 * cross, 4096, 65536]:
        assert cost.choose_form(V3_TP8, 1, s, 4096) == "vanilla", s


def test_crossover_moves_the_right_way():
    rates = [100e12, 200e12, 400e12, 795e12, 1600e12, 3200e12]
    crossings = [cost.crossover(V3_TP8, 8, 4096, rate=r) for r in rates]
    # absorbed spends more FLOPs per (query, key) pair: faster matmuls favour it for longer
    assert crossings == sorted(crossings) and crossings[0] < crossings[-1]
    bandwidths = [1e12, 2e12, 3.02e12, 4.8e12, 8e12]
    crossings = [cost.crossover(V3_TP8, 8, 4096, bandwidth=b) for b in bandwidths]
    # vanilla moves more bytes (K and V of every cached token): more bandwidth favours it
    assert crossings == sorted(crossings, reverse=True) and crossings[0] > crossings[-1]
    assert cost.crossover(V3_TP8, 1, 4096, max_s_q=8) is None


def test_cost_rejects_bad_input():
    with pytest.raises(ValueError, match="^s_q:"):
        cost.absorbed_cost(V3_TP8, 1, 0, 10)
    with pytest.raises(ValueError, match="^cache_len:"):
        cost.vanilla_cost(V3_TP8, 1, 1, -1)
    with pytest.raises(ValueError, match="^tp:"):
        cost.AttnDims.from_config(model_config("deepseek-v3"), tp=3)


def run_cost(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "mla_gen.cost", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_table_has_every_count_and_the_crossover():
    res = run_cost("--preset", "deepseek-v3")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["s_q"])
    rows = [line.split() for line in lines[header + 1:] if line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == [1 << i for i in range(13)]  # 1 .. 4096
    assert rows[0][-1] == "absorbed" and rows[-1][-1] == "vanilla"
    assert len({len(line) for line in lines[header:header + 1 + len(rows)]}) <= 2  # aligned columns
    dims = cost.AttnDims.from_config(model_config("deepseek-v3"))
    want = cost.crossover(dims, 1, 4096)
    assert lines[-1] == f"crossover: vanilla is cheaper from s_q >= {want} (absorbed below)"
    first = cost.form_costs(dims, 1, 1, 4096)
    assert float(rows[0][1]) == pytest.approx(first["absorbed"].flops / 1e9, abs=0.006)


def test_cli_json():
    res = run_cost("--preset", "kimi-k2", "--batch", "4", "--seqlen", "1000", "--tp", "2", "--rate", "400e12",
                   "--bandwidth", "2e12", "--max-s-q", "100", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["dims"]["heads"] == 32 and doc["batch"] == 4 and doc["cache_len"] == 1000
    assert [r["s_q"] for r in doc["rows"]] == [1, 2, 4, 8, 16, 32, 64]
    dims = cost.AttnDims.from_config(model_config("kimi-k2"), tp=2)
    assert doc["crossover"] == cost.crossover(dims, 4, 1000, rate=400e12, bandwidth=2e12)
    row = doc["rows"][3]
    assert row["vanilla"]["flops"] == cost.vanilla_cost(dims, 4, 8, 1000).flops


def test_cli_kv_dtype():
    res = run_cost("--preset", "deepseek-v3", "--tp", "8", "--kv-dtype", "fp8_ds_mla", "--max-s-q", "2", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["kv_dtype"] == "fp8_ds_mla" and doc["kv_token_bytes"] == 656
    assert doc["rows"][0]["absorbed"]["bytes"] == cost.absorbed_cost(V3_TP8, 1, 1, 4096, kv_dtype="fp8_ds_mla").bytes
    text = run_cost("--preset", "deepseek-v3", "--kv-dtype", "fp8_e4m3", "--max-s-q", "1")
    assert "cache fp8_e4m3 (576 B per token)" in text.stdout.splitlines()[1], text.stdout
    assert "cache bf16 (1152 B per token)" in run_cost("--preset", "deepseek-v3", "--max-s-q", "1").stdout


@pytest.mark.parametrize("args,name", [
    (["--preset", "deepseek-v3", "--batch", "0"], "--batch"),
    (["--preset", "deepseek-v3", "--seqlen", "many"], "--seqlen"),
    (["--preset", "deepseek-v3", "--tp", "3"], "--tp"),
    (["--preset", "deepseek-v3", "--rate", "-5"], "--rate"),
    (["--preset", "deepseek-v3", "--bandwidth", "inf"], "--bandwidth"),
    (["--preset", "deepseek-v3", "--dtype", "int4"], "--dtype"),
    (["--preset", "deepseek-v3", "--dtype", "fp8e4m3"], "--dtype"),          # a cache format, not an activation
    (["--preset", "deepseek-v3", "--kv-dtype", "fp16"], "--kv-dtype"),
    (["--preset", "minicpm3-4b", "--kv-dtype", "fp8_ds_mla"], "--kv-dtype"),
    (["--preset", "gpt-2"], "--preset"),
    ([], "--preset"),
])
def test_cli_errors_exit_2_with_one_line(args, name, capsys):
    assert cost.main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and name in lines[0], captured.err
