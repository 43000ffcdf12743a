"""Auditable distillation runs: gradient checkpointing, frozen/transferred embeddings, the audit log,
provenance and the model card, end to end on tiny models with the GPT-2 tokenizer and WikiText-2 text."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from run_utils import parse_cli, tiny_gpt2_vocab_folder
from transformers import AutoModelForCausalLM, TrainerCallback

from bitdistill import load_student
from bitdistill.cli.main import main
from bitdistill.models import tiny_config

SECRET = "hf_SECRETvalue123"


def _config_file(path: Path, arch: str, **overrides) -> Path:
    """A 1-layer config.json of ``arch`` with the GPT-2 vocabulary (a student smaller than the 2-layer teacher)."""
    cfg = tiny_config(arch).to_dict()
    cfg.pop("layer_types", None)
    cfg.update(vocab_size=50257, bos_token_id=50256, eos_token_id=50256, num_hidden_layers=1, **overrides)
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("audit")
    tok = shared_data / "tokenizers" / "gpt2"
    wiki = shared_data / "wikitext-2-raw-v1"
    (root / "train.txt").write_text((wiki / "wiki.train.prefix.raw").read_text()[:3000])
    (root / "test.txt").write_text((wiki / "wiki.test.raw").read_text()[:2000])
    teachers = {arch: tiny_gpt2_vocab_folder(root / f"teacher_{arch}", arch, tok) for arch in ("llama", "gpt_neox")}
    return {"root": root, "teachers": teachers, "tok": tok,
            "common": ["--train_files", str(root / "train.txt"), "--max_seq_length", "32",
                       "--per_device_train_batch_size", "2", "--logging_steps", "1", "--learning_rate", "1e-3",
                       "--data_cache_dir", str(root / "cache"), "--seed", "0", "--disable_tqdm", "true",
                       "--save_strategy", "no", "--report_to", "none"]}


def _records(out: Path, event: str) -> list[dict]:
    lines = (out / "audit_log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


# GPT-NeoX is `slow` here only to keep the default suite short; tests/test_checkpointing.py checks its gradients.
@pytest.mark.parametrize("arch", ["llama", pytest.param("gpt_neox", marks=pytest.mark.slow)])
def test_gradient_checkpointing_cli_gives_the_same_losses(setup, arch, monkeypatch, capsys):
    import transformers.modeling_utils as mu

    calls: list[bool] = []
    real = mu.checkpoint

    def counting(fn, *args, use_reentrant=None, **kwargs):
        calls.append(use_reentrant)
        return real(fn, *args, use_reentrant=use_reentrant, **kwargs)

    monkeypatch.setattr(mu, "checkpoint", counting)
    root = setup["root"]
    losses = {}
    for mode in ("plain", "true", "false"):
        out = root / f"gc_{arch}_{mode}"
        # llama: the flag's deprecated (transformers 5) name; gpt_neox: its new name
        flag = "gradient_checkpointing" if arch == "llama" else "activation_checkpointing"
        extra = [] if mode == "plain" else [f"--{flag}", "true", f"--{flag}_kwargs", f'{{"use_reentrant": {mode}}}']
        calls.clear()
        rc = main(["distill", "--teacher_model_name_or_path", str(setup["teachers"][arch]), *setup["common"],
                   "--max_steps", "2", "--ce_weight", "0.5", "--output_dir", str(out), *extra,
                   *([] if arch == "llama" else ["--subln", "false", "--attention_weight", "0"])])
        assert rc == 0, capsys.readouterr().err
        if mode == "plain":
            assert calls == []
        else:
            assert calls and set(calls) == {mode == "true"}
        losses[mode] = [r["loss"] for r in _records(out, "train")]
        args = json.loads((out / "provenance.json").read_text())["args"]["training"]
        assert args["gradient_checkpointing"] == (mode != "plain")
    assert len(losses["plain"]) == 2
    assert losses["true"] == losses["plain"] and losses["false"] == losses["plain"]


class _Grab(TrainerCallback):
    """Keeps the model and the optimizer the Trainer trained."""

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.model, self.optimizer = model, optimizer

    def check_frozen(self, names: set[str]) -> None:
        """Exactly ``names`` are frozen; they are in no parameter group and have no optimizer state."""
        in_groups = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        params = dict(self.model.named_parameters(remove_duplicate=False))
        assert {n for n, p in params.items() if not p.requires_grad} == names
        assert self.optimizer.state
        for n, p in params.items():
            assert (id(p) in in_groups) == (n not in names), n
            assert (p in self.optimizer.state) == (n not in names), n


def _parse(argv):
    return parse_cli("distill", argv)


def test_frozen_embeddings_and_head_audit_log_provenance_and_card(setup):
    from huggingface_hub import ModelCard

    from bitdistill.distill.run import run_distillation

    root = setup["root"]
    out = root / "frozen"
    grab = _Grab()
    argv = ["--teacher_model_name_or_path", str(setup["teachers"]["llama"]), *setup["common"], "--max_steps", "2",
            "--freeze_embeddings", "true", "--freeze_lm_head", "true", "--eval_files", str(root / "test.txt"),
            "--eval_max_windows", "2", "--eval_strategy", "steps", "--eval_steps", "1", "--output_dir", str(out),
            "--hub_token", SECRET, "--report_to", "tensorboard"]
    run_distillation(*_parse(argv), command="bitdistill distill " + " ".join(argv), callbacks=[grab])

    teacher = AutoModelForCausalLM.from_pretrained(setup["teachers"]["llama"])
    student = load_student(out / "student")
    frozen = ("model.embed_tokens.weight", "lm_head.weight")
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for name in frozen:
        assert torch.equal(s_state[name], t_state[name]), name
    assert not torch.equal(s_state["model.norm.weight"], t_state["model.norm.weight"])  # the rest did train
    grab.check_frozen(set(frozen))

    train = _records(out, "train")
    assert [r["step"] for r in train] == [1, 2]
    prov = json.loads((out / "provenance.json").read_text())
    weights = {k.removesuffix("_weight"): v for k, v in prov["args"]["loss"].items() if k.endswith("_weight") and v}
    assert weights, prov["args"]["loss"]
    for r in train:
        assert r["step_time_s"] > 0 and r["tokens"] == 64 and r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0
        assert r["memory_kind"] in ("cpu_max_rss", "cuda_max_allocated")
        # each weighted term is recorded, and together they are the logged loss
        assert {f"loss_{k}" for k in weights} == {k for k in r if k.startswith("loss_")}
        assert sum(w * r[f"loss_{k}"] for k, w in weights.items()) == pytest.approx(r["loss"], rel=1e-3)
    evals = _records(out, "evaluate")
    assert len(evals) == 4  # start, steps 1 and 2, final
    assert all(r["eval_time_s"] > 0 and r["peak_memory_mb"] > 0 for r in evals)
    assert math.isfinite(evals[-1]["metrics"]["final_perplexity"])
    assert list((out / "runs" / "audit").glob("events.out.tfevents.*"))

    assert {"bitdistill", "git_commit", "torch", "transformers", "device", "command", "args"} <= set(prov)
    assert prov["args"]["model"]["freeze_lm_head"] is True and "hub_token" not in prov["args"]["training"]
    assert "--hub_token" not in prov["command"] and "--freeze_embeddings" in prov["command"]
    for f in out.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".jsonl", ".md", ""):
            assert SECRET not in f.read_text(errors="ignore"), f

    metrics = json.loads((out / "student" / "distill_metrics.json").read_text())
    packed, final = metrics["packed"]["perplexity"], metrics["student_end"]["final_perplexity"]
    assert packed == pytest.approx(final, rel=1e-4)
    card = ModelCard((out / "student" / "README.md").read_text())
    assert {"bitnet", "1.58-bit", "distillation"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local teacher folder is no Hub id: no "fine-tuned from" claim
    (result,) = card.data.eval_results
    assert result.metric_type == "perplexity" and result.metric_value == pytest.approx(final)
    text = card.text
    assert prov["git_commit"] in text and prov["command"] in text and "input embedding and output head" in text
    assert f"| {final:.4g} | {packed:.4g} |" in text


def test_transfer_embeddings_into_a_tied_config_student_frozen_head(setup, caplog):
    from bitdistill.distill.run import run_distillation

    root = setup["root"]
    out = root / "tied"
    cfg = _config_file(root / "qwen2.json", "qwen2")
    grab = _Grab()
    argv = ["--teacher_model_name_or_path", str(setup["teachers"]["llama"]), *setup["common"], "--max_steps", "2",
            "--student_config", str(cfg), "--transfer_embeddings", "true", "--freeze_lm_head", "true",
            "--output_dir", str(out)]
    with caplog.at_level(logging.WARNING, logger="bitdistill"):
        run_distillation(*_parse(argv), callbacks=[grab])
    assert "--freeze_lm_head also freezes the input embedding" in caplog.text
    assert "the student ties its head" in caplog.text
    teacher = AutoModelForCausalLM.from_pretrained(setup["teachers"]["llama"])
    student = load_student(out / "student")
    assert student.config.model_type == "qwen2" and student.config.num_hidden_layers == 1
    assert torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
    grab.check_frozen({"model.embed_tokens.weight", "lm_head.weight"})
    from huggingface_hub import ModelCard

    card = ModelCard((out / "student" / "README.md").read_text())
    assert card.data.base_model is None and "fresh model built from the config" in card.text


def test_transfer_embeddings_copies_embedding_and_head(setup):
    from bitdistill.distill.run import load_teacher, prepare_student

    root = setup["root"]
    cfg = _config_file(root / "llama_small.json", "llama")
    model_args = _parse(["--teacher_model_name_or_path", str(setup["teachers"]["llama"]), "--student_config",
                         str(cfg), "--transfer_embeddings", "true"])[0]
    teacher = load_teacher(model_args)
    student = prepare_student(model_args, teacher)
    assert student.config.num_hidden_layers == 1 < teacher.config.num_hidden_layers
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert student.model.embed_tokens.weight.data_ptr() != teacher.model.embed_tokens.weight.data_ptr()
    fresh = prepare_student(_parse(["--teacher_model_name_or_path", "x", "--student_config", str(cfg)])[0], teacher)
    assert not torch.equal(fresh.model.embed_tokens.weight, teacher.model.embed_tokens.weight)


def test_bad_inputs_one_line_and_nothing_written(setup, capsys, monkeypatch, tmp_path):
    from transformers import LlamaForCausalLM

    common = ["--teacher_model_name_or_path", str(setup["teachers"]["llama"]), *setup["common"], "--max_steps", "1"]
    out = tmp_path / "o"

    def fails(*extra, match):
        rc = main(["distill", *common, "--output_dir", str(out), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and err[-1].startswith("bitdistill distill: error:") and match in err[-1], err
        assert not out.exists()

    fails("--student_config", "tiny:llama", "--transfer_embeddings", "true", match="vocabularies differ")
    fails("--student_config", str(_config_file(tmp_path / "narrow.json", "llama", hidden_size=32)),
          "--transfer_embeddings", "true", match="hidden sizes differ")
    fails("--transfer_embeddings", "true", match="pass --student_config")
    fails("--student_config", str(tmp_path / "missing.json"), match="not found")
    fails("--logits_weight", "0", "--attention_weight", "0", "--hidden_weight", "0",
          match="every loss weight is 0 (--ce_weight, --logits_weight, --hidden_weight, --attention_weight)")
    monkeypatch.setattr(LlamaForCausalLM, "get_output_embeddings", lambda self: None)
    fails("--freeze_lm_head", "true", match="has no output head")
    monkeypatch.undo()
    monkeypatch.setattr(LlamaForCausalLM, "supports_gradient_checkpointing", False)
    fails("--gradient_checkpointing", "true", match="does not support gradient checkpointing")


def test_checkpointing_mode_from_a_config_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("gradient_checkpointing: true\ngradient_checkpointing_kwargs: {use_reentrant: true}\n"
                   "output_dir: /tmp/x\n")
    from bitdistill.cli.distill import _types
    from bitdistill.cli.hfargs import parse_dataclasses
    from bitdistill.cli.main import build_parser

    training_args = parse_dataclasses(build_parser().parse_args(["distill", "--config", str(cfg)]), _types())[3]
    assert training_args.gradient_checkpointing is True
    assert training_args.activation_checkpointing_kwargs == {"use_reentrant": True}


def test_card_names_a_hub_base_model_only_when_the_weights_come_from_it():
    from huggingface_hub import ModelCard

    from bitdistill.distill.card import distill_card

    def card(*argv):
        model_args, data_args, loss_args, training_args, _ = _parse(["--train_files", "t.txt", "--output_dir", "o", *argv])
        return ModelCard(distill_card(model_args, data_args, loss_args, training_args, {}, None, 1.0, 1)).data

    copied = card("--teacher_model_name_or_path", "HuggingFaceTB/SmolLM2-135M")
    assert copied.base_model == "HuggingFaceTB/SmolLM2-135M" and copied.base_model_relation == "quantized"
    fresh = card("--teacher_model_name_or_path", "HuggingFaceTB/SmolLM2-135M", "--student_config", "tiny:llama")
    assert fresh.base_model is None and getattr(fresh, "base_model_relation", None) is None
    other = card("--teacher_model_name_or_path", "org/teacher", "--student_model_name_or_path", "org/small",
                 "--dataset_name", "wikitext")
    assert other.base_model == "org/small" and other.datasets == ["wikitext"]


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpointing_with_frozen_embeddings_gives_the_same_gradients(use_reentrant):
    from bitdistill import replace_linear_with_bitlinear
    from bitdistill.distill.embeddings import freeze_embeddings
    from bitdistill.models import tiny_model

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = tiny_model("llama").train()
        replace_linear_with_bitlinear(model)
        freeze_embeddings(model, embeddings=True, lm_head=False)
        if checkpointing:  # as the Trainer does it (which also makes the embedding output require grad)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
        ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
        model(ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert "model.embed_tokens.weight" not in plain and len(plain) > 10
    for name, g in plain.items():
        assert ckpt[name] is not None, name
        torch.testing.assert_close(ckpt[name], g, rtol=0, atol=0, msg=name)


def test_bf16_mixed_precision_covers_the_teacher_forward(setup, monkeypatch):
    """With ``--bf16`` the student's forward runs under accelerate's autocast, and so does the teacher's."""
    import bitdistill.distill.run as run_mod

    calls: list[tuple[bool, bool, torch.dtype]] = []
    real = run_mod.load_teacher

    def recording(model_args):
        teacher = real(model_args)
        emb = teacher.get_input_embeddings()  # inside forward, where accelerate's autocast wraps the student's
        emb.register_forward_pre_hook(lambda m, args: calls.append(
            (m is emb, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))))
        return teacher  # the default student is a copy, hook included: its calls record m is emb == False

    monkeypatch.setattr(run_mod, "load_teacher", recording)
    out = setup["root"] / "bf16"
    argv = ["--teacher_model_name_or_path", str(setup["teachers"]["llama"]), *setup["common"], "--max_steps", "1",
            "--bf16", "true", "--use_cpu", "true", "--output_dir", str(out)]
    run_mod.run_distillation(*_parse(argv))
    teacher_calls = [c for c in calls if c[0]]
    student_calls = [c for c in calls if not c[0]]
    assert teacher_calls and student_calls
    assert all(c[1:] == (True, torch.bfloat16) for c in calls), calls
