"""scripts/split_sweep.py's workloads: BATCHxSEQLENxHEADS shapes and the bench suite's cases (ragged lengths,
s_q, dims) by name; a bad one is an argparse error naming what was expected (CPU: nothing is timed here)."""
from __future__ import annotations

import argparse

import pytest

from conftest import load_file

split_sweep = load_file("split_sweep", "scripts/split_sweep.py")


def test_a_shape_is_an_equal_length_bf16_case() -> None:
    case = split_sweep.parse_shape("32x1024x16")
    assert (case.batch, case.seqlen, case.heads, case.s_q, case.ckv, case.rope) == (32, 1024, 16, 1, 512, 64)


def test_suite_cases_keep_their_lengths_and_query_tokens() -> None:
    two, three, six = split_sweep.parse_cases("2,3,6")
    assert (two.batch, two.heads, two.seqlen) == (128, 128, 4096)
    assert three.s_q == 2
    assert six.seqlens_random == (1, 8192) and len(set(six.lengths())) > 1


@pytest.mark.parametrize("text", ["32x1024", "axbxc", "32x1024x16x1"])
def test_a_bad_shape_names_the_form(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"^expected BATCHxSEQLENxHEADS"):
        split_sweep.parse_shape(text)


@pytest.mark.parametrize("text", ["", "2,nope", ","])
def test_an_unknown_case_names_the_suite(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"^expected suite cases \(1, 2, 3"):
        split_sweep.parse_cases(text)
