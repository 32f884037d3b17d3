"""The engine fits on the GPU: opcheck of torch.ops.mla_gen.*, torch.compile(fullgraph=True) of the
layer's decode step, mla_gen.compat.flash_mla and .flashinfer against the float64 reference (and
against the real FlashMLA / FlashInfer kernels when the peers load: .peers/ or ../shared/peers)."""
from __future__ import annotations

import importlib.util
import math
import random
import zlib
from pathlib import Path

import pytest
import torch

import mla_gen  # noqa: F401  (registers the ops)
from conftest import REPO
from layer_cases import build_case
from mla_gen.compat.flash_mla import FlashMLASchedMeta, flash_mla_with_kvcache, get_mla_metadata
from mla_gen.compat.flashinfer import BatchMLAPagedAttentionWrapper
from mla_gen.dtypes import to_dtype
from mla_gen.reference import mla_decode_reference
from mla_gen.testing import LAYER_TOL, accuracy_problems, make_inputs, max_abs, rel_l2

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

RAGGED = [1, 63, 64, 65, 700, 2049]


def ragged(s_q: int) -> list[int]:
    """RAGGED with every length at least s_q (a request holds its s_q new tokens)."""
    return [max(n, s_q) for n in RAGGED]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def inputs(lengths, *, s_q=1, heads=16, ckv=512, rope=64, page=64, dtype=torch.bfloat16, seed=0):
    return make_inputs(lengths, heads=heads, ckv=ckv, rope=rope, s_q=s_q, page_size=page, dtype=dtype,
                       device="cuda", combined=True, generator=seeded(seed))


def check(out, lse, inp, dtype=torch.bfloat16):
    """out [B, s_q, H, C], lse [B, s_q, H] natural log, against the float64 reference."""
    ref, ref_lse = mla_decode_reference(*inp.args())
    problems = accuracy_problems(out, lse, ref, ref_lse, to_dtype(dtype))
    assert not problems, "; ".join(problems)


def peers_module():
    for folder in (REPO / ".peers", REPO.parent / "shared" / "peers"):
        path = Path(folder) / "peers.py"
        if path.is_file():
            spec = importlib.util.spec_from_file_location("peers", path)
            mod = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(mod)
                return mod, mod.available()[0]
            except Exception:  # a broken peers folder reads as absent
                return None, []
    return None, []


# ---------------------------------------------------------------------------------------- the ops
@pytest.mark.parametrize("s_q", [1, 2])
def test_opcheck_on_cuda(s_q):
    inp = inputs([5, 300, 64], s_q=s_q, seed=s_q)
    out = torch.empty_like(inp.q_nope)
    lse = torch.empty(inp.q_nope.shape[:3], dtype=torch.float32, device="cuda")
    for op, extra in ((torch.ops.mla_gen.mla_decode, ()), (torch.ops.mla_gen.mla_decode_lse, ()),
                      (torch.ops.mla_gen.mla_decode_out, (out, lse))):
        torch.library.opcheck(op, (*inp.args(), *extra))
    o, l_ = torch.ops.mla_gen.mla_decode_lse(*inp.args())
    check(o, l_, inp)


def test_compiled_layer_decode_step_equals_eager():
    torch._dynamo.reset()
    case = build_case("deepseek-v3", [100, 700, 65], s_q=1, page_size=64, hidden_size=512, head_range=(0, 16),
                      dtype=torch.bfloat16, device="cuda", seed=3)
    layer, cache, table, lens = case.layer, case.cache, case.block_table, case.cache_seqlens

    def step(x, lens):
        return layer(x, cache, table, lens, form="absorbed")

    eager = step(case.x, lens)
    assert layer.last_backend == "mla_decode"
    compiled = torch.compile(step, fullgraph=True)
    for _ in range(2):  # each call rewrites the same cache slots with the same values
        got = compiled(case.x, lens)
    assert not got.isnan().any()
    assert rel_l2(got, eager) <= LAYER_TOL / 2, rel_l2(got, eager)  # inductor fuses the bf16 projections


# ------------------------------------------------------------------------------- compat.flash_mla
@pytest.mark.parametrize("s_q", [1, 2], ids=lambda s: f"sq{s}")
@pytest.mark.parametrize("convention", ["sched_meta", "tensors"])
def test_flash_mla_adapter_reused_across_steps(convention, s_q):
    """One metadata for three steps (lengths change, shapes do not), as engines reuse it across layers and steps."""
    rng = random.Random(s_q)
    batch, heads = len(RAGGED), 16
    meta = None
    for step in range(3):
        lengths = ragged(s_q) if step == 0 else [rng.randint(s_q, 2100) for _ in range(batch)]
        inp = inputs(lengths, s_q=s_q, heads=heads, seed=10 * step + s_q)
        table = torch.full((batch, 40), 2147480000, dtype=torch.int32, device="cuda")  # FlashMLA's poison
        table[:, :inp.block_table.shape[1] - 1] = inp.block_table[:, :-1]
        kv4 = inp.kv.unsqueeze(2)
        if convention == "sched_meta":
            meta = meta or get_mla_metadata()[0]
            sched, splits = meta, None
        else:
            sched, splits = get_mla_metadata(inp.cache_seqlens, s_q * heads, 1)
            assert sched.shape[1] == 8 and splits.shape == (batch + 1,)
        out, lse = flash_mla_with_kvcache(inp.q, kv4, table, inp.cache_seqlens, 512, sched, splits,
                                          softmax_scale=inp.sm_scale, causal=True)
        assert out.shape == (batch, s_q, heads, 512) and lse.shape == (batch, heads, s_q)
        check(out, lse.transpose(1, 2), inp)
    if convention == "sched_meta":
        assert isinstance(meta, FlashMLASchedMeta) and meta.have_initialized and len(meta.plans) == 1


@pytest.mark.parametrize("s_q", [1, 2], ids=lambda s: f"sq{s}")
def test_flash_mla_adapter_against_flashmla(s_q):
    peers, names = peers_module()
    if "flashmla" not in names:
        pytest.skip("the FlashMLA peer does not load here (.peers/ or ../shared/peers)")
    fm = peers._load("flashmla")
    meta = get_mla_metadata()[0]
    fm_meta = fm_splits = None
    rng = random.Random(7)
    for step in range(3):
        lengths = ragged(s_q) if step == 0 else [rng.randint(s_q, 4000) for _ in RAGGED]
        inp = inputs(lengths, s_q=s_q, heads=64, seed=100 + step)
        kv4 = inp.kv.unsqueeze(2)
        out, lse = flash_mla_with_kvcache(inp.q, kv4, inp.block_table, inp.cache_seqlens, 512, meta,
                                          softmax_scale=inp.sm_scale, causal=True)
        want, want_lse, fm_meta, fm_splits = fm.dense_decode_fwd(inp.q, kv4, 512, inp.cache_seqlens,
                                                                 inp.block_table, inp.sm_scale, s_q > 1, None, None)
        assert out.shape == want.shape and lse.shape == want_lse.shape
        assert rel_l2(out, want) < 1e-2 and max_abs(lse, want_lse) < 2e-3
        check(out, lse.transpose(1, 2), inp)


@pytest.mark.parametrize("case", ["page16", "ckv256", "fp16", "noncausal_sq2", "page1_sq3"])
def test_flash_mla_adapter_beyond_flashmla(case):
    kw = dict(page16=dict(page=16), ckv256=dict(ckv=256, rope=32, heads=32), fp16=dict(dtype=torch.float16),
              noncausal_sq2=dict(s_q=2), page1_sq3=dict(page=1, s_q=3))[case]
    inp = inputs([3, 100, 513], seed=zlib.crc32(case.encode()) % 1000, **kw)
    dv = inp.ckv_cache.shape[-1]
    causal = case != "noncausal_sq2"
    out, lse = flash_mla_with_kvcache(inp.q, inp.kv.unsqueeze(2), inp.block_table, inp.cache_seqlens, dv,
                                      get_mla_metadata()[0], softmax_scale=inp.sm_scale, causal=causal)
    if causal:
        check(out, lse.transpose(1, 2), inp, inp.q.dtype)
        return
    # non-causal: every new token sees the whole cache = the s_q x H rows of one token
    b, s, h, _ = inp.q_nope.shape
    flat = dict(q_nope=inp.q_nope.reshape(b, 1, s * h, -1), q_pe=inp.q_pe.reshape(b, 1, s * h, -1))
    ref, ref_lse = mla_decode_reference(flat["q_nope"], flat["q_pe"], *inp.args()[2:])
    problems = accuracy_problems(out.reshape(b, 1, s * h, -1), lse.transpose(1, 2).reshape(b, 1, s * h), ref,
                                 ref_lse, "bf16")
    assert not problems, problems


# ------------------------------------------------------------------------------ compat.flashinfer
def csr(inp, s_q):
    """FlashInfer's CSR lists of make_inputs' block table (pages of request 0, 1, ...)."""
    page = inp.ckv_cache.shape[1]
    lens = inp.cache_seqlens.cpu()
    npages = (lens + page - 1) // page
    batch = lens.shape[0]
    qo_indptr = torch.arange(batch + 1, dtype=torch.int32) * s_q
    kv_indptr = torch.zeros(batch + 1, dtype=torch.int32)
    kv_indptr[1:] = torch.cumsum(npages, 0)
    used = torch.arange(inp.block_table.shape[1])[None, :] < npages[:, None]
    kv_indices = inp.block_table.cpu()[used].to(torch.int32)
    return qo_indptr, kv_indptr, kv_indices, lens.to(torch.int32)


def fi_views(inp):
    b, s, h, _ = inp.q_nope.shape
    return inp.q_nope.reshape(b * s, h, -1), inp.q_pe.reshape(b * s, h, -1)


@pytest.mark.parametrize("page", [1, 16, 64], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("s_q", [1, 2], ids=lambda s: f"sq{s}")
def test_flashinfer_adapter_vs_reference(s_q, page):
    inp = inputs(ragged(s_q), s_q=s_q, page=page, seed=page + s_q)
    b, _, h, _ = inp.q_nope.shape
    w = BatchMLAPagedAttentionWrapper(torch.empty(1 << 20, dtype=torch.uint8, device="cuda"))
    qo, kvp, kvi, lens = csr(inp, s_q)
    w.plan(qo, kvp, kvi, lens, h, 512, 64, page, True, inp.sm_scale, torch.bfloat16, torch.bfloat16)
    q_nope, q_pe = fi_views(inp)
    out, lse2 = w.run(q_nope, q_pe, inp.ckv_cache, inp.kpe_cache, return_lse=True)
    check(out.view(b, s_q, h, -1), lse2.view(b, s_q, h) * math.log(2), inp)
    out_e, lse_e = w.run(query=inp.q.reshape(b * s_q, h, -1), kv_cache=inp.kv, return_lse=True,
                         return_lse_base_on_e=True)
    check(out_e.view(b, s_q, h, -1), lse_e.view(b, s_q, h), inp)
    buf = torch.full_like(out, float("nan"))
    assert w.run(q_nope, q_pe, inp.ckv_cache, inp.kpe_cache, out=buf) is buf
    peers, names = peers_module()
    if "flashinfer_fa3" in names:
        try:
            run = peers.prepare("flashinfer_fa3", inp.q, inp.kv, inp.block_table, inp.cache_seqlens, inp.sm_scale)
        except ValueError:  # a plan FlashInfer's own wrapper refuses (peers.py says why)
            return
        assert rel_l2(out.view(b, s_q, h, -1), run()) < 1e-2


def test_flashinfer_adapter_cuda_graph_replans_in_place():
    batch, heads, page, s_q = 4, 16, 16, 2
    dev = "cuda"
    bufs = dict(qo_indptr=torch.zeros(batch + 1, dtype=torch.int32, device=dev),
                kv_indptr=torch.zeros(batch + 1, dtype=torch.int32, device=dev),
                kv_indices=torch.zeros(4096, dtype=torch.int32, device=dev),
                kv_len_arr=torch.zeros(batch, dtype=torch.int32, device=dev))
    w = BatchMLAPagedAttentionWrapper(torch.empty(1 << 20, dtype=torch.uint8, device=dev), True, **bufs)
    num_pages = 400
    ckv = torch.full((num_pages, page, 512), float("nan"), dtype=torch.bfloat16, device=dev)
    kpe = torch.full((num_pages, page, 64), float("nan"), dtype=torch.bfloat16, device=dev)
    q_nope = torch.zeros(batch * s_q, heads, 512, dtype=torch.bfloat16, device=dev)
    q_pe = torch.zeros(batch * s_q, heads, 64, dtype=torch.bfloat16, device=dev)
    out = torch.empty(batch * s_q, heads, 512, dtype=torch.bfloat16, device=dev)
    lse = torch.empty(batch * s_q, heads, dtype=torch.float32, device=dev)
    rng = random.Random(5)
    graph = None
    for step in range(4):
        lengths = [rng.randint(s_q, 1500) for _ in range(batch)]
        inp = inputs(lengths, s_q=s_q, heads=heads, page=page, seed=50 + step)
        n = inp.ckv_cache.shape[0]
        assert n <= num_pages
        ckv.fill_(float("nan"))
        kpe.fill_(float("nan"))
        ckv[:n].copy_(inp.ckv_cache)
        kpe[:n].copy_(inp.kpe_cache)
        qn, qp = fi_views(inp)
        q_nope.copy_(qn)
        q_pe.copy_(qp)
        w.plan(*csr(inp, s_q), heads, 512, 64, page, True, inp.sm_scale, torch.bfloat16, torch.bfloat16)
        if graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                w.run(q_nope, q_pe, ckv, kpe, out=out, lse=lse, return_lse_base_on_e=True)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                w.run(q_nope, q_pe, ckv, kpe, out=out, lse=lse, return_lse_base_on_e=True)
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        graph.replay()
        check(out.view(batch, s_q, heads, -1), lse.view(batch, s_q, heads), inp)


def test_flashinfer_adapter_ragged_queries():
    """qo_indptr with 1, 3, 2, 3, 1 query tokens: the last n_b of each request's 3 causal queries."""
    S, n = 3, [1, 3, 2, 3, 1]
    inp = inputs([5, 700, 64, 2049, 3], s_q=S, page=16, seed=77)
    b, _, h, _ = inp.q_nope.shape
    qo = torch.tensor([0] + n, dtype=torch.int32).cumsum(0).to(torch.int32)
    _, kv_indptr, kv_indices, lens = csr(inp, S)
    q_nope = torch.cat([inp.q_nope[r, S - k:] for r, k in enumerate(n)])
    q_pe = torch.cat([inp.q_pe[r, S - k:] for r, k in enumerate(n)])
    w = BatchMLAPagedAttentionWrapper(torch.empty(1 << 20, dtype=torch.uint8, device="cuda"))
    w.plan(qo, kv_indptr, kv_indices, lens, h, 512, 64, 16, True, inp.sm_scale, torch.bfloat16, torch.bfloat16)
    out, lse = w.run(q_nope, q_pe, inp.ckv_cache, inp.kpe_cache, return_lse=True, return_lse_base_on_e=True)
    ref, ref_lse = mla_decode_reference(*inp.args())
    want = torch.cat([ref[r, S - k:] for r, k in enumerate(n)])
    want_lse = torch.cat([ref_lse[r, S - k:] for r, k in enumerate(n)])
    problems = accuracy_problems(out, lse, want, want_lse, "bf16")
    assert not problems, problems
