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


def _resume_setup(tmp_path, shared_data):
    from run_utils import tiny_gpt2_vocab_folder

    tok = shared_data / "tokenizers" / "gpt2"
    teacher = tiny_gpt2_vocab_folder(tmp_path / "t", "llama", tok, rms_norm_eps=1e-5)
    (tmp_path / "train.txt").write_text((shared_data / "wikitext-2-raw-v1" / "wiki.train.prefix.raw").read_text()[:12000])
    return ["--teacher_model_name_or_path", str(teacher), "--train_files", str(tmp_path / "train.txt"),
            "--max_seq_length", "16", "--per_device_train_batch_size", "1", "--subln", "true", "--report_to", "none",
            "--disable_tqdm", "true", "--data_cache_dir", str(tmp_path / "cache"), "--seed", "0"]


@pytest.mark.parametrize("recorded", ["old-default", "new"])
def test_distill_resumes_with_the_eps_its_run_recorded(tmp_path, shared_data, recorded):
    """A run recorded with the old default (1e-6: what every run from before the eps followed ``rms_norm_eps``
    recorded) and a new one (the teacher's 1e-5, recorded) each resume, without ``--subln_eps``, with the eps they
    were started with."""
    import json

    from run_utils import StopAt, parse_cli

    from bitdistill.distill.run import run_distillation

    common = [*_resume_setup(tmp_path, shared_data), "--max_steps", "3", "--save_steps", "2",
              "--output_dir", str(tmp_path / "run")]
    first = [*common, *(["--subln_eps", "1e-6"] if recorded != "new" else [])]
    run_distillation(*parse_cli("distill", first), callbacks=[StopAt(2)])
    config = json.loads((tmp_path / "run" / "checkpoint-2" / "distill_config.json").read_text())
    assert config["subln_eps"] == (1e-5 if recorded == "new" else 1e-6)
    (tmp_path / "run" / "student").rename(tmp_path / "first")  # as if the run had been killed after step 2
    run_distillation(*parse_cli("distill", [*common, "--resume_from_checkpoint", "latest"]))
    want = 1e-5 if recorded == "new" else 1e-6
    student = load_student(tmp_path / "run" / "student")
    assert _subln_eps(student) == {want} and student_marker(student)["subln_eps"] == want
    assert json.loads((tmp_path / "run" / "student" / "distill_config.json").read_text())["subln_eps"] == want


@pytest.mark.parametrize("old", [True, False])
def test_recover_resumes_with_the_eps_its_run_recorded(tmp_path, shared_data, monkeypatch, old):
    """A staged run recorded with the old default (1e-6) resumes without ``--subln_eps``; a new one records the
    teacher's eps (1e-5) in ``recover_config.json`` and the student's configuration."""
    import json

    from transformers import TrainerCallback

    from bitdistill.cli.main import main
    from bitdistill.recover import staged

    argv = ["recover", *_resume_setup(tmp_path, shared_data), "--time_budget", "6s", "--block_steps", "2",
            "--calibration_tokens", "64", "--calibration_seq_length", "16", "--held_out_blocks", "2",
            "--block_micro_batch", "2", "--block_fraction", "0.5", "--save_strategy", "no",
            "--output_dir", str(tmp_path / "run")]
    real = staged.distill_student

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise RuntimeError("killed")

    def killed(*args, callbacks=None, **kwargs):
        return real(*args, callbacks=[*(callbacks or []), Kill()], **kwargs)

    monkeypatch.setattr(staged, "distill_student", killed)
    with pytest.raises(RuntimeError, match="killed"):
        main([*argv, *(["--subln_eps", "1e-6"] if old else [])])
    want = 1e-6 if old else 1e-5
    assert json.loads((tmp_path / "run" / "recover_config.json").read_text())["subln_eps"] == want
    monkeypatch.setattr(staged, "distill_student", real)
    assert main(argv) == 0
    assert json.loads((tmp_path / "run" / "student" / "distill_config.json").read_text())["subln_eps"] == want
    assert _subln_eps(load_student(tmp_path / "run" / "student")) == {want}
