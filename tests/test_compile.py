"""``torch.compile(fullgraph=True)`` traces through the custom ops (their fake impls) and matches eager."""

from __future__ import annotations

import pytest
import torch

from bitdistill import BitLinear, replace_linear_with_bitlinear
from bitdistill.models import tiny_model


def _converted_llama():
    model = tiny_model("llama")
    replace_linear_with_bitlinear(model)
    return model.eval()


def test_compile_fullgraph_tiny_converted_model_matches_eager():
    model = _converted_llama()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(ids).logits
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_compile_fullgraph_bitlinear_backward_matches_eager():
    layer = BitLinear(40, 24, bias=True)
    x = torch.randn(2, 5, 40, requires_grad=True)

    def step(fn):
        layer.zero_grad()
        x.grad = None
        fn(x).square().sum().backward()
        return x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone()

    eager = step(layer)
    compiled = step(torch.compile(layer, fullgraph=True, backend="aot_eager"))
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_compile_fullgraph_inductor_tiny_converted_model_matches_eager():
    model = _converted_llama()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, fullgraph=True)(ids).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
