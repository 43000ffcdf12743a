"""Folder-level pack/unpack, the library behind ``bitdistill pack`` and ``bitdistill unpack``."""

from __future__ import annotations

import re
import shutil
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from bitdistill.errors import UserError
from bitdistill.export.bitnet_arch import has_subln, packs_as_bitnet, subln_to_bitnet
from bitdistill.export.format import COPY_FILES, DEFAULT_MAX_SHARD_BYTES
from bitdistill.export.loader import load_packed, unpack_to_student
from bitdistill.export.writer import PackReport, save_packed
from bitdistill.io import atomic_output_dir, check_output_location
from bitdistill.nn.bitlinear import BitConv1D
from bitdistill.nn.config import MARKER_KEY, folder_kind
from bitdistill.nn.replace import load_student, replace_linear_with_bitlinear
from bitdistill.weights import read_config, tensor_index

__all__ = ["PTQ_WARNING", "PackResult", "PackSource", "check_safetensors", "load_pack_source", "pack_pretrained",
           "unpack_pretrained"]

PTQ_WARNING = ("post-training ternarization of a model that was not trained as a BitNet student: expect a large "
               "quality loss; distill it first (bitdistill convert + bitdistill distill), then pack the student")


@dataclass
class PackResult:
    """:class:`PackReport` plus what kind of source it came from and why layers were not converted."""

    report: PackReport
    source_kind: str
    skipped: dict[str, str]

    def __str__(self) -> str:
        return f"source: {self.source_kind}\n{self.report}"


def check_safetensors(folder: Path) -> None:
    """Open every safetensors file of ``folder`` (headers and sizes); :class:`UserError` naming a bad one."""
    if not tensor_index(folder):
        raise FileNotFoundError(f"{folder} has no *.safetensors weights; save the model with safe_serialization")


def _check_out(src: Path, out: Path, overwrite: bool) -> None:
    check_output_location(out, [src])
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")


def _load_plain(src: str, gguf_file: str | None, skip: Iterable[str]) -> tuple[torch.nn.Module, dict[str, str]]:
    from bitdistill.convert import load_causal_lm

    model = load_causal_lm(src, gguf_file=gguf_file, dtype="float32")
    odd = {name: f"out_features={m.out_features} is not a multiple of 4 (not expressible in the packed format)"
           for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.out_features % 4}
    patterns = [*skip, *(re.escape(n) + "$" for n in odd)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = replace_linear_with_bitlinear(model, modules_to_not_convert=patterns)
    if not report.converted:
        raise UserError(f"{src} has no linear layer to convert outside the skip list")
    skipped = {n: odd.get(n, r) for n, r in report.skipped.items()}
    return model, skipped


@dataclass
class PackSource:
    """A model loaded for packing: the student (or ternarized plain model) and where it came from."""

    model: torch.nn.Module
    skipped: dict[str, str]
    kind: str
    tokenizer: object | None
    dtype: torch.dtype | None


def load_pack_source(src: str | Path, *, from_plain: bool = False, gguf_file: str | None = None,
                     skip: Iterable[str] | None = None) -> PackSource:
    """Load what ``bitdistill pack`` packs: a student folder, or (``from_plain`` / ``gguf_file``) any model.

    ``tokenizer`` is set only for a GGUF source (a folder's tokenizer files are read by the caller);
    ``dtype`` is the student's stored float dtype (``None`` when unknown or for plain sources).
    """
    from transformers import AutoTokenizer

    src_path = Path(str(src))
    if gguf_file is not None:
        if not (src_path / gguf_file).is_file():
            raise FileNotFoundError(f"{src_path / gguf_file} does not exist; --gguf_file names a file inside SRC")
        warnings.warn(PTQ_WARNING, stacklevel=3)
        model, skipped = _load_plain(str(src), gguf_file, skip or ("lm_head",))
        tokenizer = AutoTokenizer.from_pretrained(str(src), gguf_file=gguf_file)
        return PackSource(model, skipped, f"GGUF {gguf_file} (post-training ternarization)", tokenizer, None)
    found = folder_kind(src_path, required=True)
    if found == "packed":
        raise UserError(f"{src} is already packed (its config.json has a bitnet quantization_config); "
                         "use it as it is, or bitdistill unpack it first")
    check_safetensors(src_path)
    if found == "student":
        if skip:
            raise UserError("--skip applies to --from_plain sources; a student's converted layers were fixed "
                             "by bitdistill convert")
        model = load_student(src_path, dtype=torch.float32)
        cfg = read_config(src_path)
        source_dtype = cfg.get("dtype") or cfg.get("torch_dtype")
        dtype = _parse_dtype(source_dtype) if source_dtype in ("bfloat16", "float16", "float32") else None
        return PackSource(model, {}, "BitNet student (kept layers as converted by bitdistill convert)", None, dtype)
    if from_plain:
        warnings.warn(PTQ_WARNING, stacklevel=3)
        model, skipped = _load_plain(str(src), None, skip or ("lm_head",))
        return PackSource(model, skipped, "plain model (post-training ternarization)", None, None)
    raise UserError(f"{src} is not a bitdistill student (no '{MARKER_KEY}' marker in config.json); pass "
                     "--from_plain to ternarize it post-training (quality needs distillation)")


def pack_pretrained(
    src: str | Path,
    out: str | Path,
    *,
    from_plain: bool = False,
    gguf_file: str | None = None,
    skip: Iterable[str] | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> PackResult:
    """Pack a BitNet student folder (or, with ``from_plain``, any causal LM) into ``out``.

    Args:
        src: a student folder (``config.json`` with the ``bitdistill`` marker); with ``from_plain`` or
            ``gguf_file`` any model folder (post-training ternarization: warns, quality needs distillation).
        out: output folder, written atomically; never SRC.
        from_plain: allow a source that is not a student.
        gguf_file: a GGUF file name inside ``src`` (implies ``from_plain``).
        skip: module patterns kept in floating point (plain sources only; default ``lm_head``).
            Linear layers with ``out_features % 4 != 0`` are kept and reported (plain sources); a student
            that converted one is refused (packing would change its function).
        dtype: dtype of the unconverted tensors (embeddings, head, norms, biases). ``None``/``"auto"``:
            bfloat16, or float16 for a float16 source (float32 unconverted tensors would make up most of a
            small model's file: SmolLM2-135M packs to 133 MiB instead of 79 MiB, and decodes slower).
            ``"float32"`` keeps a float32 student's exact function.
        max_shard_bytes: shard size limit.
        overwrite: replace an existing ``out``.

    Returns:
        A :class:`PackResult` (print it for the summary).
    """
    out = Path(out)
    src_path = Path(str(src))
    _check_out(src_path, out, overwrite)
    torch_dtype = None if dtype in (None, "auto") else _parse_dtype(dtype)
    source = load_pack_source(src, from_plain=from_plain, gguf_file=gguf_file, skip=skip)
    model, skipped, kind, tokenizer = source.model, source.skipped, source.kind, source.tokenizer
    per_row = any(getattr(m, "per_row", False) for m in model.modules())
    if packs_as_bitnet(model):
        model = subln_to_bitnet(model)
        kind = "BitNet student with SubLN, written as transformers' BitNetForCausalLM"
    elif has_subln(model) or per_row or any(isinstance(m, BitConv1D) for m in model.modules()):
        kind += ", written in bitdistill's extension of the bitnet format (load it with bitdistill.load_packed)"
    if torch_dtype is None:
        torch_dtype = torch.float16 if source.dtype == torch.float16 else torch.bfloat16
    report = save_packed(model, out, dtype=torch_dtype, max_shard_bytes=max_shard_bytes,
                         copy_files_from=src_path if src_path.is_dir() else None, overwrite=overwrite,
                         source=src_path.name, tokenizer=tokenizer, sources=(src_path,))
    report.kept.update({n: r for n, r in skipped.items() if n in report.kept})
    return PackResult(report=report, source_kind=kind, skipped=skipped)


def _parse_dtype(name) -> torch.dtype:
    from bitdistill.convert import parse_dtype

    return parse_dtype(name)


def unpack_pretrained(src: str | Path, out: str | Path, *, overwrite: bool = False) -> list[str]:
    """Packed folder -> float32 BitNet student folder (for further training); returns the unpacked layer names."""
    src, out = Path(src), Path(out)
    _check_out(src, out, overwrite)
    if folder_kind(src, required=True) != "packed":
        raise UserError(f"{src} is not a packed bitnet model (no bitnet quantization_config in config.json)")
    check_safetensors(src)
    student = unpack_to_student(load_packed(src))
    with atomic_output_dir(out, overwrite=overwrite, sources=[src]) as tmp:
        student.save_pretrained(tmp)
        for name in COPY_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
    from bitdistill.nn.bitlinear import BitLinear

    return [n for n, m in student.named_modules() if isinstance(m, BitLinear)]
