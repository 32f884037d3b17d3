"""Float64 reference of absorbed MLA decode over the same paged inputs the kernels read.

    s[h, t] = sm_scale * (q_nope[h] . ckv[t] + q_pe[h] . kpe[t])
    o[h]    = softmax_t(s[h]) @ ckv           lse[h] = log(sum_t exp(s[h, t]))

Query token i of a request (s_q new tokens, the last s_q of its cache) sees cache positions
t < seqlen - s_q + i + 1. Computed on the inputs' device in float64. fp8 caches (as mla_decode takes
them) are read through mla_gen.fp8.dequantize: the reference of an fp8 kernel is exact on the cache's
values, so its error is the kernel's own.
"""
from __future__ import annotations

import torch

from mla_gen import fp8


def gather_pages(cache: torch.Tensor, block_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """Tokens 0..length-1 of one request from a paged cache [num_pages, page_size, D] -> [length, D]."""
    page_size = cache.shape[1]
    n_pages = -(-length // page_size)
    pages = block_table_row[:n_pages].long()
    return cache[pages].reshape(n_pages * page_size, cache.shape[2])[:length]


def causal_mask(s_q: int, length: int, device: torch.device) -> torch.Tensor:
    """[s_q, length] bool: query token i sees positions t < length - s_q + i + 1."""
    t = torch.arange(length, device=device)
    limit = length - s_q + torch.arange(s_q, device=device) + 1
    return t[None, :] < limit[:, None]


def mla_decode_reference(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor,
                         kpe_cache: torch.Tensor | None, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                         sm_scale: float, kv_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """out [B, s_q, H, C] and lse [B, s_q, H] (natural log), both float64. An fp8_e4m3 cache comes with
    its kv_scale; an fp8_ds_mla cache is ckv_cache alone (kpe_cache None)."""
    if kpe_cache is None or ckv_cache.dtype == torch.float8_e4m3fn:
        ckv_cache, kpe_cache = fp8.dequantize(ckv_cache, kpe_cache, kv_scale)
    batch, s_q, heads, ckv_dim = q_nope.shape
    out = torch.empty(batch, s_q, heads, ckv_dim, dtype=torch.float64, device=q_nope.device)
    lse = torch.empty(batch, s_q, heads, dtype=torch.float64, device=q_nope.device)
    lengths = cache_seqlens.tolist()
    for b, length in enumerate(lengths):
        ckv = gather_pages(ckv_cache, block_table[b], length).double()
        kpe = gather_pages(kpe_cache, block_table[b], length).double()
        scores = (torch.einsum("shc,tc->sht", q_nope[b].double(), ckv)
                  + torch.einsum("shr,tr->sht", q_pe[b].double(), kpe)) * sm_scale
        mask = causal_mask(s_q, length, q_nope.device)[:, None, :]
        scores = scores.masked_fill(~mask, float("-inf"))
        lse[b] = torch.logsumexp(scores, dim=-1)
        out[b] = torch.einsum("sht,tc->shc", torch.softmax(scores, dim=-1), ckv)
    return out, lse
