"""Write a BitNet student (or a packed model) as a packed ``bitnet`` folder; see :mod:`bitdistill.export.format`."""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from torch import nn

from bitdistill.errors import UserError
from bitdistill.export.format import (
    COPY_FILES,
    DEFAULT_MAX_SHARD_BYTES,
    converted_layers,
    is_extension,
    packed_quantization_config,
)
from bitdistill.io import atomic_output_dir
from bitdistill.nn.config import MARKER_KEY
from bitdistill.nn.packed import PackedBitLinear
from bitdistill.quant.packing import pack_ternary
from bitdistill.quant.reference import weight_quant
from bitdistill.state_dict import unique_tensors
from bitdistill.weights import weight_files

__all__ = ["PackReport", "pack_model", "save_packed"]


@dataclass
class PackReport:
    """What :func:`save_packed` wrote.

    Attributes:
        packed: names of the linear modules stored as packed ternary weights.
        kept: ``{name: reason}`` for every linear module stored in floating point.
        ternary_weights: number of weights in the packed layers.
        packed_weight_bytes: bytes of their packed codes plus scales on disk.
        bytes_before: bytes of the input model's tensors (tied tensors counted once).
        bytes_after: bytes of all tensors written.
        bf16_bytes: bytes the same model takes with every tensor in bf16, packed layers counted unpacked
            (the usual baseline: its bf16 safetensors).
        float_dtype: dtype of the floating-point tensors written besides the scales (``""`` if mixed).
        files: the safetensors files written.
    """

    packed: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    ternary_weights: int = 0
    packed_weight_bytes: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    bf16_bytes: int = 0
    float_dtype: str = ""
    files: list[str] = field(default_factory=list)

    @property
    def bits_per_weight(self) -> float:
        """Bits per converted weight on disk, scales included (2.0 plus a little)."""
        return 8 * self.packed_weight_bytes / max(self.ternary_weights, 1)

    def __str__(self) -> str:
        mib = 1024**2
        lines = [f"packed {len(self.packed)} linear layers ({self.ternary_weights:,} ternary weights, "
                 f"{self.bits_per_weight:.3f} bits/weight); kept {len(self.kept)} in floating point"]
        lines += [f"  kept {name}: {reason}" for name, reason in self.kept.items()]
        rest = self.bytes_after - self.packed_weight_bytes
        rest_dtype = f" in {self.float_dtype}" if self.float_dtype else ""
        lines.append(f"tensor bytes: {self.bytes_after / mib:.2f} MiB written ({self.packed_weight_bytes / mib:.2f} MiB "
                     f"packed layers + {rest / mib:.2f} MiB other tensors{rest_dtype}); the same model in bf16: "
                     f"{self.bf16_bytes / mib:.2f} MiB ({self.bf16_bytes / max(self.bytes_after, 1):.2f}x the written "
                     f"size); the input as loaded: {self.bytes_before / mib:.2f} MiB")
        return "\n".join(lines)


def _packed_tensors(name: str, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(uint8 [out/4, in], float32 [1] or [out])`` for a BitLinear or PackedBitLinear (``[out]``: per-row scales);
    raises on unpackable layers."""
    if isinstance(module, PackedBitLinear):
        return module.weight.detach(), module.weight_scale.detach().float().reshape(-1)
    if module.out_features % 4 != 0:
        raise UserError(f"cannot pack {name!r}: out_features={module.out_features} is not a multiple of 4 (the "
                        "format stores 4 rows per byte); convert the student with this module in "
                        "modules_to_not_convert")
    w = module.weight_out_in().detach()  # a Conv1D layer's [in, out] weight, transposed
    if not torch.isfinite(w).all():
        raise UserError(f"cannot pack {name!r}: its weight contains NaN or Inf; fix the checkpoint first")
    codes, gamma = weight_quant(w, module.per_row)
    return pack_ternary(codes), (1.0 / gamma).reshape(-1)


def pack_model(model: nn.Module, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The packed state dict of a BitNet student (or of a model from :func:`load_packed`).

    Args:
        model: a model with :class:`BitLinear` or :class:`PackedBitLinear` layers. Not modified.
        dtype: cast every floating-point tensor except the weight scales to this dtype (``None``: keep).

    Returns:
        ``{key: tensor}`` in state-dict order: ``<m>.weight`` uint8 ``[out/4, in]`` and
        ``<m>.weight_scale`` float32 ``[1]`` (``[out]`` per row) for converted layers, every other tensor unchanged (or cast);
        a tensor shared with an earlier key (tied embeddings) appears once, under its first key.

    Raises:
        ValueError: a converted layer has ``out_features % 4 != 0``, or any tensor holds NaN/Inf.
    """
    converted = converted_layers(model)
    if not converted:
        raise UserError(f"{type(model).__name__} has no BitLinear layer to pack; convert it with "
                        "replace_linear_with_bitlinear (or bitdistill convert) and train it first")
    packed = {name: _packed_tensors(name, m) for name, m in converted.items()}
    state = model.state_dict(keep_vars=False)
    unique = unique_tensors({k: t for k, t in state.items() if k.rpartition(".")[0] not in packed
                             or k.rpartition(".")[2] not in ("weight", "weight_scale")})
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        module_name, _, leaf = key.rpartition(".")
        if module_name in packed and leaf == "weight":
            out[key], out[f"{module_name}.weight_scale"] = packed[module_name]
            continue
        if module_name in packed and leaf == "weight_scale":
            continue
        if key not in unique:
            continue
        if t.is_floating_point():
            if not torch.isfinite(t).all():
                raise UserError(f"cannot pack: tensor {key!r} contains NaN or Inf; fix the checkpoint first")
            if dtype is not None:
                t = t.to(dtype)
        out[key] = t.detach()
    return out


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _model_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes as the model holds them, bytes in bf16), each tensor counted once; in the second, packed
    weights count as ``out * in`` bf16 values and their scales not at all (what the unpacked model takes)."""
    packed = {n: m for n, m in model.named_modules() if isinstance(m, PackedBitLinear)}
    unpacked = {f"{n}.weight": m.out_features * m.in_features for n, m in packed.items()}
    scales = {f"{n}.weight_scale" for n in packed}
    before, bf16 = 0, 0
    for key, t in unique_tensors(model.state_dict()).items():
        before += t.numel() * t.element_size()
        if key in scales:  # the unpacked model has no weight scales
            continue
        if key in unpacked or t.is_floating_point():
            bf16 += 2 * unpacked.get(key, t.numel())
        else:
            bf16 += t.numel() * t.element_size()
    return before, bf16


def _model_card(model: nn.Module, report: PackReport, qc: dict, source: str | None) -> str:
    mib = 1024**2
    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    by = f"Written by `bitdistill pack`{f' from `{source}`' if source else ''}."
    if is_extension(qc):
        load = [f"{by} It is bitdistill's extension of the `bitnet` format (in-layer norms on "
                f"{len(qc.get('rms_norm_modules', []))} layers only, Conv1D projections or per-row weight scales: see "
                "bitdistill's docs/pack.md), which plain transformers refuses; load it with bitdistill:", "",
                "```python", "from bitdistill import load_packed", "model = load_packed(\"path/to/this/folder\")",
                "```", ""]
    else:
        load = [f"{by} Load it with plain transformers:", "",
                "```python", "from transformers import AutoModelForCausalLM",
                "model = AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\")", "```", "",
                "or with `bitdistill.load_packed(path)` for the fast packed kernels.", ""]
    return "\n".join([
        "---", "library_name: transformers", "tags:", "- bitnet", "- ternary", "- bitdistill", "---", "",
        f"# {arch}, BitNet b1.58 packed (1.58-bit weights, int8 activations)", "", *load,
        "| what | value |", "|---|---|",
        f"| linear layers packed (ternary, 4 weights/byte) | {len(report.packed)} |",
        f"| linear layers kept in floating point | {len(report.kept)}: {', '.join(report.kept) or '-'} |",
        f"| ternary weights | {report.ternary_weights:,} ({report.bits_per_weight:.3f} bits each with scales) |",
        f"| in-layer RMSNorm | {qc.get('use_rms_norm', False)} |",
        f"| tensor bytes | {report.bytes_after / mib:.2f} MiB (source {report.bytes_before / mib:.2f} MiB, "
        f"bf16 {report.bf16_bytes / mib:.2f} MiB) |", "",
        f"Weights are ternarized per {'output row' if qc.get('weight_scale') == 'row' else 'tensor'} (absmean scale "
        "`gamma`, stored as `weight_scale = 1/gamma`), activations quantized per token to int8 (absmax), as in "
        "BitNet b1.58.", ""])


def save_packed(
    model: nn.Module,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    copy_files_from: str | Path | None = None,
    overwrite: bool = False,
    source: str | None = None,
    tokenizer=None,
    sources: tuple[str | Path, ...] = (),
) -> PackReport:
    """Write ``model`` as a packed ``bitnet`` checkpoint folder (atomically: temporary folder, then rename).

    Args:
        model: a BitNet student (BitLinear layers) or a :func:`load_packed` model. Not modified.
        out_dir: the folder to write; must not exist unless ``overwrite``.
        dtype: dtype of the unconverted floating-point tensors (``None``: as in ``model``).
        max_shard_bytes: start a new ``model-0000i-of-0000n.safetensors`` shard past this size (+ index), as
            ``huggingface_hub.save_torch_state_dict`` splits.
        copy_files_from: a folder whose tokenizer files are copied (generation config comes from the model).
        overwrite: replace an existing ``out_dir`` (only once the new folder is complete).
        source: where the model came from, for the model card.
        tokenizer: a tokenizer to save into the folder (e.g. one read from a GGUF file).
        sources: folders the model was read from; ``out_dir`` may not be, contain or sit inside one.

    Returns:
        A :class:`PackReport`.
    """
    out_dir = Path(out_dir)
    if max_shard_bytes <= 0:
        raise UserError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    config = getattr(model, "config", None)
    if config is None:
        raise UserError(f"{type(model).__name__} has no transformers config; save_packed needs a PreTrainedModel")
    qc = packed_quantization_config(model)
    tensors = pack_model(model, dtype=dtype)
    converted = converted_layers(model)
    report = PackReport(packed=list(converted))
    report.kept = {n: "in modules_to_not_convert" for n in qc["modules_to_not_convert"]}
    report.ternary_weights = sum(m.in_features * m.out_features for m in converted.values())
    report.packed_weight_bytes = _nbytes(t for k, t in tensors.items()
                                         if k.rpartition(".")[0] in converted and k.endswith(("weight", "weight_scale")))
    report.bytes_before, report.bf16_bytes = _model_bytes(model)
    report.bytes_after = _nbytes(tensors.values())

    new_config = copy.deepcopy(config)
    if hasattr(new_config, MARKER_KEY):
        delattr(new_config, MARKER_KEY)
    new_config.quantization_config = qc
    float_dtypes = {t.dtype for k, t in tensors.items() if t.is_floating_point() and not k.endswith("weight_scale")}
    if len(float_dtypes) == 1:
        new_config.dtype = report.float_dtype = str(next(iter(float_dtypes))).removeprefix("torch.")

    with atomic_output_dir(out_dir, overwrite=overwrite, sources=sources) as tmp:
        save_torch_state_dict({k: t.detach().cpu() for k, t in tensors.items()}, tmp, max_shard_size=max_shard_bytes)
        report.files = weight_files(tmp)
        new_config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if copy_files_from is not None and Path(copy_files_from).is_dir():
            for name in COPY_FILES:
                if (Path(copy_files_from) / name).is_file():
                    shutil.copy2(Path(copy_files_from) / name, tmp / name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(_model_card(model, report, qc, source))
    return report
