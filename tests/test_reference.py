"""The float64 reference against a naive dense softmax attention written with explicit loops."""
import math

import pytest
import torch

from mla_gen.reference import mla_decode_reference
from mla_gen.testing import make_inputs


def naive_attention(inp, b: int, i: int, h: int) -> tuple[list[float], float]:
    """One query row: scores over the visible cache tokens, softmax, weighted sum of ckv rows."""
    length = int(inp.cache_seqlens[b])
    s_q = inp.q_nope.shape[1]
    page = inp.ckv_cache.shape[1]
    visible = length - s_q + i + 1
    scores, rows = [], []
    for t in range(visible):
        pid = int(inp.block_table[b, t // page])
        ckv = inp.ckv_cache[pid, t % page].double()
        kpe = inp.kpe_cache[pid, t % page].double()
        dot = float(inp.q_nope[b, i, h].double() @ ckv + inp.q_pe[b, i, h].double() @ kpe)
        scores.append(dot * inp.sm_scale)
        rows.append(ckv)
    m = max(scores)
    weights = [math.exp(s - m) for s in scores]
    total = sum(weights)
    out = sum(w * r for w, r in zip(weights, rows)) / total
    return out.tolist(), m + math.log(total)


@pytest.mark.parametrize("s_q,page_size,lengths", [(1, 1, [1, 5, 2]), (2, 3, [2, 7, 9]), (3, 4, [3, 4, 13])])
def test_reference_matches_naive_attention(s_q, page_size, lengths):
    g = torch.Generator().manual_seed(1000 + s_q)
    inp = make_inputs(lengths, heads=3, ckv=32, rope=16, s_q=s_q, page_size=page_size, dtype=torch.float32,
                      generator=g, sm_scale=0.3)
    out, lse = mla_decode_reference(*inp.args())
    assert out.dtype == torch.float64 and not out.isnan().any()
    for b in range(len(lengths)):
        for i in range(s_q):
            for h in range(3):
                want, want_lse = naive_attention(inp, b, i, h)
                assert torch.allclose(out[b, i, h], torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
                assert abs(float(lse[b, i, h]) - want_lse) < 1e-12


def test_reference_causal_rows_differ():
    """Query token 0 of an s_q=2 request must not see the last cache token; token 1 must."""
    g = torch.Generator().manual_seed(7)
    inp = make_inputs([6], heads=1, ckv=16, rope=16, s_q=2, page_size=4, dtype=torch.float32, generator=g)
    out, _ = mla_decode_reference(*inp.args())
    inp.q_nope[0, 1] = inp.q_nope[0, 0]
    inp.q_pe[0, 1] = inp.q_pe[0, 0]
    out2, _ = mla_decode_reference(*inp.args())
    assert not torch.allclose(out2[0, 0], out2[0, 1])  # same query, different visible ranges
    assert torch.allclose(out2[0, 0], out[0, 0])
