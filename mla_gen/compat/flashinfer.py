"""FlashInfer's BatchMLAPagedAttentionWrapper (flashinfer-python 0.7.2, flashinfer/mla/_batch_mla/_wrapper.py)
on mla-gen's kernels.

    from mla_gen.compat.flashinfer import BatchMLAPagedAttentionWrapper   # was: from flashinfer.mla import ...

    w = BatchMLAPagedAttentionWrapper(torch.empty(128 << 20, dtype=torch.uint8, device="cuda"))
    w.plan(qo_indptr, kv_indptr, kv_indices, kv_len_arr, num_heads, 512, 64, page_size, True, sm_scale,
           torch.bfloat16, torch.bfloat16)
    out = w.run(q_nope, q_pe, ckv_cache, kpe_cache)            # q_nope [nnz, H, 512], ckv_cache [pages, page, 512]
    out, lse = w.run(q_nope, q_pe, ckv_cache, kpe_cache, return_lse=True)    # lse [nnz, H], base 2 as FlashInfer's

plan() reads the CSR lists on the host (as FlashInfer's plan does) and turns kv_indptr/kv_indices
into a [batch, width] block table on the GPU; run() reads the caches through views. With the same
number of query tokens per request (uniform qo_indptr), run() reads q and writes out in place
(views); with ragged qo_indptr (e.g. speculative tokens), each request's queries are gathered into
S = max query tokens rows (causal: the request's queries last, so each request needs >= S tokens)
and the outputs gathered back: two small copies of q's and out's size, through index tensors
built on the GPU in plan. The dense form of 0.7.2 (cum_seq_lens_q=, block_tables=, seq_lens=) is taken too.
With use_cuda_graph=True the batch, s_q and the block table's address are fixed by the first
plan (width max(len(kv_indices buffer) / batch, that plan's longest page list)); later plans
rewrite lengths and page lists in place, so a captured run() replays with them. Beyond FlashInfer's
fa2/fa3: 512/64 and 256/32 head dims, fp16, causal=False with several query tokens (up to 128 rows).
`backend` accepts FlashInfer's names; every one runs mla-gen's kernels. workspace: unused (plans own theirs).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from mla_gen.api import MLADecodeWrapper
from mla_gen.compat import _plans
from mla_gen.dtypes import KERNEL_DTYPES

BACKENDS = ("auto", "fa2", "fa3", "cutlass", "cutile", "trtllm-gen", "xqa", "cute-dsl", "cute-dsl-monolithic",
            "cute-dsl-modular")
_LOG2E = 1.0 / math.log(2.0)


def _int_vector(name: str, t: object, length: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype not in (torch.int32, torch.int64):
        got = f"shape {tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected a 1-D int32 tensor, got {got}")
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{name}: expected {length} entries, got {t.shape[0]}")
    return t


def _reject(**options: object) -> None:
    for name, value in options.items():
        if value is not None and value is not False:
            raise NotImplementedError(f"{name}: not supported by mla-gen's FlashInfer adapter (bf16/fp16 in and out, "
                                      f"no fp8 scales, sinks, profiler or skip-softmax); got {name}={value!r}")


class BatchMLAPagedAttentionWrapper:
    """FlashInfer's MLA paged-attention wrapper: plan per step (or per capture), run per layer."""

    def __init__(self, float_workspace_buffer: torch.Tensor, use_cuda_graph: bool = False,
                 qo_indptr: Optional[torch.Tensor] = None, kv_indptr: Optional[torch.Tensor] = None,
                 kv_indices: Optional[torch.Tensor] = None, kv_len_arr: Optional[torch.Tensor] = None,
                 backend: str = "auto") -> None:
        """Raises ValueError naming a bad argument (an unknown backend; in CUDA-graph mode a missing or
        mis-shaped buffer)."""
        if not isinstance(float_workspace_buffer, torch.Tensor):
            raise ValueError(f"float_workspace_buffer: expected a torch.Tensor, got "
                             f"{type(float_workspace_buffer).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {', '.join(repr(b) for b in BACKENDS)}, got {backend!r}")
        self._float_workspace_buffer = float_workspace_buffer
        self.device = float_workspace_buffer.device
        self._use_cuda_graph = bool(use_cuda_graph)
        self._backend = backend
        self._bufs = {"qo_indptr": qo_indptr, "kv_indptr": kv_indptr, "kv_indices": kv_indices,
                      "kv_len_arr": kv_len_arr}
        if self._use_cuda_graph:
            for name, t in self._bufs.items():
                if t is None:
                    raise ValueError(f"{name}: CUDA graph mode needs the reserved qo_indptr, kv_indptr, kv_indices "
                                     f"and kv_len_arr buffers")
                _int_vector(name, t)
                if t.device != self.device:
                    raise ValueError(f"{name}: expected a buffer on {self.device} (the workspace's device), "
                                     f"got {t.device}")
            batch = qo_indptr.shape[0] - 1
            _int_vector("kv_indptr", kv_indptr, batch + 1)
            _int_vector("kv_len_arr", kv_len_arr, batch)
        self._wrapper: MLADecodeWrapper | None = None
        self._key: tuple | None = None
        self._block_table: torch.Tensor | None = None
        self._seqlens: torch.Tensor | None = None
        self._shape: tuple | None = None  # (batch, nnz, heads, ckv, kpe, rows_sq, rows_h)
        self._pad: dict[str, torch.Tensor] | None = None  # ragged queries: gather indices and padded buffers
        self._lse_base_e = False

    # ------------------------------------------------------------------------------------- plan
    def plan(self, qo_indptr: Optional[torch.Tensor] = None, kv_indptr: Optional[torch.Tensor] = None,
             kv_indices: Optional[torch.Tensor] = None, kv_len_arr: Optional[torch.Tensor] = None,
             num_heads: Optional[int] = None, head_dim_ckv: Optional[int] = None,
             head_dim_kpe: Optional[int] = None, page_size: Optional[int] = None, causal: Optional[bool] = None,
             sm_scale: Optional[float] = None, q_data_type: Optional[torch.dtype] = None,
             kv_data_type: Optional[torch.dtype] = None, use_profiler: bool = False, *, metadata=None,
             cum_seq_lens_q: Optional[torch.Tensor] = None, block_tables: Optional[torch.Tensor] = None,
             seq_lens: Optional[torch.Tensor] = None, max_q_len: Optional[int] = None,
             query_layout: Optional[str] = None, kv_cache_layout: Optional[str] = None, lse_mode: str = "none",
             output_dtype: Optional[torch.dtype] = None, output_scale: str = "none", scale_mode: str = "default",
             skip_softmax: bool = False, enable_pdl: Optional[bool] = None, use_sinks: bool = False) -> None:
        """FlashInfer's flat CSR form (qo_indptr [B+1], kv_indptr [B+1], kv_indices [pages], kv_len_arr [B];
        host or device int32) or its dense form (cum_seq_lens_q [B+1], block_tables [B, max_pages],
        seq_lens [B]). kv_len_arr counts each request's tokens, its new ones included. Reads the index
        lists on the host (a sync for device tensors). Raises ValueError naming the argument (ragged
        qo_indptr among them), TypeError for a missing one, NotImplementedError for fp8/sinks/profiler."""
        if metadata is not None:
            raise NotImplementedError("metadata: pass the flat CSR (qo_indptr, kv_indptr, kv_indices, kv_len_arr) "
                                      "or dense (cum_seq_lens_q, block_tables, seq_lens) arguments")
        _reject(use_profiler=use_profiler, skip_softmax=skip_softmax, use_sinks=use_sinks,
                output_scale=None if output_scale == "none" else output_scale,
                scale_mode=None if scale_mode == "default" else scale_mode)
        required = {"num_heads": num_heads, "head_dim_ckv": head_dim_ckv, "head_dim_kpe": head_dim_kpe,
                    "page_size": page_size, "causal": causal, "sm_scale": sm_scale, "q_data_type": q_data_type,
                    "kv_data_type": kv_data_type}
        missing = [name for name, value in required.items() if value is None]
        if missing:
            raise TypeError("plan() missing required arguments: " + ", ".join(missing))
        for name, value in (("num_heads", num_heads), ("head_dim_ckv", head_dim_ckv),
                            ("head_dim_kpe", head_dim_kpe), ("page_size", page_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if q_data_type not in KERNEL_DTYPES:
            raise TypeError(f"q_data_type: expected torch.bfloat16 or torch.float16, got {q_data_type!r}")
        if kv_data_type != q_data_type:
            raise TypeError(f"kv_data_type: expected {q_data_type} (q_data_type), got {kv_data_type!r}")
        if output_dtype is not None and output_dtype != q_data_type:
            raise TypeError(f"output_dtype: expected None or {q_data_type} (q_data_type), got {output_dtype!r}")
        for name, value in (("query_layout", query_layout), ("kv_cache_layout", kv_cache_layout)):
            if value not in (None, "packed", "split"):
                raise ValueError(f"{name}: expected 'packed' or 'split', got {value!r}")
        if lse_mode not in ("none", "base2", "basee"):
            raise ValueError(f"lse_mode: expected 'none', 'base2' or 'basee', got {lse_mode!r}")
        self._lse_base_e = lse_mode == "basee"
        dense = cum_seq_lens_q is not None or block_tables is not None or seq_lens is not None
        if dense and any(t is not None for t in (qo_indptr, kv_indptr, kv_indices, kv_len_arr)):
            raise ValueError("qo_indptr: the flat CSR and dense forms cannot be mixed")
        if dense:
            qo_name, qo, lens_name, lens = "cum_seq_lens_q", cum_seq_lens_q, "seq_lens", seq_lens
        else:
            qo_name, qo, lens_name, lens = "qo_indptr", qo_indptr, "kv_len_arr", kv_len_arr
        qo_host = _int_vector(qo_name, qo).to("cpu", torch.int64)
        batch = qo_host.shape[0] - 1
        if batch < 1:
            raise ValueError(f"{qo_name}: expected batch + 1 >= 2 entries, got {qo_host.shape[0]}")
        q_lens = qo_host.diff()
        s_q, nnz = int(q_lens.max()), int(qo_host[-1])  # s_q: the padded query tokens per request
        if int(qo_host[0]) != 0 or int(q_lens.min()) < 1:
            raise ValueError(f"{qo_name}: expected 0 first and at least one query token per request, got "
                             f"{qo_host.tolist()[:9]}")
        ragged = bool((q_lens != s_q).any())
        lens_host = _int_vector(lens_name, lens, batch).to("cpu", torch.int64)
        # causal: a request holds its query tokens (ragged: the padded run of s_q); otherwise one token
        least = (torch.full_like(q_lens, s_q) if ragged else q_lens) if causal else torch.ones_like(q_lens)
        if bool((lens_host < least).any()):
            b = int((lens_host < least).nonzero()[0, 0])
            raise ValueError(f"{lens_name}: length {int(lens_host[b])} of request {b} is shorter than {int(least[b])} "
                             f"(its query tokens{', padded to the longest run of ragged qo_indptr' if ragged else ''}; "
                             f"lengths count the new tokens too)")
        need = (lens_host + page_size - 1) // page_size
        if dense:
            if not isinstance(block_tables, torch.Tensor) or block_tables.dim() != 2 \
                    or block_tables.shape[0] != batch or block_tables.dtype != torch.int32:
                raise ValueError(f"block_tables: expected an int32 tensor [{batch}, max_pages]")
            max_pages = block_tables.shape[1]
            if int(need.max()) > max_pages:
                raise ValueError(f"seq_lens: a request needs {int(need.max())} pages, block_tables has {max_pages}")
        else:
            kv_ptr_host = _int_vector("kv_indptr", kv_indptr, batch + 1).to("cpu", torch.int64)
            _int_vector("kv_indices", kv_indices)
            counts = kv_ptr_host.diff()
            if int(kv_ptr_host[0]) != 0 or bool((counts < 0).any()) or int(kv_ptr_host[-1]) > kv_indices.shape[0]:
                raise ValueError(f"kv_indptr: expected 0 first, non-decreasing, last <= len(kv_indices) "
                                 f"({kv_indices.shape[0]}), got {kv_ptr_host.tolist()[:9]}")
            if bool((need > counts).any()):
                b = int((need > counts).nonzero()[0, 0])
                raise ValueError(f"kv_len_arr: request {b} has {int(lens_host[b])} tokens, which need "
                                 f"{int(need[b])} pages of {page_size}; kv_indptr gives it {int(counts[b])}")
            max_pages = max(int(counts.max()), 1)
        rows_sq, rows_h = (1, s_q * num_heads) if (s_q > 1 and not causal) else (s_q, num_heads)
        shape = (batch, nnz, num_heads, head_dim_ckv, head_dim_kpe, rows_sq, rows_h)
        dev = self.device
        if self._use_cuda_graph and self._wrapper is not None:
            if shape != self._shape or float(sm_scale) != self._key[-1] or q_data_type != self._key[7]:
                raise ValueError(f"qo_indptr: CUDA graph mode fixes batch, query tokens, heads, dims, dtype and "
                                 f"sm_scale at the first plan {self._shape[:5]}, got {shape[:5]}")
            width = self._block_table.shape[1]
            if max_pages > width:
                raise ValueError(f"kv_indptr: a request holds {max_pages} pages; this CUDA-graph wrapper's block "
                                 f"table holds {width} (fixed at the first plan)")
        elif self._use_cuda_graph:
            width = max(max_pages, -(-self._bufs["kv_indices"].shape[0] // batch))
        else:
            width = 1 << (max_pages - 1).bit_length()  # few widths, so few plans
        table = self._table(dense, block_tables, kv_indptr, kv_indices, batch, width, dev)
        seqlens = lens.to(dev, torch.int32)
        if self._use_cuda_graph:
            for name, src in (("qo_indptr", qo), ("kv_indptr", kv_indptr), ("kv_indices", kv_indices),
                              ("kv_len_arr", kv_len_arr)):
                buf = self._bufs[name]
                if src is not None and buf is not None and src.data_ptr() != buf.data_ptr():
                    if src.shape[0] > buf.shape[0]:
                        raise ValueError(f"{name}: {src.shape[0]} entries exceed the reserved buffer's "
                                         f"{buf.shape[0]}")
                    buf[:src.shape[0]].copy_(src, non_blocking=True)
            if self._wrapper is None:
                self._block_table, self._seqlens = table.clone(), seqlens.clone()
            else:
                self._block_table.copy_(table)
                self._seqlens.copy_(seqlens)
        else:
            self._block_table, self._seqlens = table, seqlens.contiguous()
        self._plan_padding(qo_host, s_q, ragged, num_heads, head_dim_ckv, head_dim_kpe, q_data_type, dev)
        key = _plans.plan_key(dev, batch, rows_sq, rows_h, head_dim_ckv, head_dim_kpe, q_data_type, page_size,
                              width, float(sm_scale))
        if self._use_cuda_graph:
            if self._wrapper is None:  # its own plan: workspaces a captured graph keeps using
                self._wrapper = _plans.new_wrapper(key)
        else:
            self._wrapper = _plans.wrapper_for(key)
        self._key, self._shape = key, shape

    def _plan_padding(self, qo_host: torch.Tensor, s_q: int, ragged: bool, heads: int, ckv: int, kpe: int,
                      dtype: torch.dtype, dev: torch.device) -> None:
        """Ragged queries: row b * s_q + i of the padded batch reads query token qo[b] + i - (s_q - n_b)
        (rows before a request's own are padding: any token, their outputs dropped); query token t
        reads its output back from row b * s_q + (s_q - n_b) + j. In CUDA-graph mode the buffers stay,
        their contents are rewritten."""
        if not ragged:
            if self._pad is not None and self._use_cuda_graph:
                raise ValueError("qo_indptr: this CUDA-graph wrapper was planned with ragged query lengths")
            self._pad = None
            return
        batch = qo_host.shape[0] - 1
        starts, q_lens = qo_host[:-1], qo_host.diff()
        i = torch.arange(s_q)
        src = (starts[:, None] + i[None, :] - (s_q - q_lens)[:, None]).clamp_(min=0).reshape(-1)
        req = torch.repeat_interleave(torch.arange(batch), q_lens)
        j = torch.arange(int(qo_host[-1])) - starts[req]
        dst = req * s_q + (s_q - q_lens[req]) + j
        src, dst = src.to(dev), dst.to(dev)
        if self._pad is not None and self._use_cuda_graph:
            self._pad["src"].copy_(src)
            self._pad["dst"].copy_(dst)
            return
        if self._use_cuda_graph and self._wrapper is not None:
            raise ValueError("qo_indptr: this CUDA-graph wrapper was planned with uniform query lengths")
        rows = batch * s_q
        self._pad = {"src": src, "dst": dst,
                     "q_nope": torch.empty(rows, heads, ckv, dtype=dtype, device=dev),
                     "q_pe": torch.empty(rows, heads, kpe, dtype=dtype, device=dev),
                     "out": torch.empty(rows, heads, ckv, dtype=dtype, device=dev),
                     "lse": torch.empty(rows, heads, dtype=torch.float32, device=dev)}

    @staticmethod
    def _table(dense: bool, block_tables, kv_indptr, kv_indices, batch: int, width: int,
               dev: torch.device) -> torch.Tensor:
        """The [batch, width] int32 block table on the GPU: request b's pages kv_indices[kv_indptr[b]:
        kv_indptr[b+1]], then zeros (never read: past the request's length)."""
        if dense:
            table = torch.zeros(batch, width, dtype=torch.int32, device=dev)
            table[:, :block_tables.shape[1]] = block_tables.to(dev)
            return table
        ptr = kv_indptr.to(dev, torch.int64)
        idx = kv_indices.to(dev, torch.int32)
        j = torch.arange(width, device=dev)
        count = (ptr[1:] - ptr[:-1])[:, None]
        at = (ptr[:-1, None] + j[None, :]).clamp_(max=max(idx.shape[0] - 1, 0))
        if idx.shape[0] == 0:
            return torch.zeros(batch, width, dtype=torch.int32, device=dev)
        return torch.where(j[None, :] < count, idx[at], 0).to(torch.int32)

    # -------------------------------------------------------------------------------------- run
    def run(self, q_nope: Optional[torch.Tensor] = None, q_pe: Optional[torch.Tensor] = None,
            ckv_cache: Optional[torch.Tensor] = None, kpe_cache: Optional[torch.Tensor] = None,
            out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None, return_lse: bool = False,
            profiler_buffer: Optional[torch.Tensor] = None, kv_len: Optional[torch.Tensor] = None,
            page_table: Optional[torch.Tensor] = None, return_lse_base_on_e: bool = False,
            o_scale: Optional[float] = None, *, query=None, kv_cache=None, ckv_scale: Optional[float] = None,
            ckv_scale_arr: Optional[torch.Tensor] = None, kpe_scale: Optional[float] = None,
            sinks: Optional[torch.Tensor] = None, skip_softmax_threshold_scale_factor: Optional[float] = None,
            bmm1_scale=None, bmm2_scale=None):
        """q_nope [nnz, H, ckv], q_pe [nnz, H, kpe] (or query= one packed [nnz, H, ckv+kpe] tensor or a
        pair); ckv_cache [pages, page, ckv], kpe_cache [pages, page, kpe] (or kv_cache= packed or a pair).
        Returns out [nnz, H, ckv] (`out` itself when given), and lse [nnz, H] fp32 when return_lse or
        lse= (base 2 as FlashInfer's, natural log with return_lse_base_on_e or lse_mode='basee').
        No allocation when out (and lse) are given; no host sync."""
        _reject(profiler_buffer=profiler_buffer, kv_len=kv_len, page_table=page_table, o_scale=o_scale,
                ckv_scale=ckv_scale, ckv_scale_arr=ckv_scale_arr, kpe_scale=kpe_scale, sinks=sinks,
                skip_softmax_threshold_scale_factor=skip_softmax_threshold_scale_factor, bmm1_scale=bmm1_scale,
                bmm2_scale=bmm2_scale)
        if self._wrapper is None:
            raise RuntimeError("BatchMLAPagedAttentionWrapper.run() called before plan()")
        batch, nnz, heads, ckv, kpe, rows_sq, rows_h = self._shape
        q_nope, q_pe = self._split("query", query, q_nope, q_pe, ckv, kpe, ("q_nope", "q_pe"))
        ckv_cache, kpe_cache = self._split("kv_cache", kv_cache, ckv_cache, kpe_cache, ckv, kpe,
                                           ("ckv_cache", "kpe_cache"))
        for name, t in (("q_nope", q_nope), ("q_pe", q_pe)):
            if t.dim() != 3 or t.shape[0] != nnz or t.shape[1] != heads:
                raise ValueError(f"{name}: expected [{nnz}, {heads}, dim] (the plan's query tokens and heads), "
                                 f"got shape {tuple(t.shape)}")
        if out is None:
            out = q_nope.new_empty(nnz, heads, ckv)
        want_lse = return_lse or lse is not None
        if want_lse and lse is None:
            lse = torch.empty(nnz, heads, dtype=torch.float32, device=q_nope.device)
        for name, t, shape in (("out", out, (nnz, heads, ckv)), ("lse", lse, (nnz, heads))):
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
        four = (batch, rows_sq, rows_h)
        pad = self._pad
        if pad is None:  # uniform queries: views in, views out
            self._wrapper.run(q_nope.reshape(*four, ckv), q_pe.reshape(*four, kpe), ckv_cache, kpe_cache,
                              self._block_table, self._seqlens, out=out.view(*four, ckv),
                              lse=lse.view(four) if lse is not None else None)
        else:  # ragged: gather into the padded rows, run, gather the real rows back
            torch.index_select(q_nope, 0, pad["src"], out=pad["q_nope"])
            torch.index_select(q_pe, 0, pad["src"], out=pad["q_pe"])
            self._wrapper.run(pad["q_nope"].view(*four, ckv), pad["q_pe"].view(*four, kpe), ckv_cache, kpe_cache,
                              self._block_table, self._seqlens, out=pad["out"].view(*four, ckv),
                              lse=pad["lse"].view(four) if lse is not None else None)
            out.copy_(pad["out"].index_select(0, pad["dst"]))
            if lse is not None:
                lse.copy_(pad["lse"].index_select(0, pad["dst"]))
        if not self._use_cuda_graph:
            _plans.pin_if_capturing(self._key, self._wrapper)
        if not want_lse:
            return out
        if not (return_lse_base_on_e or self._lse_base_e):
            lse.mul_(_LOG2E)
        return out, lse

    @staticmethod
    def _split(name: str, packed, first, second, ckv: int, kpe: int, names: tuple[str, str]):
        if packed is None:
            for n, t in zip(names, (first, second)):
                if not isinstance(t, torch.Tensor):
                    raise ValueError(f"{n}: expected a tensor (or pass {name}=), got {type(t).__name__}")
            return first, second
        if first is not None or second is not None:
            raise TypeError(f"{name}: pass either {name}= or {names[0]}/{names[1]}, not both")
        if isinstance(packed, (tuple, list)) and len(packed) == 2:
            return packed[0], packed[1]
        if not isinstance(packed, torch.Tensor) or packed.shape[-1] != ckv + kpe:
            raise ValueError(f"{name}: expected a packed tensor [..., {ckv + kpe}] or a ({names[0]}, {names[1]}) "
                             f"pair, got {type(packed).__name__}")
        return packed[..., :ckv], packed[..., ckv:]


__all__ = ["BatchMLAPagedAttentionWrapper"]
