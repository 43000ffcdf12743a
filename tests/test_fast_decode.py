"""FastDecoder: the same greedy tokens as ``generate`` for packed and student models, on both backends; refusals."""

from __future__ import annotations

import pytest
import torch
from transformers.activations import ACT2FN

from bitdistill import FastDecoder, generate_fast, replace_linear_with_bitlinear
from bitdistill.export.memory import pack_in_memory
from bitdistill.models import tiny_model
from bitdistill.nn.fast_decode import greedy_token


def _student(arch: str):
    model = tiny_model(arch)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)  # peaked logits: greedy tokens are well defined
    replace_linear_with_bitlinear(model)
    return model


def _greedy(model, ids, n):
    with torch.no_grad():
        return model.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3"]


@pytest.mark.parametrize("arch", ARCHS)
def test_same_tokens_as_generate(arch):
    student = _student(arch)
    packed = pack_in_memory(student)
    ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    expected = _greedy(packed, ids, 16)
    assert FastDecoder(packed, 24).backend == "native"
    assert torch.equal(generate_fast(packed, ids, 16, int8_head=False), expected)
    assert torch.equal(generate_fast(packed, ids, 16, backend="torch"), expected)
    assert FastDecoder(student, 24).backend == "torch"  # latent weights: the model's own modules
    assert torch.equal(generate_fast(student, ids, 16), _greedy(student, ids, 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ARCHS)
def test_native_stack_matches_the_eager_model(arch, dtype):
    """Native logits equal the torch backend's up to summation order: float32 to ~1e-6, bfloat16 to 2 ulps."""
    packed = pack_in_memory(_student(arch)).to(dtype)
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(5))
    native, eager = FastDecoder(packed, 16, backend="native", int8_head=False), FastDecoder(packed, 16, backend="torch")
    prefill = native.step(ids[:, :8], 0)  # 8 tokens in one call (causal attention inside the stack) ...
    ref = eager.step(ids[:, :8], 0)
    step = native.step(ids[:, 8:], 8)  # ... then one more against the cached keys and values
    step_ref = eager.step(ids[:, 8:], 8)
    tol = 1e-5 if dtype == torch.float32 else 2 * 2.0 ** -7
    for got, want in ((prefill, ref), (step, step_ref)):
        assert got.dtype == want.dtype and got.shape == want.shape == (1, packed.config.vocab_size)
        assert torch.isfinite(got).all()
        assert (got.float() - want.float()).abs().max() <= tol * want.float().abs().max()
    with torch.no_grad():
        full = packed(ids).logits[:, -1]
    assert (step.float() - full.float()).abs().max() <= tol * full.float().abs().max()


def test_native_prefill_equals_token_by_token():
    packed = pack_in_memory(_student("qwen3"))
    ids = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(6))
    at_once = FastDecoder(packed, 8, int8_head=False).step(ids, 0)
    one_by_one = FastDecoder(packed, 8, int8_head=False)
    for i in range(ids.shape[1]):
        last = one_by_one.step(ids[:, i:i + 1], i)
    assert torch.allclose(at_once, last, atol=1e-5, rtol=0)


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
    assert FastDecoder(bitnet, 24).backend == "native"
    assert torch.equal(generate_fast(bitnet, ids, 16, int8_head=False), _greedy(bitnet, ids, 16))
    assert torch.equal(generate_fast(bitnet, ids, 16, backend="torch"), _greedy(bitnet, ids, 16))
    for layer in bitnet.model.layers:  # BitNet's own default activation
        layer.mlp.act_fn = ACT2FN["relu2"]
    assert torch.equal(generate_fast(bitnet, ids, 16, backend="native", int8_head=False), _greedy(bitnet, ids, 16))


def test_decoder_is_reusable_and_int8_head_is_close():
    packed = pack_in_memory(_student("llama"))
    decoder = FastDecoder(packed, 32, int8_head=False)
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


def test_refusals(capsys):
    packed = pack_in_memory(_student("llama"))
    with pytest.raises(ValueError, match="batch 2 exceeds this decoder's max_batch 1; build it with max_batch=2"):
        FastDecoder(packed, 8).step(torch.ones(2, 4, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="4 tokens at position 6 exceed this decoder's max_length 8"):
        FastDecoder(packed, 8).step(torch.ones(1, 4, dtype=torch.long), 6)
    with pytest.raises(ValueError, match="exceeds this decoder's max_length"):
        FastDecoder(packed, 8).generate(torch.ones(1, 6, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        FastDecoder(packed, 10**6)
    neox = tiny_model("gpt_neox")
    with pytest.raises(ValueError, match="not 'gpt_neox'"):
        FastDecoder(neox, 16)
    with pytest.raises(ValueError, match="backend must be one of"):
        FastDecoder(packed, 16, backend="cuda")
    with pytest.raises(ValueError, match="backend='native' is not possible: layer 0 has projections that are not"):
        FastDecoder(_student("llama"), 16, backend="native")
    with pytest.raises(ValueError, match=r"float32 or bfloat16 models on CPU, not torch\.float16 on cpu"):
        FastDecoder(pack_in_memory(_student("llama")).half(), 16, backend="native")
    packed.model.layers[1].mlp.act_fn = torch.nn.GELU()
    with pytest.raises(ValueError, match="layer 1 has an MLP activation"):
        FastDecoder(packed, 16, backend="native")
    assert FastDecoder(packed, 16).backend == "torch"  # auto: falls back to the model's own modules, saying why
    assert capsys.readouterr().err == ("bitdistill: fast decoding runs the torch path, not the native stack: layer 1 "
                                       "has an MLP activation the native stack does not implement (SiLU or ReLU "
                                       "squared, the same in every layer)\n")
    packed = pack_in_memory(_student("llama"))
    packed.model.layers[0].input_layernorm.weight.data = packed.model.layers[0].input_layernorm.weight.data.double()
    with pytest.raises(ValueError, match="layer 0 has a norm the native stack does not implement, or one not in"):
        FastDecoder(packed, 16, backend="native")


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_batch_decodes_each_sequence_as_alone(arch, backend):
    """Four prompts decoded together give each prompt's own greedy tokens (the native stack: one GEMM per
    projection for all four), also with eos ending some sequences early."""
    packed = pack_in_memory(_student(arch))
    ids = torch.randint(3, 256, (4, 7), generator=torch.Generator().manual_seed(8))
    batch = FastDecoder(packed, 20, backend=backend, max_batch=4, int8_head=False)
    together = batch.generate(ids, 10)
    for i in range(4):
        assert torch.equal(together[i:i + 1], _greedy(packed, ids[i:i + 1], 10)), i
    eos = int(together[0, 9])
    stopped = batch.generate(ids, 10, eos_token_id=eos)
    first = int((stopped[0, 7:] == eos).nonzero()[0])
    assert (stopped[0, 7 + first:] == eos).all()
    assert torch.equal(generate_fast(packed, ids[:2], 10, backend=backend, int8_head=False), together[:2])


@pytest.mark.parametrize("arch", ARCHS)
def test_native_logits_of_every_position_match_the_eager_model(arch):
    """A 80-token prompt (two chunks of the stack: GEMMs) on 2 OpenMP threads, the model's own head (not reset):
    every position's logits as the eager forward's, and the same bits as on 1 thread."""
    torch.manual_seed(0)
    model = tiny_model(arch)
    replace_linear_with_bitlinear(model)
    packed = pack_in_memory(model)
    ids = torch.randint(3, 256, (2, 80), generator=torch.Generator().manual_seed(9))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        decoder = FastDecoder(packed, 96, max_batch=2, int8_head=False)
        assert decoder.backend == "native"
        got = decoder.logits(ids)
        nxt = decoder.step(ids[:, :1], 80)  # a cached step after the prefill
        torch.set_num_threads(1)
        assert torch.equal(FastDecoder(packed, 96, max_batch=2, int8_head=False).logits(ids), got)
    finally:
        torch.set_num_threads(before)
    with torch.no_grad():
        want = packed(ids).logits
        want_next = packed(torch.cat([ids, ids[:, :1]], dim=1)).logits[:, -1]
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert (nxt - want_next).abs().max() <= 1e-4 * want_next.abs().max()


def test_the_int8_head_is_the_native_backends_default_only():
    packed = pack_in_memory(_student("llama"))
    assert FastDecoder(packed, 16).int8_head is not None
    assert FastDecoder(packed, 16).native.head is not None
    assert FastDecoder(packed, 16, int8_head=False).native.head is None
    assert FastDecoder(packed, 16, backend="torch").int8_head is None
    assert FastDecoder(_student("llama"), 16).int8_head is None  # a student runs the torch backend


def test_native_int8_head_runs_inside_the_stack():
    packed = pack_in_memory(_student("llama"))
    ids = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(10))
    native = FastDecoder(packed, 16, int8_head=True, max_batch=2)
    torch_ops = FastDecoder(packed, 16, int8_head=True, backend="torch", max_batch=2)
    assert native.native.head is native.int8_head
    got, want = native.step(ids, 0), torch_ops.step(ids, 0)
    assert got.dtype == want.dtype and got.shape == want.shape == (2, packed.config.vocab_size)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_token_is_argmax_on_the_logits_own_dtype(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 3, 1000, generator=g) * 8).to(dtype)
    logits[0, 0, 10] = logits[0, 0, 700] = logits[0, 0].max() + 1  # equal maxima: the first wins
    logits[1, 2, 5] = float("nan")  # a NaN row: argmax's answer (the NaN)
    token = greedy_token(logits)
    assert token.shape == (4, 3, 1) and token.dtype == torch.int64
    assert torch.equal(token, logits.argmax(dim=-1, keepdim=True))
    assert token[0, 0, 0] == 10 and token[1, 2, 0] == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
def test_native_generate_loop_gives_the_step_loops_tokens(arch, dtype):
    """The native greedy loop (every step in one C call, the int8 head) against one Python step a token on the same
    decoder: the same tokens for three prompts together on 2 threads, with and without eos, and for 0 and 1 new
    tokens."""
    packed = pack_in_memory(_student(arch)).to(dtype)
    ids = torch.randint(3, 256, (3, 7), generator=torch.Generator().manual_seed(11))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        decoder = FastDecoder(packed, 24, max_batch=3)
        assert decoder.native is not None and decoder.native.head is not None
        steps = decoder._generate_steps(ids, 12, None)
        assert torch.equal(decoder.generate(ids, 12), steps)
        eos = int(steps[1, 9])  # sequence 1 stops at its third new token at the latest
        with_eos = decoder.generate(ids, 12, eos_token_id=eos)
        assert torch.equal(with_eos, decoder._generate_steps(ids, 12, eos))
        assert (with_eos[1, 9:] == eos).all()
        assert torch.equal(decoder.generate(ids, 1), steps[:, :8])
        assert torch.equal(decoder.generate(ids, 0), ids)
    finally:
        torch.set_num_threads(before)


def test_native_generate_refuses_ids_outside_the_embedding_and_negative_lengths():
    decoder = FastDecoder(pack_in_memory(_student("llama")), 16)
    n = decoder.inner.embed_tokens.num_embeddings
    with pytest.raises(ValueError, match=f"input_ids hold token ids outside the embedding's 0..{n - 1}"):
        decoder.generate(torch.tensor([[1, n]]), 4)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -1"):
        decoder.generate(torch.tensor([[1, 2]]), -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_greedy_tokens_are_argmax_of_the_logits_rounded_to_the_model_dtype(dtype):
    from bitdistill.cpu_ext import greedy_tokens

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 3000, generator=g) * 8
    logits[0, 7], logits[0, 2000] = 100.0, 100.0001  # equal after rounding to bfloat16: the first wins there
    logits[1, 9] = logits[1, 1999] = float("nan")  # the first NaN, as torch's argmax
    logits[2] = -float("inf")
    logits[3, 2999] = 1e4  # the last index
    got = greedy_tokens(logits, dtype)
    assert got.dtype == torch.int64 and got.shape == (5,)
    assert torch.equal(got, logits.to(dtype).float().argmax(dim=-1))
    assert int(got[0]) == (7 if dtype == torch.bfloat16 else 2000) and int(got[1]) == 9 and int(got[3]) == 2999


def test_native_backend_refuses_projections_wider_than_its_kernels_take(monkeypatch):
    import bitdistill.nn.fast_decode as fast_decode

    packed = pack_in_memory(_student("llama"))
    monkeypatch.setattr(fast_decode, "NATIVE_MAX_K", 32)
    with pytest.raises(ValueError, match="layer 0 has a projection wider than the native kernels' 32 input features"):
        FastDecoder(packed, 16, backend="native")
