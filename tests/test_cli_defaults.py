"""`bitdistill distill` and `bitdistill recover` default to the measured KD recipe (DISTILL_DEFAULTS), not to the
Trainer's defaults; a --config key overrides a default and a flag overrides both."""

from __future__ import annotations

import json

import pytest

from bitdistill.cli.main import main
from bitdistill.distill.args import DISTILL_DEFAULTS

# command -> (module holding the library function the CLI calls, its name)
LIBRARY = {"distill": ("bitdistill.distill.run", "run_distillation"),
           "recover": ("bitdistill.recover.staged", "run_staged_recovery")}


@pytest.fixture(params=sorted(LIBRARY))
def command(request, monkeypatch, tmp_path):
    """The command, with its library function replaced by one that records the dataclasses it is given."""
    import importlib

    module, name = LIBRARY[request.param]
    seen: list[tuple] = []
    monkeypatch.setattr(importlib.import_module(module), name, lambda *args, **kwargs: seen.append(args) or tmp_path)
    return request.param, seen


def _parsed(args: tuple) -> dict:
    return {k: v for obj in args for k, v in vars(obj).items()}


def test_without_flags_the_command_gets_the_measured_recipe(command, tmp_path):
    name, seen = command
    assert main([name, "--teacher_model_name_or_path", "tiny:llama", "--output_dir", str(tmp_path / "out")]) == 0
    parsed = _parsed(seen[-1])
    assert {k: parsed[k] for k in DISTILL_DEFAULTS} == DISTILL_DEFAULTS
    assert parsed["attention_layers"] is not DISTILL_DEFAULTS["attention_layers"]  # a run cannot change them
    assert parsed["learning_rate"] != 5e-5 and parsed["hidden_layer_map"] == "uniform+last"  # others keep theirs


def test_config_overrides_a_default_and_a_flag_overrides_both(command, tmp_path):
    name, seen = command
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 0.002\nper_device_train_batch_size: 4\n")
    assert main([name, "--teacher_model_name_or_path", "tiny:llama", "--output_dir", str(tmp_path / "out"),
                 "--config", str(config), "--per_device_train_batch_size", "1", "--subln", "false"]) == 0
    parsed = _parsed(seen[-1])
    assert (parsed["learning_rate"], parsed["per_device_train_batch_size"]) == (0.002, 1)
    assert parsed["subln"] is False and parsed["max_seq_length"] == 128


@pytest.mark.parametrize("name", sorted(LIBRARY))
def test_help_names_the_commands_defaults(name, capsys):
    with pytest.raises(SystemExit):
        main([name, "--help"])
    text = " ".join(capsys.readouterr().out.split())

    def help_of(flag: str) -> str:
        return text.split(f"--{flag} {flag.upper()} ", 1)[1].split(" --", 1)[0]

    assert help_of("learning_rate").endswith("(default: 0.001)")
    assert help_of("max_seq_length").endswith("(default: 128)")
    assert help_of("temperature").count("default") == 0  # not in DISTILL_DEFAULTS: the dataclass's help as it was


def test_distill_defaults_on_an_architecture_without_subln_skip_it_and_an_explicit_subln_is_refused(tmp_path, capsys,
                                                                                                     shared_data):
    """SubLN (on by default) does not apply to GPT-2: the defaults train with it skipped (one printed line, recorded
    in the metrics, the marker and the card); ``--subln true`` is refused in one line before anything is written."""
    from run_utils import tiny_gpt2_vocab_folder

    gpt2 = tiny_gpt2_vocab_folder(tmp_path / "gpt2", "gpt2", shared_data / "tokenizers" / "gpt2")
    (tmp_path / "train.txt").write_text((shared_data / "wikitext-2-raw-v1" / "wiki.train.prefix.raw").read_text()[:6000])
    out = tmp_path / "run"
    common = ["distill", "--teacher_model_name_or_path", str(gpt2), "--train_files", str(tmp_path / "train.txt"),
              "--max_seq_length", "32", "--data_cache_dir", str(tmp_path / "cache"), "--max_steps", "1",
              "--report_to", "none", "--disable_tqdm", "true", "--output_dir", str(out)]
    assert main([*common, "--subln", "true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--subln asks for SubLN, which does not apply to 'gpt2'" in err, err
    assert not out.exists()
    assert main(common) == 0
    printed = capsys.readouterr().out
    skip = [line for line in printed.splitlines() if line.startswith("recipe parts skipped")]
    assert len(skip) == 1 and "SubLN (--subln)" in skip[0] and "attention" not in skip[0]
    assert any(line.startswith("the student will export to: packed folder") for line in printed.splitlines())
    metrics = json.loads((out / "student" / "distill_metrics.json").read_text())
    assert set(metrics["recipe"]["skipped"]) == {"subln"}
    marker = json.loads((out / "student" / "config.json").read_text())["bitdistill"]
    assert set(marker["recipe"]["skipped"]) == {"subln"} and not marker.get("subln_modules")
    assert "Recipe part skipped for this architecture: subln" in (out / "student" / "README.md").read_text()


def test_a_student_too_small_for_the_tokens_is_refused_before_subln_runs_it(tmp_path):
    """SubLN's calibrated init runs the student on tokenized text: token ids past its vocabulary are a one-line
    error naming both sizes, not an IndexError from the embedding."""
    import torch
    from transformers import AutoModelForCausalLM

    from bitdistill.distill.args import ModelArguments
    from bitdistill.distill.run import prepare_student
    from bitdistill.errors import UserError
    from bitdistill.models import tiny_config

    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(tmp_path / "m")
    vocab = tiny_config("llama").vocab_size
    args = ModelArguments(student_model_name_or_path=str(tmp_path / "m"), subln=True)
    with pytest.raises(UserError, match=f"token id {vocab + 3} but the student's vocabulary is {vocab}"):
        prepare_student(args, None, calibration_input_ids=torch.tensor([[1, vocab + 3]]))
    assert prepare_student(args, None, calibration_input_ids=torch.tensor([[1, vocab - 1]])) is not None


def test_cache_teacher_defaults_to_distills_block_length(monkeypatch, tmp_path):
    """A cache made with cache-teacher's defaults has the blocks a `distill` run with its defaults trains on."""
    import bitdistill.distill.run as run_module

    seen = []
    monkeypatch.setattr(run_module, "run_cache_teacher", lambda *args: seen.append(args) or tmp_path)
    assert main(["cache-teacher", "--teacher_model_name_or_path", "tiny:llama", "--cache_dir", str(tmp_path)]) == 0
    assert seen[-1][1].max_seq_length == DISTILL_DEFAULTS["max_seq_length"] == 128
    assert main(["cache-teacher", "--teacher_model_name_or_path", "tiny:llama", "--cache_dir", str(tmp_path),
                 "--max_seq_length", "64"]) == 0
    assert seen[-1][1].max_seq_length == 64
