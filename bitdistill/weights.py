"""Local model folders: the one reader of ``config.json``, the shard index and safetensors headers, and the one
validator every loader runs on the weights it loaded.

Every loader (:func:`bitdistill.load_student`, :func:`bitdistill.load_packed` and so ``unpack``, ``pack``
and ``eval``, :func:`bitdistill.convert.load_causal_lm` on a local folder) calls :func:`validate_loaded`:
every tensor the model expects is in the files with its shape and (for packed bytes and scales) its dtype,
packed bytes hold no 2-bit code 3, weight scales are finite and positive, floating-point weights are finite.
A failure is a :class:`bitdistill.errors.UserError` naming the tensor and the file.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bitdistill.errors import UserError

__all__ = [
    "CONFIG_FILE",
    "INDEX_FILE",
    "TensorInfo",
    "check_shapes",
    "check_source",
    "from_local_folder",
    "is_local_source",
    "read_config",
    "read_json",
    "read_tensors",
    "tensor_index",
    "validate_loaded",
    "weight_files",
]

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor is stored and what its header says: ``file`` (name inside the folder), dtype and shape."""

    file: str
    dtype: str
    shape: tuple[int, ...]


def read_config(folder: str | os.PathLike) -> dict:
    """``<folder>/config.json`` as a dict.

    Raises:
        FileNotFoundError: ``folder`` is missing, not a folder, or has no ``config.json``.
        UserError: ``config.json`` is not valid UTF-8 JSON or not an object.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist; pass a model folder")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder; pass a model folder")
    cfg = folder / CONFIG_FILE
    if not cfg.is_file():
        raise FileNotFoundError(f"{folder} is not a model folder (no {CONFIG_FILE}); pass a folder written by "
                                "save_pretrained or bitdistill")
    out = read_json(cfg, "the folder is corrupt: re-save or re-download it")
    if not isinstance(out, dict):
        raise UserError(f"{cfg} holds a JSON {type(out).__name__}, not an object; the folder is corrupt")
    return out


def read_json(path: Path, fix: str):
    """The JSON document in ``path``; a file that is not UTF-8 JSON is a :class:`UserError` naming it and ``fix``."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); {fix}") from exc


def weight_files(folder: str | os.PathLike) -> list[str]:
    """The safetensors files of a folder: those the shard index names, else every ``*.safetensors`` (sorted).

    Raises:
        UserError: the index is corrupt or names a missing file.
    """
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_bytes().decode("utf-8"))["weight_map"].values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"{index} is corrupt ({type(exc).__name__}: {exc}); re-save the model") from exc
        for name in files:
            if not (folder / name).is_file():
                raise UserError(f"{folder / name} is listed in {INDEX_FILE} but missing; the folder is incomplete")
        return files
    return sorted(p.name for p in folder.glob("*.safetensors"))


def tensor_index(folder: str | os.PathLike) -> dict[str, TensorInfo]:
    """``{key: TensorInfo}`` for every tensor of the folder's safetensors (headers only; sizes checked).

    Raises:
        UserError: a file is truncated or not safetensors (named), or a key is stored twice.
    """
    from safetensors import safe_open

    folder = Path(folder)
    out: dict[str, TensorInfo] = {}
    for name in weight_files(folder):
        path = folder / name
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    s = f.get_slice(key)
                    if key in out:
                        raise UserError(f"tensor {key!r} is stored in both {out[key].file} and {name} in {folder}; "
                                        "the folder is corrupt")
                    out[key] = TensorInfo(name, s.get_dtype(), tuple(s.get_shape()))
        except UserError:
            raise
        except Exception as exc:  # safetensors raises its own SafetensorError for bad headers and sizes
            raise UserError(f"{path} is corrupt or truncated ({type(exc).__name__}: {exc}); re-save or "
                            "re-download it") from exc
    return out


def read_tensors(folder: str | os.PathLike, keys) -> dict[str, torch.Tensor]:
    """The tensors ``keys`` (an iterable of names) from the folder's safetensors, as stored, on CPU.

    Raises:
        UserError: a key is not in any file (the folder is named), or a file is corrupt.
    """
    from safetensors import safe_open

    folder = Path(folder)
    index = tensor_index(folder)
    wanted = list(keys)
    missing = [k for k in wanted if k not in index]
    if missing:
        raise UserError(f"tensor {missing[0]!r} is missing from the weights in {folder} ({len(missing)} missing); "
                        "the folder is incomplete: re-save it")
    out = {}
    by_file: dict[str, list[str]] = {}
    for k in wanted:
        by_file.setdefault(index[k].file, []).append(k)
    for name, ks in by_file.items():
        with safe_open(str(folder / name), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in ks})
    return out


def _has_code3(packed: torch.Tensor) -> bool:
    b = packed.to(torch.int16)
    return bool(((b & 3) == 3).any() or ((b >> 2 & 3) == 3).any() or ((b >> 4 & 3) == 3).any()
                or ((b >> 6 & 3) == 3).any())


def _where(folder: Path, index: dict[str, TensorInfo], key: str) -> str:
    return str(folder / index[key].file) if key in index else str(folder)


def validate_loaded(model: nn.Module, folder: str | os.PathLike, *, packed_modules=(), check_files: bool = True
                    ) -> None:
    """Check a model just loaded from a local folder against the folder's files and for sane values.

    Args:
        model: the loaded model (its ``state_dict`` is what it expects).
        folder: the folder it was loaded from.
        packed_modules: names of modules whose ``weight`` holds packed 2-bit codes (uint8 ``[out/4, in]``)
            and whose ``weight_scale`` (``[1]``) is ``1 / gamma``.
        check_files: compare with the safetensors headers (same shape, packed bytes stored as uint8; a tensor
            missing altogether is reported by :func:`from_local_folder` from transformers' own loading report);
            ``False`` when the folder has no safetensors (only the values are checked).

    Raises:
        UserError: naming the tensor and the file: a tensor of another shape or dtype, packed bytes
            holding code 3, a scale not finite or not positive, a floating-point weight holding NaN or Inf.
    """
    folder = Path(folder)
    index = tensor_index(folder) if check_files else {}
    packed = set(packed_modules)
    state = model.state_dict()
    for key, t in state.items():
        module, _, leaf = key.rpartition(".")
        where = _where(folder, index, key)
        if check_files:
            info = index.get(key)
            if info is None:
                continue  # tied, or stored under another name (the loader reports what is missing)
            if info.shape != tuple(t.shape):
                raise UserError(f"tensor {key!r} in {where} has shape {list(info.shape)}, the model expects "
                                f"{list(t.shape)}; the weights do not match config.json")
            if module in packed and leaf == "weight" and info.dtype != "U8":
                raise UserError(f"tensor {key!r} in {where} is {info.dtype}; packed weights must be uint8 codes")
            if module in packed and leaf == "weight_scale" and info.dtype not in _FLOAT_DTYPES:
                raise UserError(f"tensor {key!r} in {where} is {info.dtype}; a weight scale must be floating point")
        if module in packed and leaf == "weight":
            if _has_code3(t):
                raise UserError(f"tensor {key!r} in {where} holds the unused 2-bit code 3 (valid codes are 0, 1, 2); "
                                "the packed weights are corrupt: re-pack the student")
        elif module in packed and leaf == "weight_scale":
            if not (torch.isfinite(t).all() and (t > 0).all()):
                raise UserError(f"tensor {key!r} in {where} is {t.flatten()[:4].tolist()}; a weight scale must be "
                                "finite and positive: the packed folder is corrupt, re-pack the student")
        elif t.is_floating_point() and not torch.isfinite(t).all():
            raise UserError(f"tensor {key!r} in {where} contains NaN or Inf; the checkpoint is corrupt (a diverged "
                            "run?): use an earlier checkpoint")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_local_source(src: str | os.PathLike) -> bool:
    """Whether ``src`` names a local path rather than a hub id (``name`` or ``org/name``).

    Local: it exists, starts with ``/``, ``.`` or ``~``, has more than one ``/``, or its first component is an
    existing folder (``proj/student`` when ``proj`` exists).
    """
    text = os.fspath(src)
    if Path(text).exists() or text.startswith(("/", ".", "~")) or not _HUB_ID.match(text):
        return True
    return "/" in text and Path(text.split("/", 1)[0]).is_dir()


def check_source(src: str | os.PathLike, what: str = "model") -> None:
    """Fail at once for a local ``src`` that is missing or not a folder (no hub round trip for a typo).

    Args:
        src: a folder, or a hub id (left alone).
        what: how the message names it (``"model"``, ``"--teacher_model_name_or_path"``, ...).

    Raises:
        FileNotFoundError, NotADirectoryError: ``src`` is local and not an existing folder.
    """
    if not is_local_source(src):
        return
    path = Path(os.path.expanduser(os.fspath(src)))
    if not path.exists():
        raise FileNotFoundError(f"{what} {src} does not exist (a local path, not a hub id); check the path")
    if not path.is_dir():
        raise NotADirectoryError(f"{what} {src} is a file, not a model folder; pass the folder that holds "
                                 "config.json (for a GGUF file: its folder and --gguf_file NAME)")


@contextmanager
def _held_records(logger_name: str):
    """Hold back every record the named logger emits inside the block; yields the list they are kept in, from
    which the block may remove records (dropping them). The rest are emitted when the block ends, however it ends."""
    held: list[logging.LogRecord] = []

    class _Hold(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            held.append(record)
            return False

    log, hold = logging.getLogger(logger_name), _Hold()
    log.addFilter(hold)
    try:
        yield held
    finally:
        log.removeFilter(hold)
        for record in held:
            log.handle(record)


def from_local_folder(load, folder: str | os.PathLike, *, model: bool = False, extra_suffixes: tuple[str, ...] = (),
                      **kwargs):
    """``load(folder, **kwargs)`` (a transformers ``from_pretrained``) with its failures on a local folder as one
    :class:`UserError` naming the folder: an unknown ``model_type``, a config transformers rejects, weights of the
    wrong shape, a pickled ``.bin`` that ``weights_only`` loading refuses. Call it after :func:`read_config` and :func:`tensor_index` have vetted the files.

    With ``model`` (``load`` is a model's ``from_pretrained``), a tensor transformers reports missing (it would be
    left initialized at random) is a :class:`UserError` too. transformers' own report is used because checkpoint
    names may differ from the model's (its conversion mappings rename some on load). When every tensor it reports
    unexpected ends with one of ``extra_suffixes`` (tensors the caller loads itself after converting the model)
    and none is missing or mismatched, its report of them is dropped; any other warning is passed on.
    """
    try:
        if not model:
            return load(folder, **kwargs)
        with _held_records("transformers.modeling_utils") as held:
            loaded, info = load(folder, output_loading_info=True, **kwargs)
            unexpected = list(info.get("unexpected_keys") or ())
            if (extra_suffixes and unexpected and all(k.endswith(extra_suffixes) for k in unexpected)
                    and not info.get("missing_keys") and not info.get("mismatched_keys")):
                held[:] = [r for r in held if not any(x in r.getMessage() for x in extra_suffixes)]
    except (ValueError, KeyError, RuntimeError, OSError, pickle.UnpicklingError) as exc:
        if isinstance(exc, (UserError, RecursionError, NotImplementedError)):  # ours, or programming errors
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"transformers cannot load {folder} ({type(exc).__name__}: {first}); check its config.json "
                        "and weights (a newer transformers may be needed for its model_type)") from exc
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise UserError(f"tensor {missing[0]!r} is missing from the weights in {folder} ({len(missing)} missing); the "
                        "folder is incomplete (it would be left uninitialized): re-save it")
    return loaded


def check_shapes(folder: str | os.PathLike, config) -> None:
    """Compare the stored tensors' shapes with those a model built from ``config`` expects (on the meta device,
    so nothing is allocated), before transformers loads them.

    Raises:
        UserError: naming the first tensor whose stored shape differs, its file and both shapes.
    """
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    with torch.device("meta"):
        model = from_local_folder(AutoModelForCausalLM.from_config, config)
    index = tensor_index(folder)
    for key, t in model.state_dict().items():
        info = index.get(key)
        if info is not None and info.shape != tuple(t.shape):
            raise UserError(f"tensor {key!r} in {folder / info.file} has shape {list(info.shape)}, but config.json "
                            f"makes it {list(t.shape)}; the weights do not match config.json: re-save the folder")
