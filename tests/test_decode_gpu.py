"""mla_decode on the GPU against the float64 reference: the matrix of DESIGN.md section 6 for every
kernel family the device runs, long requests, device plan == host plan, CUDA graphs, bad lengths."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

import mla_gen
from gpu_cases import variants
from mla_gen.reference import mla_decode_reference
from mla_gen.schedule import PlanConfig, plan as host_plan
from mla_gen.dtypes import to_dtype, torch_dtype
from mla_gen.testing import accuracy_problems, make_inputs

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

HEADS = [1, 16, 20, 40, 64, 128]
DIMS = [(512, 64), (256, 32)]
PAGES = [1, 16, 64]
DTYPES = ["bf16", "fp16"]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def check(out: torch.Tensor, lse: torch.Tensor, inp, dtype: torch.dtype) -> None:
    ref, ref_lse = mla_decode_reference(*inp.args())
    problems = accuracy_problems(out, lse, ref, ref_lse, to_dtype(dtype))
    assert not problems, "; ".join(problems)


def case_lengths(page: int, s_q: int, rng: random.Random) -> list[int]:
    lengths = [1, page - 1, page, page + 1, 4097, rng.randint(1, 3000)]
    return [n for n in lengths if n >= max(1, s_q)]


def poisoned(inp, dtype):
    b, s_q, h, c = inp.q_nope.shape
    out = torch.full((b, s_q, h, c), float("nan"), dtype=dtype, device="cuda")
    lse = torch.full((b, s_q, h), float("nan"), dtype=torch.float32, device="cuda")
    return out, lse


def run_planned(inp, family: str, num_parts: int, out: torch.Tensor, lse: torch.Tensor | None = None) -> list[int]:
    """Plans `inp` on a wrapper of `family` over `num_parts` parts, runs it into out (and lse); each request's
    split count."""
    _, s_q, heads, ckv = inp.q_nope.shape
    w = mla_gen.MLADecodeWrapper(family=family, num_parts=num_parts)
    w.plan(inp.cache_seqlens, s_q, num_heads=heads, ckv_dim=ckv, rope_dim=inp.q_pe.shape[3],
           page_size=inp.ckv_cache.shape[1], max_pages=inp.block_table.shape[1], sm_scale=inp.sm_scale,
           dtype=inp.q_nope.dtype)
    w.run(*inp.args()[:6], out=out, lse=lse)
    return [int(n) for n in w.schedule()[1][:, 1]]


@pytest.mark.parametrize("schedule", ["auto", "unsplit", "split"])
@pytest.mark.parametrize("page", PAGES, ids=lambda p: f"p{p}")
@pytest.mark.parametrize("family, dtype, dims, heads, s_q", variants(HEADS, DIMS, DTYPES, (1, 2)))
def test_decode_matrix(family, dtype, dims, heads, s_q, page, schedule):
    dt = torch_dtype(dtype)
    seed = zlib.crc32(repr((family, dtype, dims, heads, page, s_q, schedule)).encode())
    rng = random.Random(seed)
    inp = make_inputs(case_lengths(page, s_q, rng), heads=heads, ckv=dims[0], rope=dims[1], s_q=s_q,
                      page_size=page, dtype=dt, device="cuda", generator=seeded(seed),
                      combined=(heads + page) % 2 == 1)
    out, lse = poisoned(inp, dt)
    if schedule == "auto":
        mla_gen.mla_decode(*inp.args(), out=out, lse=lse, family=family)
    else:
        splits = run_planned(inp, family, 1 if schedule == "unsplit" else 64, out, lse)
        if schedule == "split":
            assert max(splits) > 1, "the split schedule split no request"
        else:
            assert max(splits) == 1
    check(out, lse, inp, dt)


@pytest.mark.parametrize("page", [1, 4, 8, 64], ids=lambda p: f"p{p}")
def test_dispatch_follows_the_page_size_at_128_heads(page):
    """Without a family, a plan at 128 heads takes the variant generator.select.decide names for the cache's page
    size (seesaw where its TMA boxes have at least SEESAW_MIN_BOX_ROWS rows, else wgmma; on other archs whatever
    the rules say) and is as accurate as ever."""
    from generator.select import decide
    from mla_gen.dispatch import device_info

    inp = make_inputs([700, 5000, 1, 64], heads=128, page_size=page, device="cuda", generator=seeded(page + 3))
    w = mla_gen.MLADecodeWrapper()
    w.plan(inp.cache_seqlens, 1, num_heads=128, ckv_dim=512, rope_dim=64, page_size=page,
           max_pages=inp.block_table.shape[1], sm_scale=inp.sm_scale, dtype=torch.bfloat16, return_lse=True)
    info = device_info(torch.cuda.current_device())
    want = decide(arch=info.arch, num_heads=128, ckv_dim=512, rope_dim=64, dtype=to_dtype(torch.bfloat16),
                  page_size=page).spec.family
    assert w.plan_info.spec.family is want
    out, lse = poisoned(inp, torch.bfloat16)
    w.run(*inp.args()[:6], out=out, lse=lse)
    check(out, lse, inp, torch.bfloat16)


@pytest.mark.parametrize("schedule", ["auto", "unsplit"])
@pytest.mark.parametrize("family, dtype, dims, heads, s_q", variants([16, 128]))
def test_long_request(family, dtype, dims, heads, s_q, schedule):
    inp = make_inputs([32768 + 13, 7], heads=heads, page_size=64, device="cuda", generator=seeded(heads))
    out, lse = poisoned(inp, torch.bfloat16)
    mla_gen.mla_decode(*inp.args(), out=out, lse=lse, family=family, num_parts=1 if schedule == "unsplit" else None)
    check(out, lse, inp, torch.bfloat16)


@pytest.mark.parametrize("family, dtype, dims, heads, s_q", variants([16, 128]))
def test_merge_of_more_splits_than_one_round_trip_holds(family, dtype, dims, heads, s_q):
    """The merge kernel copies a row's values of up to 32 splits at once and loops for more (common.cuh
    kMergeStage): one request over about 105 of 150 parts takes the loop more than twice (its short neighbour is
    not split)."""
    inp = make_inputs([40000, 300], heads=heads, page_size=64, device="cuda", generator=seeded(heads + 7))
    out, lse = poisoned(inp, torch.bfloat16)
    splits = run_planned(inp, family, 150, out, lse)
    assert splits[0] > 64, f"the long request split {splits[0]} ways, not over 64"
    check(out, lse, inp, torch.bfloat16)


@pytest.mark.parametrize("family, dtype, dims, heads, s_q", variants([16, 40, 128], DIMS, ("bf16",), (1, 2)))
def test_the_decode_kernel_merges_requests_of_two_three_and_four_parts(family, dtype, dims, heads, s_q):
    """Three requests over 9 parts split 2, 3 and 4 ways (mla_gen.schedule.plan, at 16-, 32- and 64-token
    tiles), so each is merged by its last part inside the decode kernel (common.cuh merge_if_last: a warp a row,
    the row's 2, 3 or 4 partials read at once); rows past the heads (40 heads at s_q 2: 80 rows, a second row
    block of 16) are left alone."""
    inp = make_inputs([2392, 3587, 4815], heads=heads, ckv=dims[0], rope=dims[1], s_q=s_q, page_size=64,
                      device="cuda", generator=seeded(heads + 19 * s_q))
    out, lse = poisoned(inp, torch.bfloat16)
    splits = run_planned(inp, family, 9, out, lse)
    assert splits == [2, 3, 4], splits
    check(out, lse, inp, torch.bfloat16)


@pytest.mark.parametrize("family, dtype, dims, heads, s_q", variants([16, 128], DIMS, DTYPES, (1, 2)))
def test_merge_kernel_ctas_take_several_units_in_turn(family, dtype, dims, heads, s_q):
    """Four long requests over 24 parts split about 6 ways each, more than the decode kernel merges itself, so
    the merge kernel gets 4 x rows x column chunks units, more than its grid (at most 8 CTAs per decode CTA,
    common.cuh kMergeCtasPerPart): each of its CTAs merges several units in turn, every dtype and head count (but
    16 heads of width 256 at s_q 1: 128 units over 192 CTAs, one each)."""
    dt = torch_dtype(dtype)
    inp = make_inputs([6000, 5003, 7000, 6499], heads=heads, ckv=dims[0], rope=dims[1], s_q=s_q, page_size=64,
                      dtype=dt, device="cuda", generator=seeded(heads + 13 * s_q))
    out, lse = poisoned(inp, dt)
    splits = run_planned(inp, family, 24, out, lse)
    assert min(splits) > 4, f"a request split only {min(splits)} ways: the decode kernel merges it"
    check(out, lse, inp, dt)


@pytest.mark.parametrize("family, dtype, dims, heads, s_q", variants([16, 128], DIMS, DTYPES, (1, 2)))
def test_merge_kernel_units_of_long_and_short_splits_alternate(family, dtype, dims, heads, s_q):
    """Long and short requests over 100 parts split 44 and 7 ways (mla_gen.schedule.plan), so a merge CTA that
    takes units in turn meets units of more than one stage of splits (32: common.cuh kMergeStage) and units
    within one, in either order."""
    dt = torch_dtype(dtype)
    inp = make_inputs([40000, 6000, 40000, 6000], heads=heads, ckv=dims[0], rope=dims[1], s_q=s_q, page_size=64,
                      dtype=dt, device="cuda", generator=seeded(heads + 17 * s_q))
    out, lse = poisoned(inp, dt)
    splits = run_planned(inp, family, 100, out, lse)
    assert splits == [44, 7, 44, 7], splits
    check(out, lse, inp, dt)


@pytest.mark.parametrize("family, dtype, dims, heads, s_q", variants([16, 128], dtypes=("bf16", "fp16")))
def test_a_split_request_is_as_accurate_as_an_unsplit_one(family, dtype, dims, heads, s_q):
    """A request split over ~100 parts and merged by the merge kernel is no less accurate than the same request
    unsplit, give or take one rounding of the output's dtype (rel L2 against the float64 reference): the
    partials (fp32 o, lse) and the merge's weights lose nothing that matters."""
    dt = torch_dtype(dtype)
    inp = make_inputs([20000], heads=heads, ckv=dims[0], rope=dims[1], s_q=s_q, page_size=64, dtype=dt,
                      device="cuda", generator=seeded(heads + 11))
    ref, _ = mla_decode_reference(*inp.args())
    errors, splits = {}, []
    for parts in (1, 100):
        out, _ = poisoned(inp, dt)
        splits = run_planned(inp, family, parts, out)
        assert not out.isnan().any()
        errors[parts] = float((out.double() - ref.to(out.device).double()).norm() / ref.double().norm())
    assert splits[0] > 4, "the request is not split over enough parts for the merge kernel"
    ulp = 2.0 ** -8 if dtype == "bf16" else 2.0 ** -11  # the dtype's relative rounding step
    assert errors[100] <= errors[1] + ulp, errors


@pytest.mark.parametrize("family, dtype, dims, heads, s_q", variants([16, 128]))
def test_combined_cache_views_and_return_lse(family, dtype, dims, heads, s_q):
    inp = make_inputs([100, 1, 257], heads=heads, page_size=16, device="cuda", combined=True, generator=seeded(5))
    assert inp.ckv_cache.stride(1) == 576  # views of one [pages, page_size, 576] cache
    out, lse = mla_gen.mla_decode(*inp.args(), return_lse=True, family=family)
    check(out, lse, inp, torch.bfloat16)


@pytest.mark.parametrize("seed", range(12))
def test_device_plan_equals_host_plan(seed):
    rng = random.Random(seed)
    batch = rng.choice([1, 3, 64, 300, 700])
    longest = 40000 if batch <= 3 else (5000 if batch <= 64 else 400)  # at most ~300k tokens of cache
    lengths = [rng.randint(2, rng.choice([64, longest])) for _ in range(batch)]
    inp = make_inputs(lengths, heads=16, ckv=256, rope=32, page_size=64, s_q=2, device="cuda",
                      generator=seeded(seed), extra_pages=0)
    w = mla_gen.MLADecodeWrapper(num_parts=rng.choice([None, 1, 5, 132, 600]))
    pl = w.plan(inp.cache_seqlens, 2, num_heads=16, ckv_dim=256, rope_dim=32, page_size=64,
                max_pages=inp.block_table.shape[1], sm_scale=inp.sm_scale)
    w.run(*inp.args()[:6])
    d = pl.decision
    cfg = PlanConfig(block_n=d.spec.tile.block_n, num_parts=d.num_parts, fixed_cost=d.fixed_cost,
                     min_part_cost=d.min_part_cost, s_q=2, page_size=64, max_pages=inp.block_table.shape[1])
    want = host_plan(lengths, cfg)
    part_info, req_info = (t.cpu().tolist() for t in w.schedule())
    assert [tuple(r) for r in part_info] == list(want.part_info)
    assert [tuple(r) for r in req_info] == list(want.req_info)


@pytest.mark.parametrize("family, dtype, dims, heads, s_q", variants([16]))
def test_cuda_graph_replay_with_changing_lengths(family, dtype, dims, heads, s_q):
    """One capture, five steps with new lengths, block tables and queries written in place."""
    batch, heads, page, max_pages = 4, 16, 16, 80
    num_pages = batch * max_pages + 1
    first = make_inputs([300, 5, 1000, 64], heads=heads, page_size=page, device="cuda", generator=seeded(11))
    q_nope, q_pe = first.q_nope.clone(), first.q_pe.clone()
    ckv = torch.full((num_pages, page, 512), float("nan"), dtype=torch.bfloat16, device="cuda")
    kpe = torch.full((num_pages, page, 64), float("nan"), dtype=torch.bfloat16, device="cuda")
    table = torch.zeros(batch, max_pages, dtype=torch.int32, device="cuda")
    seqlens = first.cache_seqlens.clone()
    static = (q_nope, q_pe, ckv, kpe, table, seqlens)
    w = mla_gen.MLADecodeWrapper(family=family)
    w.plan(seqlens, 1, num_heads=heads, page_size=page, max_pages=max_pages, sm_scale=first.sm_scale,
           return_lse=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        w.run(*static)  # warm-up outside capture (loads the module)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = w.run(*static)
    rng = random.Random(3)
    for step in range(5):
        lengths = [rng.randint(1, max_pages * page // 2) for _ in range(batch)]
        inp = make_inputs(lengths, heads=heads, page_size=page, device="cuda", generator=seeded(100 + step))
        assert inp.ckv_cache.shape[0] <= num_pages
        ckv.fill_(float("nan"))
        kpe.fill_(float("nan"))
        ckv[: inp.ckv_cache.shape[0]].copy_(inp.ckv_cache)
        kpe[: inp.kpe_cache.shape[0]].copy_(inp.kpe_cache)
        table.zero_()
        table[:, : inp.block_table.shape[1]].copy_(inp.block_table)
        q_nope.copy_(inp.q_nope)
        q_pe.copy_(inp.q_pe)
        seqlens.copy_(inp.cache_seqlens)
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        graph.replay()
        check(out, lse, inp, torch.bfloat16)


def test_invalid_lengths_poison_their_rows_and_raise_on_check():
    inp = make_inputs([40, 50, 60], heads=16, page_size=16, device="cuda", generator=seeded(9), extra_pages=0)
    bad = inp.cache_seqlens.clone()
    bad[1] = inp.block_table.shape[1] * 16 + 1  # longer than the block table's pages
    w = mla_gen.MLADecodeWrapper()
    w.plan(bad, 1, num_heads=16, page_size=16, max_pages=inp.block_table.shape[1], sm_scale=inp.sm_scale)
    out = w.run(*inp.args()[:5], bad)
    assert out[1].isnan().all() and not out[0].isnan().any() and not out[2].isnan().any()
    with pytest.raises(ValueError, match="cache_seqlens"):
        w.check_status()
    w.check_status()  # the flag was cleared


def test_module_loaded_once_per_process():
    from mla_gen import loader

    inp = make_inputs([70, 3], heads=16, page_size=16, device="cuda", generator=seeded(2))
    mla_gen.mla_decode(*inp.args())
    misses = loader._load.cache_info().misses
    mla_gen.mla_decode(*inp.args())
    assert loader._load.cache_info().misses == misses


def test_warm_cache_new_process_runs_without_nvcc(tmp_path):
    """A new process on a warm cache reaches its first result without invoking nvcc."""
    log = tmp_path / "nvcc.log"
    real = subprocess.run(["bash", "-c", "command -v nvcc || echo /usr/local/cuda/bin/nvcc"],
                          capture_output=True, text=True).stdout.strip()
    wrapper = tmp_path / "nvcc"
    wrapper.write_text(f"#!/bin/bash\necho \"$@\" >> {log}\nexec {real} \"$@\"\n")
    wrapper.chmod(0o755)
    env = {**os.environ, "MLA_GEN_NVCC": str(wrapper), "MLA_GEN_CACHE_DIR": str(tmp_path / "cache")}
    code = textwrap.dedent("""
        import torch, mla_gen
        from mla_gen.testing import make_inputs
        inp = make_inputs([50, 9], heads=16, ckv=256, rope=32, page_size=16, device="cuda")
        out = mla_gen.mla_decode(*inp.args(), family="simt")
        torch.cuda.synchronize()
        print("ok", bool(out.isnan().any()))
    """)
    cold = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert cold.returncode == 0 and "ok False" in cold.stdout, cold.stderr
    assert " -c kernel.cu" in log.read_text()  # the cold process compiled
    log.unlink()
    warm = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert warm.returncode == 0 and "ok False" in warm.stdout, warm.stderr
    assert not log.exists(), f"nvcc ran on a warm cache: {log.read_text()}"


@pytest.mark.parametrize("family, dtype, dims, heads, s_q", variants([16, 128]))
def test_reused_work_list_gives_the_planned_result(family, dtype, dims, heads, s_q):
    """run(replan=False), as for the other layers of a decoding step: the work list of the last run, its
    split requests merged in the kernel (tickets reset by the merging part) and by the merge kernel."""
    lengths = [7000, 1, 64, 65, 3000, 4097]  # the long ones are split over many parts at auto num_parts
    inp = make_inputs(lengths, heads=heads, ckv=dims[0], rope=dims[1], s_q=s_q, page_size=64,
                      dtype=torch_dtype(dtype), device="cuda", generator=seeded(heads + 7))
    w = mla_gen.MLADecodeWrapper(family=family)
    w.plan(inp.cache_seqlens, s_q, num_heads=heads, ckv_dim=dims[0], rope_dim=dims[1], page_size=64,
           max_pages=inp.block_table.shape[1], sm_scale=inp.sm_scale, dtype=torch_dtype(dtype), return_lse=True)
    with pytest.raises(ValueError, match=r"^replan:"):
        w.run(*inp.args()[:6], replan=False)  # no work list yet
    first, first_lse = (t.clone() for t in w.run(*inp.args()[:6]))
    splits = w.schedule()[1][:, 1]
    assert int(splits.max()) > 4, "no request is split over enough parts for the merge kernel"
    for _ in range(3):
        out, lse = poisoned(inp, torch_dtype(dtype))
        w.run(*inp.args()[:6], out=out, lse=lse, replan=False)
        assert torch.equal(out, first) and torch.equal(lse, first_lse)
    check(first, first_lse, inp, torch_dtype(dtype))
