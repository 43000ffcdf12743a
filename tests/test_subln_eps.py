"""The SubLN eps follows the model's ``rms_norm_eps`` unless given; students keep the eps they were trained with."""

from __future__ import annotations

import pytest
import torch

from bitdistill.models import tiny_config
from bitdistill.nn import replace_linear_with_bitlinear
from bitdistill.nn.config import student_marker
from bitdistill.nn.replace import load_student
from bitdistill.nn.subln import FALLBACK_SUBLN_EPS, default_subln_eps, insert_subln


def _student(rms_norm_eps: float | None):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    if rms_norm_eps is not None:
        cfg.rms_norm_eps = rms_norm_eps
    model = AutoModelForCausalLM.from_config(cfg)
    replace_linear_with_bitlinear(model)
    return model


def _subln_eps(model) -> set[float]:
    return {m.rms_norm.variance_epsilon for n, m in model.named_modules() if n.endswith(("o_proj", "down_proj"))}


@pytest.mark.parametrize("rms_norm_eps", [1e-5, 3e-6])
def test_default_follows_rms_norm_eps(rms_norm_eps):
    model = _student(rms_norm_eps)
    insert_subln(model, init="ones")
    assert _subln_eps(model) == {rms_norm_eps}
    assert student_marker(model)["subln_eps"] == rms_norm_eps


def test_explicit_eps_is_kept():
    model = _student(1e-5)
    insert_subln(model, eps=1e-6, init="ones")
    assert _subln_eps(model) == {1e-6} and student_marker(model)["subln_eps"] == 1e-6


def test_model_without_rms_norm_eps_falls_back():
    model = _student(None)
    del model.config.rms_norm_eps
    assert default_subln_eps(model) == FALLBACK_SUBLN_EPS == 1e-6


def test_a_saved_student_reloads_with_its_own_eps(tmp_path):
    """A student trained with 1e-6 on a model whose rms_norm_eps is 1e-5 (the old default) keeps 1e-6."""
    model = _student(1e-5)
    insert_subln(model, eps=1e-6, init="ones")
    model.save_pretrained(tmp_path / "s")
    again = load_student(tmp_path / "s")
    assert _subln_eps(again) == {1e-6}
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model.eval()(ids).logits)


def test_cli_default_and_explicit_eps(tmp_path):
    """``distill --subln true`` takes the teacher's rms_norm_eps; ``--subln_eps`` still sets it."""
    from transformers import AutoModelForCausalLM

    from bitdistill.cli.main import main
    from bitdistill.models import tiny_tokenizer

    cfg = tiny_config("llama")
    cfg.rms_norm_eps = 1e-5
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "t")
    tiny_tokenizer().save_pretrained(tmp_path / "t")
    (tmp_path / "train.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    common = ["distill", "--teacher_model_name_or_path", str(tmp_path / "t"), "--train_files",
              str(tmp_path / "train.txt"), "--max_seq_length", "16", "--max_steps", "1",
              "--per_device_train_batch_size", "1", "--subln", "true", "--report_to", "none", "--disable_tqdm", "true",
              "--data_cache_dir", str(tmp_path / "cache")]
    for extra, out, want in (([], "default", 1e-5), (["--subln_eps", "1e-4"], "explicit", 1e-4)):
        assert main([*common, *extra, "--output_dir", str(tmp_path / out)]) == 0
        student = load_student(tmp_path / out / "student")
        assert student_marker(student)["subln_eps"] == want and _subln_eps(student) == {want}
