"""Issue 14's failure classes, end to end through the CLI (and the library where it is the entry point).

Every test asserts the exit status, the single stderr line, and the file system afterwards: the source is
unchanged, the output absent (or as before), and no temporary left beside it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bitdistill.cli.main import main
from bitdistill.convert import convert_pretrained
from bitdistill.errors import UserError
from bitdistill.export import load_packed, save_packed
from bitdistill.nn.replace import load_student


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones included) with its sha256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _fail(argv: list[str], capsys, status: int = 2) -> str:
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == status, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"bitdistill {argv[0]}: error: "), err
    return err


def _no_temps(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if ".bitdistill-" in p.name or p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    student = root / "student"
    convert_pretrained("tiny:llama", student)
    save_packed(load_student(student), root / "packed")
    return {"student": student, "packed": root / "packed"}


def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def _edit_tensor(folder: Path, key: str, fn) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    if fn is None:
        del tensors[key]
    else:
        tensors[key] = fn(tensors[key].clone())
    save_file(tensors, str(path), metadata={"format": "pt"})


def _first(folder: Path, suffix: str) -> str:
    return next(k for k in load_file(str(folder / "model.safetensors")) if k.endswith(suffix))


# -- data outside the output is never deleted or replaced ------------------------------------------------------

@pytest.mark.parametrize("command", ["pack", "convert", "unpack"])
def test_output_that_contains_the_source_is_refused(command, folders, tmp_path, capsys):
    src = _copy(folders["packed" if command == "unpack" else "student"], tmp_path / "proj" / "model")
    (tmp_path / "proj" / "notes.txt").write_text("keep me")
    before = _tree(tmp_path)
    err = _fail([command, str(src), str(tmp_path / "proj"), "--overwrite"], capsys)
    assert "contains the source" in err
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("command", ["pack", "convert", "unpack"])
def test_output_inside_the_source_is_refused(command, folders, tmp_path, capsys):
    src = _copy(folders["packed" if command == "unpack" else "student"], tmp_path / "model")
    before = _tree(tmp_path)
    err = _fail([command, str(src), str(src / "out")], capsys)
    assert "inside it" in err
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("command", ["pack", "convert"])
def test_overwrite_never_replaces_a_folder_that_is_not_a_model(command, folders, tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("years of work")
    err = _fail([command, str(folders["student"]), str(tmp_path / "docs"), "--overwrite"], capsys)
    assert "not an output" in err and (tmp_path / "docs" / "thesis.tex").read_text() == "years of work"
    _no_temps(tmp_path)


def test_second_run_into_the_same_new_folder_does_not_replace_the_first(folders, tmp_path, capsys, monkeypatch):
    from bitdistill.export import writer

    out = tmp_path / "p"
    real = writer.save_torch_state_dict

    def meanwhile(tensors, folder, **kwargs):  # another run finishes first, while this one writes
        real(tensors, folder, **kwargs)
        monkeypatch.setattr(writer, "save_torch_state_dict", real)
        assert main(["pack", str(folders["student"]), str(out)]) == 0
        (out / "first-run").write_text("")

    monkeypatch.setattr(writer, "save_torch_state_dict", meanwhile)
    err = _fail(["pack", str(folders["student"]), str(out)], capsys)
    assert "appeared while this run was writing" in err
    assert (out / "first-run").exists()
    _no_temps(tmp_path)


@pytest.mark.parametrize("command", ["pack", "convert"])
def test_dangling_symlink_output_is_refused(command, folders, tmp_path, capsys):
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    err = _fail([command, str(folders["student"]), str(tmp_path / "link")], capsys)
    assert "symbolic link" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link"]


# -- corrupt weights are refused by every reader -------------------------------------------------------------------

_PACKED_CORRUPTIONS = {
    "code3": (".weight_scale", None),  # replaced below: a packed weight gets byte 0xFF (four codes 3)
    "scale_nan": (".weight_scale", lambda t: t.fill_(float("nan"))),
    "scale_zero": (".weight_scale", lambda t: t.fill_(0.0)),
    "scale_negative": (".weight_scale", lambda t: t.fill_(-1.0)),
    "scale_inf": (".weight_scale", lambda t: t.fill_(float("inf"))),
    "missing_scale": (".weight_scale", None),
    "missing_packed": ("q_proj.weight", None),
    "nan_norm": ("input_layernorm.weight", lambda t: t.fill_(float("nan"))),
}


def _corrupt_packed(folder: Path, case: str) -> str:
    if case == "code3":
        key = _first(folder, "q_proj.weight")
        _edit_tensor(folder, key, lambda t: t.fill_(0xFF))
        return key
    suffix, fn = _PACKED_CORRUPTIONS[case]
    key = _first(folder, suffix)
    _edit_tensor(folder, key, fn)
    return key


@pytest.mark.parametrize("case", sorted(_PACKED_CORRUPTIONS))
def test_corrupt_packed_folder_refused_by_load_packed_and_unpack(case, folders, tmp_path, capsys):
    src = _copy(folders["packed"], tmp_path / "packed")
    key = _corrupt_packed(src, case)
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_packed(src)
    before = _tree(src)
    err = _fail(["unpack", str(src), str(tmp_path / "out")], capsys)
    assert key in err
    assert not (tmp_path / "out").exists() and _tree(src) == before
    _no_temps(tmp_path)


@pytest.mark.parametrize("case", ["code3", "scale_nan", "missing_packed"])
def test_corrupt_packed_folder_refused_by_eval_loader(case, folders, tmp_path):
    from bitdistill.eval.harness import load_for_eval

    src = _copy(folders["packed"], tmp_path / "packed")
    key = _corrupt_packed(src, case)
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_for_eval(src)


@pytest.mark.parametrize("case", ["missing", "nan", "inf", "wrong_shape"])
def test_corrupt_student_refused_by_pack_and_load_student(case, folders, tmp_path, capsys):
    src = _copy(folders["student"], tmp_path / "student")
    key = _first(src, "mlp.down_proj.weight")
    fn = {"missing": None, "nan": lambda t: t.fill_(float("nan")), "inf": lambda t: t.fill_(float("inf")),
          "wrong_shape": lambda t: t[:, :-1].contiguous()}[case]
    _edit_tensor(src, key, fn)
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_student(src)
    before = _tree(src)
    err = _fail(["pack", str(src), str(tmp_path / "out")], capsys)
    assert key in err and ("model.safetensors" in err or "missing from the weights" in err)
    assert not (tmp_path / "out").exists() and _tree(src) == before
    _no_temps(tmp_path)


@pytest.mark.parametrize("command", ["pack", "convert", "unpack"])
def test_truncated_safetensors_is_one_line(command, folders, tmp_path, capsys):
    src = _copy(folders["packed" if command == "unpack" else "student"], tmp_path / "src")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    err = _fail([command, str(src), str(tmp_path / "out")], capsys)
    assert "model.safetensors" in err and "truncated" in err
    assert not (tmp_path / "out").exists()
    _no_temps(tmp_path)


@pytest.mark.parametrize("command", ["pack", "convert", "unpack"])
@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe"])
def test_invalid_config_json_is_one_line(command, text, folders, tmp_path, capsys):
    src = _copy(folders["packed" if command == "unpack" else "student"], tmp_path / "src")
    (src / "config.json").write_bytes(text.encode("latin-1"))
    err = _fail([command, str(src), str(tmp_path / "out")], capsys)
    assert "config.json" in err
    assert not (tmp_path / "out").exists()
    _no_temps(tmp_path)


# -- missing local paths fail at once, without the hub ----------------------------------------------------------

@pytest.mark.parametrize("command", ["pack", "convert", "unpack"])
def test_missing_local_path_fails_at_once(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "proj").mkdir()
    for src in (str(tmp_path / "nope"), "./nope", "proj/typo"):
        err = _fail([command, src, str(tmp_path / "out")], capsys)
        assert "does not exist" in err and ("nope" in err or "typo" in err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proj"]


# -- full disk, read-only location ----------------------------------------------------------------------------------

def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("command", ["pack", "convert", "unpack"])
def test_full_disk_is_one_line_and_leaves_nothing(command, folders, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", _enospc)
    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", _enospc)
    src = folders["packed" if command == "unpack" else "student"]
    before = _tree(src)
    err = _fail([command, str(src), str(tmp_path / "out")], capsys)
    assert "No space left on device" in err and str(tmp_path / "out") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [] and _tree(src) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("command", ["pack", "convert"])
def test_read_only_location_is_one_line(command, folders, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        err = _fail([command, str(folders["student"]), str(ro / "out")], capsys)
    finally:
        ro.chmod(0o755)
    assert "Permission denied" in err and list(ro.iterdir()) == []


def test_read_only_location_simulated_is_one_line(folders, tmp_path, capsys, monkeypatch):
    from pathlib import Path as P

    real = P.mkdir

    def denied(self, *args, **kwargs):
        if self.name.startswith(".out.bitdistill-tmp"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(P, "mkdir", denied)
    err = _fail(["pack", str(folders["student"]), str(tmp_path / "out")], capsys)
    assert "Permission denied" in err and str(tmp_path / "out") in err
    assert list(tmp_path.iterdir()) == []


# -- permissions -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["pack", "convert", "unpack"])
def test_outputs_have_umask_permissions(command, folders, tmp_path):
    old = os.umask(0o022)
    try:
        assert main([command, str(folders["packed" if command == "unpack" else "student"]), str(tmp_path / "o")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "o").iterdir()}
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o755
    assert set(modes.values()) == {0o644}, modes
    assert json.loads((tmp_path / "o" / "config.json").read_text())


def test_stale_temp_from_a_killed_run_is_removed(folders, tmp_path, capsys):
    stale = tmp_path / ".out.bitdistill-tmp-999999999-0123abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    assert main(["pack", str(folders["student"]), str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_tensor_shared_dedup_and_library_sharding(folders, tmp_path):
    assert main(["pack", str(folders["student"]), str(tmp_path / "p"), "--max-shard-size", "40KB"]) == 0
    index = json.loads((tmp_path / "p" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((tmp_path / "p" / f).is_file() for f in files)
    model = load_packed(tmp_path / "p")
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


# -- no pickle, no remote code ----------------------------------------------------------------------------------------

class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("command", ["convert", "pack"])
def test_pickled_weights_never_run_code(command, tmp_path, capsys):
    from bitdistill.models import tiny_model

    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    (src / "model.safetensors").unlink()
    torch.save({"x": _Payload(tmp_path / "pwned")}, src / "pytorch_model.bin")
    extra = ["--from-plain"] if command == "pack" else []
    err = _fail([command, str(src), str(tmp_path / "out"), *extra], capsys)
    assert "src" in err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


def test_remote_code_is_never_run(folders, tmp_path, capsys):
    src = _copy(folders["student"], tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig",
                                            "AutoModelForCausalLM": "evil.EvilModel"})
    del cfg["bitdistill"]
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "evil.py").write_text(f"from pathlib import Path\nPath({str(tmp_path / 'pwned')!r}).touch()\n")
    err = _fail(["convert", str(src), str(tmp_path / "out")], capsys)
    assert "src" in err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()
