"""mla_gen.compat on the CPU: the adapters' signatures against the upstream ones (kept here as data,
read from flash_mla/flash_mla_interface.py at deepseek-ai/FlashMLA main 9241ae3 and its older
revision c28eca9, and flashinfer-python 0.7.2.post1 flashinfer/mla/_batch_mla/_wrapper.py), and
argument errors that name the argument. The GPU side: test_engines_gpu.py."""
from __future__ import annotations

import inspect

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
    (dict(qo_indptr=torch.tensor([0, 1, 3], dtype=torch.int32)), "qo_indptr", ValueError),   # ragged
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
