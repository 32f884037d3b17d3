"""mla_gen.compat on the CPU: the adapters' signatures against the upstream ones (kept here as data,
read from flash_mla/flash_mla_interface.py at deepseek-ai/FlashMLA main 9241ae3 and its older
revision c28eca9, and flashinfer-python 0.7.2.post1 flashinfer/mla/_batch_mla/_wrapper.py), and
argument errors that name the argument. The GPU side: test_engines_gpu.py."""
from __future__ import annotations

import inspect
import math

import pytest
import torch

from mla_gen.compat import flash_mla, flashinfer
from mla_gen.compat.flash_mla import FlashMLASchedMeta, flash_mla_with_kvcache, get_mla_metadata
from mla_gen.compat.flashinfer import BatchMLAPagedAttentionWrapper

E = inspect.Parameter.empty
VAR, KW = "*", "kw"  # markers: *args/**kwargs, keyword-only

# (name, default) in order; E = no default. Upstream FlashMLA main (9241ae3):
FLASH_MLA_WITH_KVCACHE = [
    ("q", E), ("k_cache", E), ("block_table", E), ("cache_seqlens", E), ("head_dim_v", E),
    ("tile_scheduler_metadata", E), ("num_splits", None), ("softmax_scale", None), ("causal", False),
    ("is_fp8_kvcache", False), ("indices", None), ("attn_sink", None), ("extra_k_cache", None),
    ("extra_indices_in_kvcache", None), ("topk_length", None), ("extra_topk_length", None)]
GET_MLA_METADATA = [("args", "VAR_POSITIONAL"), ("kwargs", "VAR_KEYWORD")]
# the older convention (c28eca9): get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, ...)
OLD_GET_MLA_METADATA = [("cache_seqlens", E), ("num_q_tokens_per_head_k", E), ("num_heads_k", E),
                        ("num_heads_q", None), ("is_fp8_kvcache", False), ("topk", None)]
# the older flash_mla_with_kvcache (c28eca9): a prefix of today's, which therefore accepts its calls
OLD_FLASH_MLA_WITH_KVCACHE = ["q", "k_cache", "block_table", "cache_seqlens", "head_dim_v",
                              "tile_scheduler_metadata", "num_splits", "softmax_scale", "causal", "is_fp8_kvcache",
                              "indices"]

# FlashInfer 0.7.2.post1 BatchMLAPagedAttentionWrapper (after self); keyword-only ones marked KW
FI_INIT = [("float_workspace_buffer", E), ("use_cuda_graph", False), ("qo_indptr", None), ("kv_indptr", None),
           ("kv_indices", None), ("kv_len_arr", None), ("backend", "auto")]
FI_PLAN = [("qo_indptr", None), ("kv_indptr", None), ("kv_indices", None), ("kv_len_arr", None),
           ("num_heads", None), ("head_dim_ckv", None), ("head_dim_kpe", None), ("page_size", None),
           ("causal", None), ("sm_scale", None), ("q_data_type", None), ("kv_data_type", None),
           ("use_profiler", False),
           (KW, "metadata", None), (KW, "cum_seq_lens_q", None), (KW, "block_tables", None), (KW, "seq_lens", None),
           (KW, "max_q_len", None), (KW, "query_layout", None), (KW, "kv_cache_layout", None),
           (KW, "lse_mode", "none"), (KW, "output_dtype", None), (KW, "output_scale", "none"),
           (KW, "scale_mode", "default"), (KW, "skip_softmax", False), (KW, "enable_pdl", None),
           (KW, "use_sinks", False)]
FI_RUN = [("q_nope", None), ("q_pe", None), ("ckv_cache", None), ("kpe_cache", None), ("out", None), ("lse", None),
          ("return_lse", False), ("profiler_buffer", None), ("kv_len", None), ("page_table", None),
          ("return_lse_base_on_e", False), ("o_scale", None),
          (KW, "query", None), (KW, "kv_cache", None), (KW, "ckv_scale", None), (KW, "ckv_scale_arr", None),
          (KW, "kpe_scale", None), (KW, "sinks", None), (KW, "skip_softmax_threshold_scale_factor", None),
          (KW, "bmm1_scale", None), (KW, "bmm2_scale", None)]
# the long-standing FlashInfer plan/run (0.2.x): plan's 13 parameters, run's first 7, in this order
LONG_STANDING_PLAN = ["qo_indptr", "kv_indptr", "kv_indices", "kv_len_arr", "num_heads", "head_dim_ckv",
                      "head_dim_kpe", "page_size", "causal", "sm_scale", "q_data_type", "kv_data_type", "use_profiler"]
LONG_STANDING_RUN = ["q_nope", "q_pe", "ckv_cache", "kpe_cache", "out", "lse", "return_lse"]


def described(fn, skip_self: bool = False) -> list[tuple]:
    params = list(inspect.signature(fn).parameters.values())[1 if skip_self else 0:]
    rows = []
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            rows.append((p.name, p.kind.name))
        elif p.kind == p.KEYWORD_ONLY:
            rows.append((KW, p.name, p.default))
        else:
            rows.append((p.name, p.default))
    return rows


def test_flash_mla_signatures() -> None:
    assert described(flash_mla_with_kvcache) == FLASH_MLA_WITH_KVCACHE
    assert described(get_mla_metadata) == GET_MLA_METADATA
    assert described(flash_mla._old_get_mla_metadata) == OLD_GET_MLA_METADATA
    assert [p[0] for p in FLASH_MLA_WITH_KVCACHE[:len(OLD_FLASH_MLA_WITH_KVCACHE)]] == OLD_FLASH_MLA_WITH_KVCACHE
    assert {f.name for f in __import__("dataclasses").fields(FlashMLASchedMeta.Config)} >= {
        "b", "s_q", "h_q", "page_block_size", "h_k", "causal", "is_fp8_kvcache", "topk"}


def test_flashinfer_signatures() -> None:
    assert described(BatchMLAPagedAttentionWrapper.__init__, skip_self=True) == FI_INIT
    assert described(BatchMLAPagedAttentionWrapper.plan, skip_self=True) == FI_PLAN
    assert described(BatchMLAPagedAttentionWrapper.run, skip_self=True) == FI_RUN
    assert [p[0] for p in FI_PLAN[:13]] == LONG_STANDING_PLAN
    assert [p[0] for p in FI_RUN[:7]] == LONG_STANDING_RUN


def test_get_mla_metadata_conventions() -> None:
    meta, none = get_mla_metadata()
    assert isinstance(meta, FlashMLASchedMeta) and none is None and not meta.have_initialized
    with pytest.raises(ValueError, match="^cache_seqlens"):
        get_mla_metadata(torch.zeros(3, dtype=torch.int32), 16, 1)  # a CPU tensor
    with pytest.raises(TypeError, match="get_mla_metadata"):
        get_mla_metadata(torch.zeros(3, dtype=torch.int32), 16, 1, bogus=1)


def q_and_cache(s_q: int = 1, heads: int = 16, dim: int = 576, h_k: int = 1):
    return (torch.zeros(2, s_q, heads, dim, dtype=torch.bfloat16),
            torch.zeros(4, 64, h_k, dim, dtype=torch.bfloat16),
            torch.zeros(2, 2, dtype=torch.int32), torch.full((2,), 10, dtype=torch.int32))


@pytest.mark.parametrize("change, name, error", [
    (dict(q=torch.zeros(2, 16, 576)), "q", ValueError),
    (dict(q=torch.zeros(2, 1, 16, 576)), "q", TypeError),                     # float32
    (dict(k_cache=torch.zeros(4, 64, 2, 576, dtype=torch.bfloat16)), "k_cache", ValueError),
    (dict(k_cache=torch.zeros(4, 64, 1, 512, dtype=torch.bfloat16)), "k_cache", ValueError),
    (dict(head_dim_v=576), "head_dim_v", ValueError),
    (dict(num_splits=torch.zeros(3, dtype=torch.int32)), "num_splits", ValueError),
    (dict(tile_scheduler_metadata="x"), "tile_scheduler_metadata", TypeError),
    (dict(indices=torch.zeros(2, 1, 8, dtype=torch.int32)), "indices", NotImplementedError),
    (dict(is_fp8_kvcache=True), "is_fp8_kvcache", NotImplementedError),
    (dict(block_table=None), "block_table", ValueError),
    (dict(block_table=torch.zeros(2, dtype=torch.int32)), "block_table", ValueError),
])
def test_flash_mla_errors_name_the_argument(change, name, error) -> None:
    q, k, table, lens = q_and_cache()
    args = dict(q=q, k_cache=k, block_table=table, cache_seqlens=lens, head_dim_v=512,
                tile_scheduler_metadata=get_mla_metadata()[0])
    args.update(change)
    with pytest.raises(error, match=f"^{name}"):
        flash_mla_with_kvcache(**args)


def test_flash_mla_reused_metadata_must_match() -> None:
    meta = get_mla_metadata()[0]
    meta.have_initialized = True
    meta.config = FlashMLASchedMeta.Config(2, 2, 16, 64, 1, True, False, None, None, None)
    q, k, table, lens = q_and_cache(s_q=1)
    with pytest.raises(ValueError, match=r"^tile_scheduler_metadata: its config\.s_q is 2"):
        flash_mla_with_kvcache(q, k, table, lens, 512, meta, causal=True)


def plan_args(**change):
    args = dict(qo_indptr=torch.tensor([0, 1, 2], dtype=torch.int32), kv_indptr=torch.tensor([0, 2, 3], dtype=torch.int32),
                kv_indices=torch.tensor([5, 1, 7], dtype=torch.int32), kv_len_arr=torch.tensor([100, 3], dtype=torch.int32),
                num_heads=16, head_dim_ckv=512, head_dim_kpe=64, page_size=64, causal=True, sm_scale=0.1,
                q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    args.update(change)
    return args


@pytest.mark.parametrize("change, name, error", [
    (dict(qo_indptr=torch.tensor([0, 0, 2], dtype=torch.int32)), "qo_indptr", ValueError),   # no query token
    (dict(qo_indptr=torch.tensor([0, 3, 4], dtype=torch.int32), kv_len_arr=torch.tensor([100, 2], dtype=torch.int32)),
     "kv_len_arr", ValueError),  # ragged, causal: request 1 holds fewer tokens than the padded run of 3
    (dict(qo_indptr=torch.tensor([0.0, 1.0])), "qo_indptr", ValueError),
    (dict(kv_len_arr=torch.tensor([200, 3], dtype=torch.int32)), "kv_len_arr", ValueError),  # needs 4 pages
    (dict(kv_len_arr=torch.tensor([100], dtype=torch.int32)), "kv_len_arr", ValueError),
    (dict(kv_indptr=torch.tensor([0, 2, 9], dtype=torch.int32)), "kv_indptr", ValueError),
    (dict(num_heads=0), "num_heads", ValueError),
    (dict(q_data_type=torch.float32), "q_data_type", TypeError),
    (dict(kv_data_type=torch.float16), "kv_data_type", TypeError),
    (dict(use_profiler=True), "use_profiler", NotImplementedError),
    (dict(lse_mode="base10"), "lse_mode", ValueError),
])
def test_flashinfer_plan_errors_name_the_argument(change, name, error) -> None:
    w = BatchMLAPagedAttentionWrapper(torch.empty(8, dtype=torch.uint8))
    with pytest.raises(error, match=f"^{name}"):
        w.plan(**plan_args(**change))


def test_flashinfer_plan_missing_arguments_and_constructor_errors() -> None:
    w = BatchMLAPagedAttentionWrapper(torch.empty(8, dtype=torch.uint8))
    with pytest.raises(TypeError, match="missing required arguments: sm_scale"):
        w.plan(**{k: v for k, v in plan_args().items() if k != "sm_scale"})
    with pytest.raises(RuntimeError, match="before plan"):
        w.run(torch.zeros(2, 16, 512), torch.zeros(2, 16, 64), torch.zeros(1, 64, 512), torch.zeros(1, 64, 64))
    with pytest.raises(ValueError, match="^backend"):
        BatchMLAPagedAttentionWrapper(torch.empty(8, dtype=torch.uint8), backend="triton")
    with pytest.raises(ValueError, match="^float_workspace_buffer"):
        BatchMLAPagedAttentionWrapper(None)
    with pytest.raises(ValueError, match="^kv_indices"):
        BatchMLAPagedAttentionWrapper(torch.empty(8, dtype=torch.uint8), True,
                                      torch.zeros(3, dtype=torch.int32), torch.zeros(3, dtype=torch.int32))
    assert set(flashinfer.BACKENDS) >= {"auto", "fa2", "fa3"}


# -- the adapters' views, reshapes and plans on the CPU: a stand-in wrapper runs the ops' torch form
class TorchWrapper:
    """Stands in for a planned MLADecodeWrapper: checks the inputs against the plan key, runs the
    float32 torch form of mla_decode into out/lse."""

    def __init__(self, key: tuple):
        self.key = key

    def run(self, q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens, *, out=None, lse=None):
        from mla_gen.ops import _torch_decode

        _, _, batch, s_q, heads, ckv, rope, dtype, page, max_pages, sm_scale = self.key
        assert q_nope.shape == (batch, s_q, heads, ckv) and q_pe.shape == (batch, s_q, heads, rope)
        assert q_nope.dtype == dtype and ckv_cache.shape[1:] == (page, ckv) and kpe_cache.shape[1:] == (page, rope)
        assert block_table.shape == (batch, max_pages) and block_table.dtype == torch.int32
        assert out.shape == (batch, s_q, heads, ckv) and (lse is None or lse.shape == (batch, s_q, heads))
        assert ckv_cache.data_ptr() != 0 and kpe_cache.stride(-1) == 1
        o, l_ = _torch_decode(q_nope, q_pe, ckv_cache, kpe_cache, block_table, cache_seqlens, sm_scale)
        out.copy_(o)
        if lse is not None:
            lse.copy_(l_)
        return out

    def schedule(self):
        return torch.zeros(1, 4, dtype=torch.int32), torch.zeros(1, 4, dtype=torch.int32)


@pytest.fixture
def torch_plans(monkeypatch: pytest.MonkeyPatch):
    import collections

    from mla_gen.compat import _plans

    made = []

    def new_wrapper(key):
        made.append(key)
        return TorchWrapper(key)

    monkeypatch.setattr(_plans, "plan_key", lambda device, *rest: (-1, 0, *rest))
    monkeypatch.setattr(_plans, "new_wrapper", new_wrapper)
    monkeypatch.setattr(_plans, "_cache", collections.OrderedDict())
    monkeypatch.setattr(_plans, "_pinned", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    return made


def cpu_inputs(lengths, *, s_q=1, heads=4, ckv=512, rope=64, page=16, seed=0):
    from mla_gen.testing import make_inputs

    return make_inputs(lengths, heads=heads, ckv=ckv, rope=rope, s_q=s_q, page_size=page, combined=True,
                       generator=torch.Generator().manual_seed(seed))


def assert_close(out, lse, inp, q_nope=None, q_pe=None):
    from mla_gen.reference import mla_decode_reference

    ref, ref_lse = mla_decode_reference(q_nope if q_nope is not None else inp.q_nope,
                                        q_pe if q_pe is not None else inp.q_pe, *inp.args()[2:])
    assert float((out.double() - ref).abs().max()) <= 2e-2 * float(ref.abs().max())
    assert float((lse.double() - ref_lse).abs().max()) <= 1e-4


@pytest.mark.parametrize("dims", [(512, 64), (256, 32)], ids=["512", "256"])
@pytest.mark.parametrize("s_q, causal", [(1, True), (2, True), (2, False)])
def test_flash_mla_adapter_views_and_plans(torch_plans, s_q, causal, dims) -> None:
    inp = cpu_inputs([3, 40, 17], s_q=s_q, ckv=dims[0], rope=dims[1], seed=s_q)
    meta = get_mla_metadata()[0]
    k_cache = inp.kv.unsqueeze(2)
    for _ in range(2):  # reused: planned once
        out, lse = flash_mla_with_kvcache(inp.q, k_cache, inp.block_table, inp.cache_seqlens, dims[0], meta,
                                          softmax_scale=inp.sm_scale, causal=causal)
    assert len(torch_plans) == 1 and meta.have_initialized and meta.config.s_q == s_q
    assert out.shape == inp.q_nope.shape and lse.shape == (3, 4, s_q) and lse.stride() == (s_q * 4, 1, 4)
    if causal:
        assert_close(out, lse.transpose(1, 2), inp)
    else:  # every new token sees the whole cache: the s_q x H rows of one token
        b, s, h, _ = inp.q_nope.shape
        assert_close(out.reshape(b, 1, s * h, -1), lse.transpose(1, 2).reshape(b, 1, s * h), inp,
                     inp.q_nope.reshape(b, 1, s * h, -1), inp.q_pe.reshape(b, 1, s * h, -1))
    # the older convention: tensors in, the shared plan of this shape reused
    out2, lse2 = flash_mla_with_kvcache(inp.q, k_cache, inp.block_table, inp.cache_seqlens, dims[0],
                                        torch.zeros(2, 8, dtype=torch.int32), torch.arange(4, dtype=torch.int32),
                                        inp.sm_scale, causal)
    assert torch.equal(out2, out) and torch.equal(lse2, lse) and len(torch_plans) == 1


def fi_csr(inp, s_q):
    page = inp.ckv_cache.shape[1]
    lens = inp.cache_seqlens
    npages = (lens + page - 1) // page
    kv_indptr = torch.zeros(lens.shape[0] + 1, dtype=torch.int32)
    kv_indptr[1:] = torch.cumsum(npages, 0)
    used = torch.arange(inp.block_table.shape[1])[None, :] < npages[:, None]
    return (torch.arange(lens.shape[0] + 1, dtype=torch.int32) * s_q, kv_indptr,
            inp.block_table[used].to(torch.int32), lens)


@pytest.mark.parametrize("s_q, causal", [(1, True), (2, True), (3, False)])
def test_flashinfer_adapter_views_and_plans(torch_plans, s_q, causal) -> None:
    inp = cpu_inputs([5, 70, 33, 16], s_q=s_q, seed=10 + s_q)
    b, _, h, _ = inp.q_nope.shape
    w = BatchMLAPagedAttentionWrapper(torch.empty(8, dtype=torch.uint8))
    w.plan(*fi_csr(inp, s_q), h, 512, 64, 16, causal, inp.sm_scale, torch.bfloat16, torch.bfloat16)
    q_nope, q_pe = inp.q_nope.reshape(b * s_q, h, -1), inp.q_pe.reshape(b * s_q, h, -1)
    out, lse2 = w.run(q_nope, q_pe, inp.ckv_cache, inp.kpe_cache, return_lse=True)
    assert out.shape == (b * s_q, h, 512) and lse2.shape == (b * s_q, h)
    out_p, lse_e = w.run(query=inp.q.reshape(b * s_q, h, -1), kv_cache=inp.kv, return_lse=True,
                         return_lse_base_on_e=True)
    assert torch.equal(out_p, out) and torch.allclose(lse2 * math.log(2), lse_e, atol=1e-5)
    if causal:
        assert_close(out.view(b, s_q, h, -1), lse_e.view(b, s_q, h), inp)
    else:
        assert_close(out.view(b, 1, s_q * h, -1), lse_e.view(b, 1, s_q * h), inp,
                     inp.q_nope.reshape(b, 1, s_q * h, -1), inp.q_pe.reshape(b, 1, s_q * h, -1))
    buf = torch.empty_like(out)
    assert w.run(q_nope, q_pe, inp.ckv_cache, inp.kpe_cache, out=buf) is buf and torch.equal(buf, out)


def test_flashinfer_adapter_graph_mode_replans_in_place(torch_plans) -> None:
    batch, s_q = 3, 1
    bufs = dict(qo_indptr=torch.zeros(batch + 1, dtype=torch.int32), kv_indptr=torch.zeros(batch + 1, dtype=torch.int32),
                kv_indices=torch.zeros(300, dtype=torch.int32), kv_len_arr=torch.zeros(batch, dtype=torch.int32))
    w = BatchMLAPagedAttentionWrapper(torch.empty(8, dtype=torch.uint8), True, **bufs)
    pointers = None
    for step, lengths in enumerate(([5, 70, 33], [90, 1, 200], [16, 17, 300])):
        inp = cpu_inputs(lengths, seed=step)
        w.plan(*fi_csr(inp, s_q), 4, 512, 64, 16, True, inp.sm_scale, torch.bfloat16, torch.bfloat16)
        now = (w._block_table.data_ptr(), w._seqlens.data_ptr())
        assert pointers in (None, now)  # a captured run keeps reading the same buffers
        pointers = now
        assert torch.equal(bufs["kv_len_arr"], inp.cache_seqlens)
        out, lse = w.run(inp.q_nope.reshape(batch, 4, -1), inp.q_pe.reshape(batch, 4, -1), inp.ckv_cache,
                         inp.kpe_cache, return_lse=True, return_lse_base_on_e=True)
        assert_close(out.view(batch, 1, 4, -1), lse.view(batch, 1, 4), inp)
    assert len(torch_plans) == 1 and w._block_table.shape[1] == 100  # len(kv_indices) / batch
    with pytest.raises(ValueError, match="^qo_indptr: CUDA graph mode fixes"):
        w.plan(*fi_csr(inp, s_q), 8, 512, 64, 16, True, inp.sm_scale, torch.bfloat16, torch.bfloat16)


@pytest.mark.parametrize("causal", [True, False])
def test_flashinfer_adapter_ragged_queries(torch_plans, causal) -> None:
    """Requests with 1, 3, 2 and 3 query tokens: the last n_b of each request's 3 are its queries."""
    S, n = 3, [1, 3, 2, 3]
    inp = cpu_inputs([5, 70, 33, 16], s_q=S, seed=7)
    b, _, h, _ = inp.q_nope.shape
    qo = torch.tensor([0] + n, dtype=torch.int32).cumsum(0).to(torch.int32)
    _, kv_indptr, kv_indices, lens = fi_csr(inp, S)
    q_nope = torch.cat([inp.q_nope[r, S - k:] for r, k in enumerate(n)])
    q_pe = torch.cat([inp.q_pe[r, S - k:] for r, k in enumerate(n)])
    w = BatchMLAPagedAttentionWrapper(torch.empty(8, dtype=torch.uint8))
    w.plan(qo, kv_indptr, kv_indices, lens, h, 512, 64, 16, causal, inp.sm_scale, torch.bfloat16, torch.bfloat16)
    out, lse = w.run(q_nope, q_pe, inp.ckv_cache, inp.kpe_cache, return_lse=True, return_lse_base_on_e=True)
    assert out.shape == (sum(n), h, 512) and lse.shape == (sum(n), h)
    from mla_gen.reference import mla_decode_reference

    for r, k in enumerate(n):
        rows = slice(int(qo[r]), int(qo[r + 1]))
        if causal:  # the last k of S causal queries see what k causal queries see
            ref, ref_lse = mla_decode_reference(*inp.args())
            want, want_lse = ref[r, S - k:], ref_lse[r, S - k:]
        else:
            one = dict(q_nope=q_nope[rows].reshape(1, 1, k * h, -1), q_pe=q_pe[rows].reshape(1, 1, k * h, -1))
            ref, ref_lse = mla_decode_reference(one["q_nope"], one["q_pe"], inp.ckv_cache, inp.kpe_cache,
                                                inp.block_table[r:r + 1], inp.cache_seqlens[r:r + 1], inp.sm_scale)
            want, want_lse = ref.view(k, h, -1), ref_lse.view(k, h)
        assert float((out[rows].double() - want).abs().max()) <= 2e-2 * float(want.abs().max())
        assert float((lse[rows].double() - want_lse).abs().max()) <= 1e-4
