"""Property-based checks of the runtime's argument validation (hypothesis): arbitrary shapes, dtypes,
strides, devices, lengths and scalars given to mla_decode and MLADecodeWrapper never crash and always
raise TypeError/ValueError whose message starts with the argument's name, or (on a GPU) run and
agree with the float64 reference."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import mla_gen
from mla_gen.reference import mla_decode_reference
from mla_gen.testing import accuracy_problems, make_inputs

TENSORS = ("q_nope", "q_pe", "ckv_cache", "kpe_cache", "block_table", "cache_seqlens")
NAMED = re.compile(r"^(q_nope|q_pe|ckv_cache|kpe_cache|block_table|cache_seqlens|sm_scale|out|lse|family|"
                   r"num_parts|device|dtype|s_q|num_heads|ckv_dim|rope_dim|page_size|max_pages)(/q_pe)?: ")
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int32, torch.int64, torch.uint8,
          torch.bool]
ODD_VALUES = [None, 1, 2.5, "tensor", [1, 2], (3,), np.zeros(3, dtype=np.float32), object()]
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def base_inputs(draw, device: str, heads=st.integers(1, 6), dims=st.sampled_from([(16, 16), (32, 16), (64, 32)])):
    s_q = draw(st.integers(1, 3))
    lengths = draw(st.lists(st.integers(s_q, 40), min_size=1, max_size=3))
    ckv, rope = draw(dims)
    seed = draw(st.integers(0, 2**16))
    return make_inputs(lengths, heads=draw(heads), ckv=ckv, rope=rope, s_q=s_q, page_size=draw(st.sampled_from([1, 4, 16])),
                       dtype=draw(st.sampled_from([torch.bfloat16, torch.float16])), device=device,
                       combined=draw(st.booleans()), generator=torch.Generator().manual_seed(seed))


def _mutate_tensor(draw, t: torch.Tensor) -> object:
    kind = draw(st.sampled_from(["dtype", "transpose", "narrow", "reshape", "resize", "replace", "meta",
                                 "expand", "cpu", "zero-size"]))
    if kind == "dtype":
        return t.to(draw(st.sampled_from(DTYPES)))
    if kind == "transpose" and t.dim() >= 2:
        i, j = draw(st.integers(0, t.dim() - 1)), draw(st.integers(0, t.dim() - 1))
        return t.transpose(i, j)
    if kind == "narrow" and t.dim() >= 1:
        d = draw(st.integers(0, t.dim() - 1))
        if t.shape[d] > 1:
            start = draw(st.integers(1, t.shape[d] - 1))
            return t.narrow(d, start, t.shape[d] - start)
    if kind == "reshape":
        return t.reshape(-1) if draw(st.booleans()) else t.unsqueeze(draw(st.integers(0, t.dim())))
    if kind == "resize" and t.dim() >= 1:
        shape = list(t.shape)
        shape[draw(st.integers(0, t.dim() - 1))] = draw(st.integers(0, 70))
        return torch.zeros(shape, dtype=t.dtype, device=t.device)
    if kind == "replace":
        return draw(st.sampled_from(ODD_VALUES))
    if kind == "meta":
        return t.to("meta")
    if kind == "expand" and t.dim() >= 1 and t.shape[0] > 0:
        return t[:1].expand(*((3,) + tuple(t.shape[1:])))
    if kind == "zero-size" and t.dim() >= 1:
        return t[:0]
    return t if t.is_meta else t.cpu()  # the GPU variant: one tensor left on the host


@st.composite
def calls(draw, device: str, **inputs_kw):
    """kwargs for mla_decode: valid inputs with 0..3 mutations (types, dtypes, shapes, strides, devices,
    lengths, page ids, scalars, out/lse, dispatch overrides)."""
    inp = draw(base_inputs(device, **inputs_kw))
    kw = dict(q_nope=inp.q_nope, q_pe=inp.q_pe, ckv_cache=inp.ckv_cache, kpe_cache=inp.kpe_cache,
              block_table=inp.block_table, cache_seqlens=inp.cache_seqlens, sm_scale=inp.sm_scale)
    kw["check_values"] = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        what = draw(st.sampled_from(TENSORS + ("sm_scale", "lengths", "table", "out", "lse", "family", "num_parts",
                                               "return_lse")))
        if what in TENSORS:
            kw[what] = _mutate_tensor(draw, kw[what]) if isinstance(kw[what], torch.Tensor) else kw[what]
        elif what == "sm_scale":
            kw["sm_scale"] = draw(st.one_of(st.floats(), st.integers(-3, 3), st.booleans(), st.text(max_size=3),
                                            st.just(np.float32(0.1)), st.just(None)))
        elif what == "lengths" and isinstance(kw["cache_seqlens"], torch.Tensor):
            n = kw["cache_seqlens"].numel()
            values = draw(st.lists(st.integers(-2**31, 2**31 - 1) | st.integers(-3, 80), min_size=n, max_size=n))
            kw["cache_seqlens"] = torch.tensor(values, dtype=torch.int32, device=device)
        elif what == "table" and isinstance(kw["block_table"], torch.Tensor) and kw["block_table"].dim() == 2:
            table = kw["block_table"].clone()
            table.fill_(draw(st.integers(-2**31, 2**31 - 1) | st.integers(-2, 20)))
            kw["block_table"] = table
        elif what in ("out", "lse"):
            b, s, h, c = inp.q_nope.shape
            shape = (b, s, h, c) if what == "out" else (b, s, h)
            dtype = inp.q_nope.dtype if what == "out" else torch.float32
            t = torch.full(shape, float("nan"), dtype=dtype, device=device)
            kw[what] = _mutate_tensor(draw, t) if draw(st.booleans()) else t
        elif what == "family":
            kw["family"] = draw(st.sampled_from(["simt", "mma", "wgmma", "bogus", "", 3]))
        elif what == "num_parts":
            kw["num_parts"] = draw(st.sampled_from([1, 7, 0, -1, True, "4", 2.0]))
        else:
            kw["return_lse"] = draw(st.booleans())
    return kw


def _raises_named(exc: BaseException) -> None:
    event(str(exc)[:40])
    assert isinstance(exc, (TypeError, ValueError)), f"{type(exc).__name__}: {exc}"
    assert NAMED.match(str(exc)), f"message does not start with an argument name: {exc}"


@SETTINGS
@given(kw=calls("cpu"))
def test_mla_decode_rejects_bad_arguments_by_name_cpu(kw) -> None:
    with pytest.raises(Exception) as info:  # on the CPU even valid inputs end at the CUDA check
        mla_gen.mla_decode(**kw)
    _raises_named(info.value)


DEVICES = st.sampled_from([None, "cpu", "meta", "cuda", "cuda:0", 0, -1, "bogus", 1.5, True, torch.device("cpu")])
PLAN_VALUES = st.sampled_from([1, 2, 16, 64, 0, -1, True, 2.0, "16", None])


@SETTINGS
@given(device=DEVICES, seqlens=st.sampled_from(ODD_VALUES) | st.builds(
           lambda n, dt, dev: torch.zeros(n, dtype=dt, device=dev),
           st.integers(0, 3), st.sampled_from(DTYPES), st.sampled_from(["cpu", "meta"])),
       s_q=PLAN_VALUES, heads=PLAN_VALUES, ckv=PLAN_VALUES, rope=PLAN_VALUES, page=PLAN_VALUES, pages=PLAN_VALUES,
       sm_scale=st.floats() | st.sampled_from([0, 1, True, "x"]),
       dtype=st.sampled_from(DTYPES + ["bf16", None]), family=st.sampled_from([None, "simt", "bogus", 1]),
       num_parts=st.sampled_from([None, 1, 0, -3, True, "2"]))
def test_wrapper_plan_rejects_bad_arguments_by_name_cpu(device, seqlens, s_q, heads, ckv, rope, page, pages, sm_scale,
                                                        dtype, family, num_parts) -> None:
    with pytest.raises(Exception) as info:
        w = mla_gen.MLADecodeWrapper(device, family=family, num_parts=num_parts)
        w.plan(seqlens, s_q, num_heads=heads, ckv_dim=ckv, rope_dim=rope, page_size=page, max_pages=pages,
               sm_scale=sm_scale, dtype=dtype)
    _raises_named(info.value)


def _against_reference(out, lse, ref, ref_lse, dtype) -> list[str]:
    """accuracy_problems over the rows whose float64 result is a number; a row whose result is NaN by the
    math (arbitrary inputs may let a request read a NaN cache slot its length covers) must be NaN in the
    kernel's output too, never a quietly finite value."""
    nan_rows = ref.isnan().any(dim=-1)  # [B, s_q, H]
    if not bool(nan_rows.any()):
        return accuracy_problems(out, lse, ref, ref_lse, dtype)
    problems = [] if bool(out[nan_rows].isnan().any(dim=-1).all()) else ["out: a row NaN by the math came back finite"]
    keep = ~nan_rows
    if bool(keep.any()):
        problems += accuracy_problems(out[keep], None if lse is None else lse[keep], ref[keep],
                                      None if ref_lse is None else ref_lse[keep], dtype)
    return problems


@pytest.mark.gpu
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kw=calls("cuda", heads=st.sampled_from([1, 16]), dims=st.sampled_from([(512, 64), (256, 32)])))
def test_mla_decode_rejects_by_name_or_runs_correctly_gpu(kw) -> None:
    """Variants the GPU session builds ahead (heads 1 and 16, both dims, bf16/fp16, every family). Values
    are checked on the host (check_values=True): unchecked page ids are trusted by the kernels, and a
    wrong one would read outside the cache and end the process's CUDA context."""
    kw["check_values"] = True
    try:
        result = mla_gen.mla_decode(**kw)
    except Exception as e:  # noqa: BLE001 - the property is about which exceptions
        _raises_named(e)
        return
    out, lse = result if isinstance(result, tuple) else (result, None)
    args = [kw[name] for name in TENSORS] + [kw["sm_scale"]]
    ref, ref_lse = mla_decode_reference(*args)
    dtype = "bf16" if kw["q_nope"].dtype == torch.bfloat16 else "fp16"
    problems = _against_reference(out, lse, ref, ref_lse, dtype)
    assert not problems, problems


@pytest.mark.gpu
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan_for=base_inputs("cuda", heads=st.sampled_from([1, 16]), dims=st.sampled_from([(512, 64), (256, 32)])),
       kw=calls("cuda", heads=st.sampled_from([1, 16]), dims=st.sampled_from([(512, 64), (256, 32)])))
def test_wrapper_run_rejects_by_name_or_runs_correctly_gpu(plan_for, kw) -> None:
    """A plan made for one shape, run with arbitrary arguments (most for another shape)."""
    b, s_q, heads, ckv = plan_for.q_nope.shape
    w = mla_gen.MLADecodeWrapper()
    w.plan(plan_for.cache_seqlens, s_q, num_heads=heads, ckv_dim=ckv, rope_dim=plan_for.q_pe.shape[3],
           page_size=plan_for.ckv_cache.shape[1], max_pages=plan_for.block_table.shape[1], sm_scale=plan_for.sm_scale,
           dtype=plan_for.q_nope.dtype, return_lse=True)
    args = [kw[name] for name in TENSORS]
    try:
        if isinstance(kw["cache_seqlens"], torch.Tensor) and isinstance(kw["block_table"], torch.Tensor):
            from mla_gen import validate  # the kernels trust lengths and page ids: check them as mla_decode would

            shape = validate.check_structure(*args, w.plan_info.sm_scale)
            validate.check_values(kw["cache_seqlens"], kw["block_table"], shape)
        out, lse = w.run(*args, out=kw.get("out"), lse=kw.get("lse"))
    except Exception as e:  # noqa: BLE001 - the property is about which exceptions
        _raises_named(e)
        return
    ref, ref_lse = mla_decode_reference(*args, w.plan_info.sm_scale)
    dtype = "bf16" if args[0].dtype == torch.bfloat16 else "fp16"
    problems = _against_reference(out, lse, ref, ref_lse, dtype)
    assert not problems, problems
