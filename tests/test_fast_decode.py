"""FastDecoder: the same greedy tokens as ``generate`` for packed and student models; refusals."""

from __future__ import annotations

import pytest
import torch

from bitdistill import FastDecoder, generate_fast, replace_linear_with_bitlinear
from bitdistill.export.memory import pack_in_memory
from bitdistill.models import tiny_model


def _student(arch: str):
    model = tiny_model(arch)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)  # peaked logits: greedy tokens are well defined
    replace_linear_with_bitlinear(model)
    return model


def _greedy(model, ids, n):
    with torch.no_grad():
        return model.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "phi3"])
def test_same_tokens_as_generate(arch):
    student = _student(arch)
    packed = pack_in_memory(student)
    ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    assert torch.equal(generate_fast(packed, ids, 16), _greedy(packed, ids, 16))
    assert torch.equal(generate_fast(student, ids, 16), _greedy(student, ids, 16))


def test_packed_subln_student_as_bitnet():
    """`bitdistill pack` writes a SubLN student as BitNetForCausalLM; fast decoding follows its sub-norms."""
    from bitdistill import insert_subln
    from bitdistill.export.bitnet_arch import subln_to_bitnet

    student = _student("llama")
    insert_subln(student, eps=1e-5, init="ones")
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "rms_norm" in name:
                p.uniform_(0.5, 1.5)
    bitnet = subln_to_bitnet(student)
    assert bitnet.config.model_type == "bitnet"
    ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(4))
    assert torch.equal(generate_fast(bitnet, ids, 16), _greedy(bitnet, ids, 16))


def test_decoder_is_reusable_and_int8_head_is_close():
    packed = pack_in_memory(_student("llama"))
    decoder = FastDecoder(packed, 32)
    a = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(2))
    b = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    assert torch.equal(decoder.generate(a, 12), _greedy(packed, a, 12))
    assert torch.equal(decoder.generate(b, 12), _greedy(packed, b, 12))
    approx = FastDecoder(packed, 32, int8_head=True)
    exact_logits = decoder.step(a, 0)
    approx_logits = approx.step(a, 0)
    assert approx_logits.shape == exact_logits.shape
    assert torch.allclose(approx_logits, exact_logits, atol=0.05 * exact_logits.abs().max().item())
    eos = int(_greedy(packed, a, 3)[0, -2])
    assert decoder.generate(a, 12, eos_token_id=eos).shape[1] == a.shape[1] + 2


def test_refusals():
    packed = pack_in_memory(_student("llama"))
    with pytest.raises(ValueError, match="batch 1"):
        generate_fast(packed, torch.ones(2, 4, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="exceeds this decoder's max_length"):
        FastDecoder(packed, 8).generate(torch.ones(1, 6, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        FastDecoder(packed, 10**6)
    neox = tiny_model("gpt_neox")
    with pytest.raises(ValueError, match="not 'gpt_neox'"):
        FastDecoder(neox, 16)
