"""One MLA layer case for test_layer.py and test_layer_gpu.py: a float64 reference layer and a
layer in the dtype under test holding the same (rounded) weights, each with its own paged cache
prefilled with the same context through append_kv, scattered pages, NaN in every slot no request
may read, and unused block-table columns pointing at a NaN page. With kv_dtype, the layer's cache is fp8
and the reference reads a copy of it (the same codes, quantized from the layer's own latents)."""
from __future__ import annotations

import copy
import dataclasses

import torch

from mla_gen.layer import LatentCache, MLAAttention


@dataclasses.dataclass
class LayerCase:
    ref: MLAAttention          # float64, weights = the test layer's upcast
    layer: MLAAttention        # the dtype under test
    ref_cache: LatentCache
    cache: LatentCache
    block_table: torch.Tensor  # int32 [B, max_pages]
    cache_seqlens: torch.Tensor  # int32 [B], tokens cached before the step
    x: torch.Tensor            # [B, s_q, hidden] in the layer's dtype
    x_ref: torch.Tensor        # the same values in float64
    context: list[torch.Tensor]  # per request, the cached tokens' hidden states, float64 [n, hidden]


def build_case(preset: str, lengths: list[int], *, s_q: int, page_size: int = 16, hidden_size: int = 256,
               head_range: tuple[int, int] | None = None, dtype: torch.dtype = torch.float64,
               device: str = "cpu", seed: int = 0, kv_dtype: str | None = None,
               kv_scale: float | None = None) -> LayerCase:
    g = torch.Generator().manual_seed(seed)
    ref = MLAAttention(preset, hidden_size=hidden_size, head_range=head_range, dtype=torch.float64,
                       device=device, generator=g)
    layer = ref if dtype == torch.float64 else copy.deepcopy(ref).to(dtype)
    if layer is not ref:
        ref.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    batch = len(lengths)
    pages_per = [-(-(n + s_q) // page_size) for n in lengths]
    num_pages = sum(pages_per) + 3 + 1  # three spare pages, the last one the poison page
    perm = torch.randperm(num_pages - 1, generator=g).tolist()
    block_table = torch.full((batch, max(pages_per) + 1), num_pages - 1, dtype=torch.int32)
    cursor = 0
    for b, n in enumerate(pages_per):
        block_table[b, :n] = torch.tensor(perm[cursor:cursor + n], dtype=torch.int32)
        cursor += n
    block_table = block_table.to(device)
    cache = layer.new_cache(num_pages, page_size, fill=float("nan"), kv_dtype=kv_dtype, kv_scale=kv_scale)
    ref_cache = ref.new_cache(num_pages, page_size, fill=float("nan"))
    context = torch.randn(batch, max(max(lengths), 1), hidden_size, generator=g).to(dtype)
    zero = torch.zeros(1, dtype=torch.int32, device=device)
    for b, n in enumerate(lengths):
        if n:
            ctx = context[b:b + 1, :n].to(device)
            layer.append_kv(ctx, cache, block_table[b:b + 1], zero)
            ref.append_kv(ctx.double(), ref_cache, block_table[b:b + 1], zero)
    if kv_dtype is not None:
        ref_cache = copy.deepcopy(cache)
    x = torch.randn(batch, s_q, hidden_size, generator=g).to(dtype).to(device)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    ctx64 = [context[b, :n].double() for b, n in enumerate(lengths)]
    return LayerCase(ref, layer, ref_cache, cache, block_table, seqlens, x, x.double(), ctx64)
