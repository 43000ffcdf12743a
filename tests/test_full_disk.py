"""A full disk (or quota) in any writer is one line, exit status 2, and leaves nothing behind.

Each writer's lowest write is made to fail the way the library under it fails on a full disk: an ``OSError`` with
``ENOSPC``/``EDQUOT``, safetensors' ``SafetensorError`` (its Rust writer reports the errno as text), ``torch.save``'s
bare ``RuntimeError`` or ``numpy.tofile``'s ``OSError`` without an errno (recognized by the file system having no
space left, :func:`bitdistill.io._disk_full`).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import bitdistill.io as bio
from bitdistill.cli.main import main
from bitdistill.errors import UserError
from bitdistill.io import atomic_output_dir, user_error_from_write, write_errno
from bitdistill.models import tiny_model, tiny_tokenizer
from bitdistill.nn import replace_linear_with_bitlinear

SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"
TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"  # torch.save to a path
FAILURES = {
    "enospc": lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    "edquot": lambda: OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)),
    "safetensors": lambda: SafetensorError(SAFETENSORS_FULL),
}
MESSAGES = {"enospc": "No space left on device", "edquot": "quota", "safetensors": "No space left on device"}


def _raiser(kind: str):
    def fail(*args, **kwargs):
        for a in args:  # something half-written first, where the writer was given a path
            if isinstance(a, (str, Path)) and Path(a).parent.is_dir() and not Path(a).is_dir():
                Path(a).write_bytes(b"partial")
        raise FAILURES[kind]()
    return fail


def _fail(argv: list[str], capsys) -> str:
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = err.splitlines()
    assert "Traceback" not in err and lines[-1].startswith(f"bitdistill {argv[0]}: error: cannot write "), err
    assert [ln for ln in lines if ln.startswith("bitdistill ")] == lines[-1:], err
    return lines[-1]


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Llama teacher (rms_norm_eps 1e-5, byte tokenizer), its student and its packed folder, and some text."""
    from bitdistill.export.folder import pack_pretrained

    root = tmp_path_factory.mktemp("full-disk")
    teacher = tiny_model("llama")
    teacher.config.rms_norm_eps = 1e-5
    teacher.save_pretrained(root / "teacher")
    tiny_tokenizer().save_pretrained(root / "teacher")
    student = tiny_model("llama")
    replace_linear_with_bitlinear(student)
    student.save_pretrained(root / "student")
    tiny_tokenizer().save_pretrained(root / "student")
    pack_pretrained(root / "student", root / "packed", dtype="float32")
    (root / "train.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    return root


# -- the mapping -------------------------------------------------------------------------------------------------

def test_write_errno_reads_every_form():
    assert write_errno(OSError(errno.ENOSPC, "x")) == errno.ENOSPC
    assert write_errno(SafetensorError(SAFETENSORS_FULL)) == errno.ENOSPC
    try:  # torch.save into a file object: a RuntimeError raised while the file's OSError is handled
        try:
            raise OSError(errno.EDQUOT, "quota")
        except OSError:
            raise RuntimeError(TORCH_FULL) from None
    except RuntimeError as exc:
        assert exc.__cause__ is None and write_errno(exc) == errno.EDQUOT
    assert write_errno(RuntimeError(TORCH_FULL)) is None
    assert write_errno(SafetensorError("Error while serializing: header too large")) is None


def test_silent_failures_count_only_on_a_full_disk(tmp_path, monkeypatch):
    bare = [RuntimeError(TORCH_FULL), OSError("100000 requested and 8192 written")]
    for exc in bare:
        assert user_error_from_write(exc, tmp_path / "out", tmp_path) is None  # this disk has space: a real bug
    monkeypatch.setattr(bio, "_disk_full", lambda path: True)
    for exc in bare:
        assert "No space left on device" in str(user_error_from_write(exc, tmp_path / "out", tmp_path))
    assert user_error_from_write(ValueError("shape"), tmp_path / "out", tmp_path) is None
    assert user_error_from_write(FileExistsError("x"), tmp_path / "out", tmp_path) is None


@pytest.mark.parametrize("kind", sorted(FAILURES))
def test_atomic_output_dir_maps_and_cleans(kind, tmp_path):
    with pytest.raises(UserError, match=MESSAGES[kind]) as info, atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise FAILURES[kind]()
    assert str(tmp_path / "out") in str(info.value) and len(str(info.value).splitlines()) == 1
    assert _entries(tmp_path) == []


# -- every writer, through the CLI (GGUF: tests/test_export_gguf.py) -------------------------------------------

@pytest.mark.parametrize("kind", sorted(FAILURES))
def test_pack(kind, folders, tmp_path, capsys, monkeypatch):
    """The issue's case: safetensors' own error type during `pack` used to end in a traceback."""
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", _raiser(kind))
    err = _fail(["pack", str(folders / "student"), str(tmp_path / "out")], capsys)
    assert MESSAGES[kind] in err and str(tmp_path / "out") in err
    assert _entries(tmp_path) == []


@pytest.mark.parametrize("command, src", [("convert", "student"), ("unpack", "packed")])
def test_convert_and_unpack(command, src, folders, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", _raiser("safetensors"))
    err = _fail([command, str(folders / src), str(tmp_path / "out")], capsys)
    assert "No space left on device" in err
    assert _entries(tmp_path) == []


def _distill(folders: Path, out: Path, *extra: str) -> list[str]:
    return ["distill", "--teacher_model_name_or_path", str(folders / "teacher"), "--train_files",
            str(folders / "train.txt"), "--max_seq_length", "16", "--per_device_train_batch_size", "1",
            "--report_to", "none", "--disable_tqdm", "true", "--data_cache_dir", "none", "--output_dir", str(out),
            *extra]


def test_distill_checkpoint_torch_save(folders, tmp_path, capsys, monkeypatch):
    """A checkpoint's optimizer state (torch.save to a path: no errno) on a full disk; the last complete one stays."""
    from transformers import Trainer

    real = Trainer._save_optimizer_and_scheduler

    def full_at_step_2(self, output_dir):
        real(self, output_dir)
        if self.state.global_step == 2:
            monkeypatch.setattr(bio, "_disk_full", lambda path: True)
            raise RuntimeError(TORCH_FULL)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", full_at_step_2)
    out = tmp_path / "run"
    err = _fail(_distill(folders, out, "--max_steps", "3", "--save_steps", "1"), capsys)
    assert "No space left on device" in err and "checkpoint-2" in err
    assert [p for p in _entries(out) if "checkpoint" in p] == ["checkpoint-1"]


def test_distill_final_student(folders, tmp_path, capsys, monkeypatch):
    import transformers.modeling_utils

    real = transformers.modeling_utils.safe_save_file

    def full_for_the_student(tensors, path, *args, **kwargs):
        if Path(path).parent.name.startswith(".student"):
            _raiser("safetensors")(path)
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_for_the_student)
    out = tmp_path / "run"
    err = _fail(_distill(folders, out, "--max_steps", "1", "--save_strategy", "no"), capsys)
    assert "No space left on device" in err and str(out / "student") in err
    assert not [p for p in _entries(out) if "student" in p]


def test_teacher_cache(folders, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("bitdistill.distill.teacher_cache.save_file", _raiser("edquot"))
    err = _fail(["cache-teacher", "--teacher_model_name_or_path", str(folders / "teacher"), "--train_files",
                 str(folders / "train.txt"), "--max_seq_length", "16", "--data_cache_dir", "none", "--cache_dir",
                 str(tmp_path / "cache")], capsys)
    assert "quota" in err and str(tmp_path / "cache") in err
    assert _entries(tmp_path) == []


def test_token_block_cache(folders, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("bitdistill.data.blocks.save_file", _raiser("safetensors"))
    err = _fail(_distill(folders, tmp_path / "run", "--max_steps", "1", "--data_cache_dir", str(tmp_path / "cache")),
                capsys)
    assert "No space left on device" in err
    cache = tmp_path / "cache"
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.suffix == ".safetensors" or ".bitdistill-" in p.name]


def test_recover_resume_points(tmp_path, monkeypatch):
    """Block-wise reconstruction's resume files (torch.save to a path) on a full disk."""
    from bitdistill.recover.blockwise import _save_atomic

    def full(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        monkeypatch.setattr(bio, "_disk_full", lambda p: True)
        raise RuntimeError(TORCH_FULL)

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError, match="No space left on device"):
        _save_atomic({"w": torch.zeros(3)}, tmp_path / "block_000.pt")
    assert _entries(tmp_path) == []


def test_eval_output_json(tmp_path, monkeypatch):
    """Small files (``--output``, provenance, metrics) go through atomic_write: the same one line."""
    from bitdistill.io import atomic_write

    def full(path):
        Path(path).write_bytes(b"{")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(UserError, match=r"results\.json: No space left on device"):
        atomic_write(tmp_path / "results.json", full)
    assert _entries(tmp_path) == []
