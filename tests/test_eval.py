"""Strided perplexity against a direct computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bitdistill.eval import strided_perplexity
from bitdistill.models import tiny_model


def _direct_nll(model, ids, start, end, score_from):
    with torch.no_grad():
        logits = model(input_ids=ids[None, start:end]).logits[0, :-1]
    return F.cross_entropy(logits[score_from:], ids[start + 1 + score_from:end], reduction="sum").item()


def test_non_overlapping_windows_match_direct_computation():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (50,))
    r = strided_perplexity(model, ids, max_length=16)
    total = sum(_direct_nll(model, ids, s, min(s + 16, 50), 0) for s in range(0, 50, 16))
    count = 15 + 15 + 15 + 1
    assert r.num_tokens == count and r.num_windows == 4
    assert r.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)


def test_strided_windows_score_each_token_once_with_context():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (40,))
    r = strided_perplexity(model, ids, max_length=16, stride=8)
    assert r.num_tokens == 39
    total = _direct_nll(model, ids, 0, 16, 0)
    total += _direct_nll(model, ids, 8, 24, 7) + _direct_nll(model, ids, 16, 32, 7) + _direct_nll(model, ids, 24, 40, 7)
    assert r.nll == pytest.approx(total / 39, rel=1e-5)
    short = strided_perplexity(model, ids, max_length=16, stride=8, max_windows=2)
    assert short.num_windows == 2 and short.num_tokens == 15 + 8


def test_bad_inputs():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="exceeds the model's context"):
        strided_perplexity(model, torch.randint(0, 256, (300,)), max_length=256)
    with pytest.raises(ValueError, match="stride"):
        strided_perplexity(model, torch.randint(0, 256, (30,)), max_length=16, stride=17)
    with pytest.raises(ValueError, match="1-D"):
        strided_perplexity(model, torch.randint(0, 256, (2, 30)), max_length=16)
