"""Gradient checkpointing through BitLinear's autograd Function gives the same gradients as without it."""

from __future__ import annotations

import pytest
import torch

from bitdistill import replace_linear_with_bitlinear
from bitdistill.models import tiny_model


def _grads(arch: str, checkpointing: bool, use_reentrant: bool) -> dict[str, torch.Tensor]:
    model = tiny_model(arch).train()
    replace_linear_with_bitlinear(model)
    if checkpointing:
        kwargs = {"use_reentrant": use_reentrant}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if use_reentrant:
            model.enable_input_require_grads()
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    model(ids, labels=ids).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpointed_gradients_equal_plain(arch, use_reentrant):
    plain = _grads(arch, False, use_reentrant)
    ckpt = _grads(arch, True, use_reentrant)
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=0, msg=name)
