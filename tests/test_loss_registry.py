"""The loss-term registry: a term added here alone (one pure function, one entry) trains from the CLI, with its
flag, validation, teacher-output needs, log key and model-card line derived from the entry."""

from __future__ import annotations

import json

import pytest
import torch
from run_utils import tiny_gpt2_vocab_folder

from bitdistill.cli.main import main
from bitdistill.distill.args import LossArguments
from bitdistill.distill.losses import LOSS_TERMS, masked_token_sum
from bitdistill.distill.terms import (
    LOSS_REGISTRY,
    LossInputs,
    LossTerm,
    loss_arguments_type,
    needed_outputs,
    register_loss_term,
    validate_loss_args,
)
from bitdistill.errors import UserError

SEEN: list[LossInputs] = []


def logit_l1(x: LossInputs, loss_args) -> torch.Tensor:
    """Mean absolute difference of the student's and the teacher's log-probabilities, per predicted token."""
    SEEN.append(x)
    diff = (x.student_logits.float().log_softmax(-1) - x.teacher_logits.float().log_softmax(-1)).abs().mean(-1)
    return masked_token_sum(diff, x.mask, x.num_items)


def hidden_norm(x: LossInputs, loss_args) -> torch.Tensor:
    return masked_token_sum(x.teacher_hidden[-1].norm(dim=-1), x.mask, x.num_items)


@pytest.fixture
def registered():
    """Two terms registered for one test: one on the teacher's logits, one on its hidden states."""
    terms = [register_loss_term(LossTerm("logit_l1", logit_l1, lambda a: "L1 between log-probabilities",
                                         "Weight of the L1 log-probability loss.")),
             register_loss_term(LossTerm("hidden_norm", hidden_norm, lambda a: "the last hidden state's norm",
                                         "Weight of a hidden-state norm term.",
                                         teacher_outputs=frozenset({"hidden_states"})))]
    SEEN.clear()
    yield terms
    for t in terms:
        LOSS_REGISTRY.pop(t.name)


def test_built_in_terms_are_the_registry_and_need_no_extra_fields():
    assert tuple(LOSS_REGISTRY) == LOSS_TERMS
    assert loss_arguments_type() is LossArguments
    assert needed_outputs(LossArguments(hidden_weight=1.0, attention_weight=0.0)) == (
        {"logits", "hidden_states"}, {"logits", "hidden_states"})
    assert needed_outputs(LossArguments(ce_weight=1.0, logits_weight=0.0)) == ({"logits"}, set())


def test_register_refuses_a_taken_name_and_an_unknown_output():
    with pytest.raises(ValueError, match="registered already"):
        register_loss_term(LossTerm("logits", logit_l1, str, ""))
    with pytest.raises(ValueError, match="outputs must be among"):
        register_loss_term(LossTerm("attn_maps", logit_l1, str, "", teacher_outputs=frozenset({"attentions"})))


def test_a_registered_term_gets_a_flag_validation_and_cache_refusal(registered):
    args_type = loss_arguments_type()
    args = args_type(logits_weight=0.0, logit_l1_weight=0.5)
    assert args.hidden_norm_weight == 0.0 and issubclass(args_type, LossArguments)
    validate_loss_args(args)
    with pytest.raises(UserError, match=r"--logit_l1_weight must be a finite number >= 0, got -1"):
        validate_loss_args(args_type(logit_l1_weight=-1))
    with pytest.raises(UserError, match=r"every loss weight is 0 \(.*--logit_l1_weight, --hidden_norm_weight\)"):
        validate_loss_args(args_type(logits_weight=0.0))
    assert needed_outputs(args_type(logits_weight=0.0, hidden_norm_weight=1.0))[1] == {"hidden_states"}


def test_a_registered_term_trains_from_the_cli(registered, tmp_path, shared_data, capsys):
    tok = shared_data / "tokenizers" / "gpt2"
    (tmp_path / "train.txt").write_text((shared_data / "wikitext-2-raw-v1" / "wiki.train.prefix.raw").read_text()[:6000])
    common = ["distill", "--teacher_model_name_or_path", str(tiny_gpt2_vocab_folder(tmp_path / "teacher", "llama", tok)),
              "--train_files", str(tmp_path / "train.txt"), "--max_seq_length", "32", "--data_cache_dir",
              str(tmp_path / "cache"), "--max_steps", "2", "--logging_steps", "1", "--report_to", "none",
              "--disable_tqdm", "true", "--subln", "false", "--logits_weight", "0", "--hidden_weight", "0",
              "--attention_weight", "0"]
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    assert "--logit_l1_weight" in capsys.readouterr().out
    bad = tmp_path / "bad"
    assert main([*common, "--logit_l1_weight", "-2", "--output_dir", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "--logit_l1_weight must be a finite number >= 0" in err and not bad.exists(), err
    assert main([*common, "--teacher_cache", str(tmp_path), "--hidden_norm_weight", "1", "--output_dir", str(bad)]) == 2
    assert "pass --hidden_norm_weight 0" in capsys.readouterr().err

    out = tmp_path / "run"
    assert main([*common, "--logit_l1_weight", "0.5", "--output_dir", str(out)]) == 0, capsys.readouterr().err
    assert SEEN and all(x.teacher_logits is not None and x.teacher_hidden is None and x.student_hidden is None
                        for x in SEEN)  # only the logits the term needs were asked of either forward
    logged = [json.loads(line) for line in (out / "audit_log.jsonl").read_text().splitlines()]
    losses = [r for r in logged if r["event"] == "train"]
    assert [set(k for k in r if k.startswith("loss_")) for r in losses] == [{"loss_logit_l1"}] * 2
    assert all(r["loss"] == pytest.approx(0.5 * r["loss_logit_l1"], rel=1e-4) for r in losses)
    assert json.loads((out / "student" / "distill_config.json").read_text())["logit_l1_weight"] == 0.5
    assert "minimizing 0.5 x L1 between log-probabilities, averaged" in (out / "student" / "README.md").read_text()
