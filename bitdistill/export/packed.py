"""Write and read BitNet b1.58 models in the Hugging Face ``bitnet`` packed format.

The format (DESIGN.md "Packed format"): every converted linear layer ``<m>`` is stored as
``<m>.weight`` ``uint8 [out/4, in]`` (2-bit codes, :mod:`bitdistill.quant.packing`) and
``<m>.weight_scale`` float32 ``[1]`` = ``1 / gamma``; biases, in-layer RMSNorm weights and every
other tensor stay floating point; ``config.json`` carries ``quantization_config`` =
``{"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline",
"modules_to_not_convert": [...]}``. Plain ``transformers.AutoModelForCausalLM.from_pretrained``
loads it; :func:`load_packed` loads it with :class:`bitdistill.nn.PackedBitLinear` layers.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bitdistill.io import atomic_output_dir
from bitdistill.nn.bitlinear import BitConv1D, BitLinear
from bitdistill.nn.config import MARKER_KEY, BitNetConfig, is_packed_config, read_config_json, student_marker
from bitdistill.nn.packed import PackedBitLinear
from bitdistill.nn.replace import matches_module_pattern, replace_linear_with_bitlinear
from bitdistill.quant.packing import pack_ternary
from bitdistill.quant.reference import weight_quant
from bitdistill.state_dict import unique_tensors

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "PackReport",
    "is_packed_config",
    "load_packed",
    "pack_model",
    "packed_quantization_config",
    "save_packed",
    "unpack_to_student",
]

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
_COPY_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
               "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


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


def _linear_names(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear-like module (nn.Linear, BitLinear, PackedBitLinear, Conv1D) by name."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, PackedBitLinear)) or (type(m).__name__ == "Conv1D" and hasattr(m, "nf")):
            out[name] = m
    return out


def _packed_tensors(name: str, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(uint8 [out/4, in], float32 [1])`` for a BitLinear or PackedBitLinear; raises on unpackable layers."""
    if isinstance(module, PackedBitLinear):
        return module.weight.detach(), module.weight_scale.detach().float().reshape(1)
    if isinstance(module, BitConv1D):
        raise ValueError(f"cannot pack {name!r}: GPT-2 style Conv1D layers are not nn.Linear, so the Hugging Face "
                         "bitnet loader would not convert them; pack a model with nn.Linear projections")
    if module.out_features % 4 != 0:
        raise ValueError(f"cannot pack {name!r}: out_features={module.out_features} is not a multiple of 4 (the "
                         "format stores 4 rows per byte); convert the student with this module in "
                         "modules_to_not_convert")
    w = module.weight.detach()
    if not torch.isfinite(w).all():
        raise ValueError(f"cannot pack {name!r}: its weight contains NaN or Inf; fix the checkpoint first")
    codes, gamma = weight_quant(w)
    return pack_ternary(codes), (1.0 / gamma).reshape(1)


def _converted(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in _linear_names(model).items() if isinstance(m, (BitLinear, PackedBitLinear))}


def pack_model(model: nn.Module, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The packed state dict of a BitNet student (or of a model from :func:`load_packed`).

    Args:
        model: a model with :class:`BitLinear` or :class:`PackedBitLinear` layers. Not modified.
        dtype: cast every floating-point tensor except the weight scales to this dtype (``None``: keep).

    Returns:
        ``{key: tensor}`` in state-dict order: ``<m>.weight`` uint8 ``[out/4, in]`` and
        ``<m>.weight_scale`` float32 ``[1]`` for converted layers, every other tensor unchanged (or cast);
        a tensor shared with an earlier key (tied embeddings) appears once, under its first key.

    Raises:
        ValueError: a converted layer has ``out_features % 4 != 0``, is a Conv1D, or any tensor holds NaN/Inf.
    """
    converted = _converted(model)
    if not converted:
        raise ValueError(f"{type(model).__name__} has no BitLinear layer to pack; convert it with "
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
                raise ValueError(f"cannot pack: tensor {key!r} contains NaN or Inf; fix the checkpoint first")
            if dtype is not None:
                t = t.to(dtype)
        out[key] = t.detach()
    return out


def packed_quantization_config(model: nn.Module) -> dict:
    """The ``quantization_config`` for ``model``'s packed checkpoint (``modules_to_not_convert`` never empty).

    Raises:
        ValueError: the converted layers disagree on the in-layer RMSNorm, the output head is converted,
            or transformers' pattern rule would not reproduce exactly this set of converted layers.
    """
    linears = _linear_names(model)
    converted = _converted(model)
    kept = sorted(n for n in linears if n not in converted)
    if not kept:
        raise ValueError("every linear layer (the output head included) is converted; the bitnet format needs "
                         "the output head kept in floating point (an empty modules_to_not_convert makes "
                         "transformers convert lm_head)")
    for name in linears:
        if (name in converted) == any(matches_module_pattern(name, p) for p in kept):
            raise ValueError(f"module {name!r} would be {'kept' if name in converted else 'converted'} by "
                             "transformers' modules_to_not_convert rule; rename or convert it consistently")
    norms = {(m.rms_norm is not None, m.rms_norm.variance_epsilon if m.rms_norm is not None else None)
             for m in converted.values()}
    if len(norms) != 1:
        raise ValueError("converted layers disagree on the in-layer RMSNorm (use_rms_norm / eps), e.g. a SubLN "
                         "student (norms before o_proj/down_proj only); the bitnet format has one setting for "
                         "all layers (a SubLN student packs as BitNetForCausalLM: bitdistill pack, or "
                         "bitdistill.export.bitnet_arch.subln_to_bitnet before save_packed)")
    (use_rms_norm, eps), = norms
    qc = {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline",
          "modules_to_not_convert": kept}
    if use_rms_norm:
        qc.update(use_rms_norm=True, rms_norm_eps=float(eps))
    return qc


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


def _write_shards(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> list[str]:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        t = t.detach().to("cpu")
        shards[-1][key] = t.contiguous().clone() if t.untyped_storage().nbytes() != n else t.contiguous()
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": _nbytes(tensors.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


def _model_card(model: nn.Module, report: PackReport, qc: dict, source: str | None) -> str:
    mib = 1024**2
    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    return "\n".join([
        "---", "library_name: transformers", "tags:", "- bitnet", "- ternary", "- bitdistill", "---", "",
        f"# {arch}, BitNet b1.58 packed (1.58-bit weights, int8 activations)", "",
        f"Written by `bitdistill pack`{f' from `{source}`' if source else ''}. Load it with plain transformers:", "",
        "```python", "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\")", "```", "",
        "or with `bitdistill.load_packed(path)` for the fast packed kernels.", "",
        "| what | value |", "|---|---|",
        f"| linear layers packed (ternary, 4 weights/byte) | {len(report.packed)} |",
        f"| linear layers kept in floating point | {len(report.kept)}: {', '.join(report.kept) or '-'} |",
        f"| ternary weights | {report.ternary_weights:,} ({report.bits_per_weight:.3f} bits each with scales) |",
        f"| in-layer RMSNorm | {qc.get('use_rms_norm', False)} |",
        f"| tensor bytes | {report.bytes_after / mib:.2f} MiB (source {report.bytes_before / mib:.2f} MiB, "
        f"bf16 {report.bf16_bytes / mib:.2f} MiB) |", "",
        "Weights are ternarized per tensor (absmean scale `gamma`, stored as `weight_scale = 1/gamma`), "
        "activations quantized per token to int8 (absmax), as in BitNet b1.58.", ""])


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
) -> PackReport:
    """Write ``model`` as a packed ``bitnet`` checkpoint folder (atomically: temporary folder, then rename).

    Args:
        model: a BitNet student (BitLinear layers) or a :func:`load_packed` model. Not modified.
        out_dir: the folder to write; must not exist unless ``overwrite``.
        dtype: dtype of the unconverted floating-point tensors (``None``: as in ``model``).
        max_shard_bytes: start a new ``model-0000i-of-0000n.safetensors`` shard past this size (+ index).
        copy_files_from: a folder whose tokenizer files are copied (generation config comes from the model).
        overwrite: replace an existing ``out_dir`` (only once the new folder is complete).
        source: where the model came from, for the model card.
        tokenizer: a tokenizer to save into the folder (e.g. one read from a GGUF file).

    Returns:
        A :class:`PackReport`.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite (overwrite=True) to replace it")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no transformers config; save_packed needs a PreTrainedModel")
    qc = packed_quantization_config(model)
    tensors = pack_model(model, dtype=dtype)
    converted = _converted(model)
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

    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        report.files = _write_shards(tensors, tmp, max_shard_bytes)
        new_config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if copy_files_from is not None and Path(copy_files_from).is_dir():
            for name in _COPY_FILES:
                if (Path(copy_files_from) / name).is_file():
                    shutil.copy2(Path(copy_files_from) / name, tmp / name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(_model_card(model, report, qc, source))
        _public_permissions(tmp)
    return report


def _public_permissions(folder: Path) -> None:
    """Give the temporary folder (created 0700) and its files the usual umask-based permissions."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def _weight_scales(path: Path) -> dict[str, torch.Tensor]:
    """Every ``*.weight_scale`` tensor of the folder's safetensors, as stored (float32)."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    out = {}
    for fname in files:
        with safe_open(str(path / fname), framework="pt") as f:
            for key in f.keys():
                if key.endswith(".weight_scale"):
                    out[key] = f.get_tensor(key).float()
    return out


def load_packed(path: str | Path, *, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu"):
    """Load a packed ``bitnet`` folder with :class:`PackedBitLinear` layers (packed bytes stay resident).

    Args:
        path: a folder written by :func:`save_packed` (or any ``bitnet``/``bitlinear``/offline checkpoint).
        dtype: dtype of the floating-point tensors (``"auto"``: as stored).
        device: where to put the model.

    Returns:
        The causal LM in eval mode; ``model.config.quantization_config`` is kept, so :func:`save_packed`
        writes it back byte for byte.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    cfg = read_config_json(path)
    qc = cfg.get("quantization_config") or {}
    if not is_packed_config(cfg):
        raise ValueError(f"{path} is not a packed bitnet model (config.json has no bitnet quantization_config); "
                         "pack it first with bitdistill pack")
    if qc.get("linear_class", "bitlinear") != "bitlinear" or qc.get("quantization_mode", "offline") != "offline":
        raise ValueError(f"{path}: only linear_class='bitlinear', quantization_mode='offline' is supported, got "
                         f"{qc.get('linear_class')!r}/{qc.get('quantization_mode')!r}")
    torch_dtype = dtype if dtype == "auto" else _dtype(dtype)
    with _no_unpacking_warning():  # transformers' BitLinear unpacks; the PackedBitLinear layers below do not
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, device_map=None)
    scales = _weight_scales(path)
    for name, m in list(model.named_modules()):
        if type(m).__name__ != "BitLinear" or isinstance(m, BitLinear):
            continue
        new = PackedBitLinear.like(m, device="meta")
        new.weight = m.weight
        new.weight_scale = scales[f"{name}.weight_scale"].to(m.weight.device)
        new.bias = m.bias
        if m.rms_norm is not None:
            new.rms_norm = m.rms_norm
        model.set_submodule(name, new)
    return model.to(device).eval()


_UNPACKING_WARNING = "You don't have a GPU available to load the model"


@contextlib.contextmanager
def _no_unpacking_warning():
    """Drop exactly transformers' "no GPU ... slow because of weight unpacking" warning while loading.

    The message is a ``warning_once``: it is dropped on the logger instance, before that method's cache, so a
    later plain ``from_pretrained`` (whose BitLinear layers do unpack) still shows it.
    """
    log = logging.getLogger("transformers.quantizers.quantizer_bitnet")
    once = getattr(log, "warning_once", None)
    if once is None:  # transformers without warning_once: nothing to drop
        yield
        return

    def warning_once(msg, *args, **kwargs):
        if not str(msg).startswith(_UNPACKING_WARNING):
            once(msg, *args, **kwargs)

    log.warning_once = warning_once
    try:
        yield
    finally:
        del log.warning_once


def _dtype(name) -> torch.dtype:
    from bitdistill.convert import parse_dtype

    return parse_dtype(name)


def unpack_to_student(model: nn.Module):
    """A BitNet student (BitLinear layers, latent weights ``T * gamma``) equal in function to a packed model.

    Args:
        model: a :func:`load_packed` model. Not modified.

    Returns:
        A fresh float32 model whose config carries the student marker and no ``quantization_config``;
        its BitLinear layers ternarize back to the same codes (same packed bytes) and, up to float32
        rounding, the same scales (see :meth:`PackedBitLinear.to_bitlinear`).
    """
    from transformers import AutoModelForCausalLM

    packed = {n: m for n, m in model.named_modules() if isinstance(m, PackedBitLinear)}
    if not packed:
        raise ValueError("unpack_to_student expects a model from load_packed (no PackedBitLinear layer found)")
    config = copy.deepcopy(model.config)
    qc = config.quantization_config
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    del config.quantization_config
    device = next(iter(model.buffers())).device
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    kept = [re.escape(n) + "$" for n in qc["modules_to_not_convert"]]
    first = next(iter(packed.values()))
    replace_linear_with_bitlinear(fresh, BitNetConfig(
        modules_to_not_convert=kept, use_rms_norm=first.use_rms_norm,
        rms_norm_eps=first.rms_norm.variance_epsilon if first.rms_norm else 1e-6, convert_output_head=True))
    state = {}
    for key, t in model.state_dict().items():
        module_name, _, leaf = key.rpartition(".")
        if module_name in packed and leaf == "weight_scale":
            continue
        if module_name in packed and leaf == "weight":
            t = packed[module_name].to_bitlinear().weight.detach()
        state[key] = t.float() if t.is_floating_point() else t
    fresh.load_state_dict(state, strict=True)
    if student_marker(fresh) is None:
        raise ValueError("unpack_to_student: the rebuilt model has no BitLinear layer")
    return fresh.to(device).eval()
