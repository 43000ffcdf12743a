"""Issue 14's failure classes for the training commands and the CLI boundary: every argument checked before work
starts (nothing written for a rejected run), checkpoints a crash cannot poison, Ctrl-C/SIGTERM, and programming
errors that keep their traceback. Each test asserts the exit status, the single stderr line and the run folder.
"""

from __future__ import annotations

import errno
import json
import os
import signal

import pytest
from run_utils import tiny_gpt2_vocab_folder

from bitdistill.cli.main import main
from bitdistill.convert import convert_pretrained


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("runs")
    wiki = shared_data / "wikitext-2-raw-v1"
    (root / "train.txt").write_text((wiki / "wiki.train.prefix.raw").read_text()[:4000])
    teacher = tiny_gpt2_vocab_folder(root / "teacher", "llama", shared_data / "tokenizers" / "gpt2")
    common = ["--train_files", str(root / "train.txt"), "--max_seq_length", "32", "--per_device_train_batch_size",
              "2", "--data_cache_dir", "none", "--seed", "0", "--disable_tqdm", "true", "--report_to", "none"]
    return {"root": root, "teacher": teacher, "common": common, "tokenizers": shared_data / "tokenizers"}


def _fail(argv: list[str], capsys, status: int = 2) -> str:
    """Run the CLI; the error is one line, the last one on stderr (a training command may have printed loading
    progress before it failed), and there is no traceback."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == status, err
    lines = err.splitlines()
    assert "Traceback" not in err and [ln for ln in lines if ln.startswith(f"bitdistill {argv[0]}: ")] == lines[-1:], err
    return lines[-1]


def _bad_files(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 " .encode("latin-1") * 100)
    (tmp_path / "bad.yaml").write_text("max_steps: [1\n")
    (tmp_path / "bad.json").write_text("{'max_steps': 1}")
    (tmp_path / "unknown.yaml").write_text("max_stepz: 1\n")
    return tmp_path


DISTILL_CASES = [
    (["--max_steps", "-5"], "--max_steps"),
    (["--max_steps", "0"], "--max_steps"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size"),
    (["--learning_rate", "-1"], "--learning_rate"),
    (["--max_train_blocks", "0"], "--max_train_blocks"),
    (["--eval_max_windows", "0"], "--eval_max_windows"),
    (["--validation_blocks", "-1"], "--validation_blocks"),
    (["--temperature", "0"], "--temperature"),
    (["--logits_weight", "-1"], "--logits_weight"),
    (["--jsd_beta", "2"], "--jsd_beta"),
    (["--save_steps", "0"], "--save_steps"),
    (["--eval_strategy", "epoch"], "--eval_strategy"),
    (["--train_files", "{d}/folder"], "is a folder"),
    (["--train_files", "{d}/latin1.txt"], "latin1.txt is not UTF-8"),
    (["--train_files", "{d}/missing.txt"], "missing.txt does not exist"),
    (["--eval_files", "{d}/latin1.txt"], "--eval_files"),
    (["--teacher_model_name_or_path", "./no/such/teacher"], "does not exist"),
    (["--teacher_model_name_or_path", "{d}/latin1.txt"], "is a file"),
    (["--teacher_gguf_file", "x.gguf"], "x.gguf does not exist"),
    (["--teacher_cache", "{d}/folder", "--attention_weight", "0", "--hidden_weight", "0"], "meta.json"),
    (["--teacher_cache", "{d}/folder"], "pass --hidden_weight 0 --attention_weight 0"),
    (["--config", "{d}/bad.yaml"], "bad.yaml is not valid YAML"),
    (["--config", "{d}/bad.json"], "bad.json is not valid JSON"),
    (["--config", "{d}/unknown.yaml"], "max_stepz"),
    (["--config", "{d}/missing.yaml"], "missing.yaml does not exist"),
    (["--max_seq_length", "256"], "exceeds the teacher's context"),
    (["--tokenizer_name_or_path", "{tok}/smollm2"], "another model family"),
]


@pytest.mark.parametrize(("extra", "message"), DISTILL_CASES, ids=[" ".join(c[0])[:40] for c in DISTILL_CASES])
def test_distill_rejects_bad_arguments_and_writes_nothing(extra, message, setup, tmp_path, capsys):
    d = _bad_files(tmp_path)
    extra = [e.format(d=d, tok=setup["tokenizers"]) for e in extra]
    out = tmp_path / "run"
    err = _fail(["distill", "--teacher_model_name_or_path", str(setup["teacher"]), *setup["common"],
                 "--output_dir", str(out), "--max_steps", "1", *extra], capsys)
    assert message in err, err
    assert not out.exists()  # no provenance.json: the corrected rerun into the same folder is accepted


SELF_DISTILL_CASES = [
    (["--max_steps", "-5"], "--max_steps"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps"),
    (["--alpha", "1.5"], "--alpha"),
    (["--temperature", "0"], "--temperature"),
    (["--train_files", "{d}/folder"], "is a folder"),
    (["--model_name_or_path", "./no/such/model"], "does not exist"),
    (["--config", "{d}/bad.yaml"], "bad.yaml"),
]


@pytest.mark.parametrize(("extra", "message"), SELF_DISTILL_CASES, ids=[" ".join(c[0])[:40] for c in SELF_DISTILL_CASES])
def test_self_distill_rejects_bad_arguments_and_writes_nothing(extra, message, setup, tmp_path, capsys):
    d = _bad_files(tmp_path)
    extra = [e.format(d=d) for e in extra]
    out = tmp_path / "run"
    err = _fail(["self-distill", "--model_name_or_path", str(setup["teacher"]), *setup["common"],
                 "--output_dir", str(out), "--max_steps", "1", *extra], capsys)
    assert message in err, err
    assert not out.exists()


@pytest.mark.parametrize(("extra", "message"), [(["--top_k", "0"], "--top_k"),
                                                (["--cache_batch_size", "0"], "--cache_batch_size"),
                                                (["--train_files", "{d}/folder"], "is a folder")])
def test_cache_teacher_rejects_bad_arguments(extra, message, setup, tmp_path, capsys):
    d = _bad_files(tmp_path)
    extra = [e.format(d=d) for e in extra]
    err = _fail(["cache-teacher", "--teacher_model_name_or_path", str(setup["teacher"]), *setup["common"][:4], "--data_cache_dir", "none",
                 "--cache_dir", str(tmp_path / "cache"), *extra], capsys)
    assert message in err and not (tmp_path / "cache").exists()


def test_teacher_cache_with_corrupt_meta_is_named(setup, tmp_path, capsys):
    (tmp_path / "tc").mkdir()
    (tmp_path / "tc" / "meta.json").write_text("{not json")
    err = _fail(["distill", "--teacher_cache", str(tmp_path / "tc"), "--tokenizer_name_or_path", str(setup["teacher"]),
                 "--student_model_name_or_path", str(setup["teacher"]), *setup["common"],
                 "--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--attention_weight", "0", "--hidden_weight", "0"], capsys)
    assert "meta.json is not valid JSON" in err and not (tmp_path / "run").exists()


# -- checkpoints a crash cannot poison ------------------------------------------------------------------------------

def test_full_disk_during_a_checkpoint_leaves_the_last_complete_one_to_resume(setup, tmp_path, capsys, monkeypatch):
    from transformers import Trainer

    out = tmp_path / "run"
    argv = ["distill", "--teacher_model_name_or_path", str(setup["teacher"]), *setup["common"], "--output_dir",
            str(out), "--max_steps", "3", "--save_steps", "1", "--max_train_blocks", "8"]
    real = Trainer._save_optimizer_and_scheduler

    def full_at_step_2(self, output_dir):
        real(self, output_dir)
        if self.state.global_step == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(output_dir))

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", full_at_step_2)
    err = _fail(argv, capsys)
    assert "No space left on device" in err
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint", ".checkpoint"))) == ["checkpoint-1"]
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", real)
    (out / "checkpoint-9").mkdir()  # a damaged checkpoint (an older version's crash): latest must skip it
    (out / "checkpoint-9" / "trainer_state.json").write_text("{}")
    capsys.readouterr()
    assert main([*argv, "--resume_from_checkpoint", "latest"]) == 0, capsys.readouterr().err
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and (out / "checkpoint-3" / "distill_config.json").is_file()
    assert (out / "student" / "model.safetensors").is_file()


def test_partial_checkpoint_of_a_killed_run_is_removed_and_never_resumed(setup, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["distill", "--teacher_model_name_or_path", str(setup["teacher"]), *setup["common"], "--output_dir",
            str(out), "--max_steps", "1", "--save_steps", "1", "--max_train_blocks", "6"]
    out.mkdir()
    (out / ".checkpoint-5.partial" / "checkpoint-5").mkdir(parents=True)  # kill -9 in the middle of a save
    err = _fail([*argv, "--resume_from_checkpoint", "latest"], capsys)
    assert "no complete checkpoint" in err
    assert list(out.iterdir()) == []


def test_explicit_incomplete_checkpoint_is_refused(setup, tmp_path, capsys):
    ckpt = tmp_path / "run" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    err = _fail(["distill", "--teacher_model_name_or_path", str(setup["teacher"]), *setup["common"], "--output_dir",
                 str(tmp_path / "run"), "--max_steps", "1", "--resume_from_checkpoint", str(ckpt)], capsys)
    assert "incomplete" in err and str(ckpt) in err


# -- the CLI boundary -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def student(tmp_path_factory):
    out = tmp_path_factory.mktemp("student") / "s"
    convert_pretrained("tiny:llama", out)
    return out


@pytest.mark.parametrize(("how", "status", "word"), [("sigint", 130, "interrupted"), ("sigterm", 143, "terminated"),
                                                    ("keyboardinterrupt", 130, "interrupted")])
def test_interrupted_pack_is_one_line_and_leaves_nothing(how, status, word, student, tmp_path, capsys, monkeypatch):
    from bitdistill.export import writer

    real = writer.save_torch_state_dict

    def interrupted(tensors, folder, **kwargs):
        real(tensors, folder, **kwargs)
        if how == "keyboardinterrupt":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGINT if how == "sigint" else signal.SIGTERM)

    monkeypatch.setattr(writer, "save_torch_state_dict", interrupted)
    # Python's own SIGINT handler, as in a foreground process (a background job starts with SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        err = _fail(["pack", str(student), str(tmp_path / "out")], capsys, status=status)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert word in err
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("exc", [TypeError, KeyError, AttributeError, IndexError])
def test_programming_errors_keep_their_traceback(exc, student, tmp_path, monkeypatch):
    from bitdistill.export import writer

    def bug(*args, **kwargs):
        raise exc("a bug")

    monkeypatch.setattr(writer, "save_torch_state_dict", bug)
    with pytest.raises(exc):
        main(["pack", str(student), str(tmp_path / "out")])
    assert list(tmp_path.iterdir()) == []


def test_debug_keeps_the_traceback_of_a_user_error(tmp_path, monkeypatch):
    from bitdistill.errors import UserError

    monkeypatch.setenv("BITDISTILL_DEBUG", "1")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{bad")
    with pytest.raises(UserError):
        main(["pack", str(tmp_path / "src"), str(tmp_path / "out")])


def test_eval_tokenizer_larger_than_vocabulary_is_one_line(setup, student, tmp_path, capsys):
    err = _fail(["eval", str(student), "--tasks", "wikitext_lastword", "--tokenizer", str(setup["tokenizers"] / "gpt2"),
                 "--output", str(tmp_path / "r.json")], capsys)
    assert "50257 tokens" in err and "vocabulary is 256" in err
    assert list(tmp_path.iterdir()) == []
