"""Read a packed ``bitnet`` folder (see :mod:`bitdistill.export.format`) and turn it back into a student."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import re
from pathlib import Path

import torch
from torch import nn

from bitdistill.errors import UserError
from bitdistill.export.format import check_packed_config, is_extension
from bitdistill.nn.arch import is_conv1d
from bitdistill.nn.bitlinear import BitConv1D, BitLinear
from bitdistill.nn.config import BitNetConfig, student_marker
from bitdistill.nn.packed import PackedBitLinear
from bitdistill.nn.replace import replace_linear_with_bitlinear
from bitdistill.weights import from_local_folder, read_config, read_tensors, tensor_index, validate_loaded

__all__ = ["load_packed", "unpack_to_student"]


def load_packed(path: str | Path, *, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu"):
    """Load a packed ``bitnet`` folder with :class:`PackedBitLinear` layers (packed bytes stay resident).

    Args:
        path: a folder written by :func:`save_packed` (or any ``bitnet``/``bitlinear``/offline checkpoint), in
            the ``bitnet`` format or bitdistill's extension of it (:mod:`bitdistill.export.format`).
        dtype: dtype of the floating-point tensors (``"auto"``: as stored).
        device: where to put the model.

    Returns:
        The causal LM in eval mode; ``model.config.quantization_config`` is kept, so :func:`save_packed`
        writes it back byte for byte.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    config = read_config(path)
    qc = check_packed_config(config, path)
    index = tensor_index(path)
    torch_dtype = dtype if dtype == "auto" else _dtype(dtype)
    if is_extension(qc):
        return _load_extension(path, config, qc, index, torch_dtype).to(device).eval()
    with _no_unpacking_warning():  # transformers' BitLinear unpacks; the PackedBitLinear layers below do not
        model = from_local_folder(AutoModelForCausalLM.from_pretrained, path, model=True, dtype=torch_dtype,
                                  device_map=None)
    packed: list[str] = []
    scales = read_tensors(path, [k for k in index if k.endswith(".weight_scale")])
    for name, m in list(model.named_modules()):
        if type(m).__name__ != "BitLinear" or isinstance(m, BitLinear):
            continue
        new = PackedBitLinear.like(m, device="meta")
        new.weight = m.weight
        scale = scales.get(f"{name}.weight_scale")
        if scale is None:
            raise UserError(f"tensor '{name}.weight_scale' is missing from the weights in {path}; the folder is "
                            "incomplete: re-pack the student")
        _check_scale_length(path, name, scale.shape, m.out_features)
        new.weight_scale = scale.float().reshape(-1).to(m.weight.device)
        new.bias = m.bias
        if m.rms_norm is not None:
            new.rms_norm = m.rms_norm
        model.set_submodule(name, new)
        packed.append(name)
    validate_loaded(model, path, packed_modules=packed)
    return model.to(device).eval()


def _load_extension(path: Path, config: dict, qc: dict, index: dict, dtype) -> nn.Module:
    """A folder in bitdistill's extension of the format (:mod:`bitdistill.export.format`): the architecture built
    with empty weights, a :class:`PackedBitLinear` wherever the folder holds a ``weight_scale`` (in place of an
    ``nn.Linear`` or ``Conv1D``; with an in-layer RMSNorm where ``rms_norm_modules`` says), then every tensor."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    plain = {k: v for k, v in config.items() if k != "quantization_config"}
    try:
        cfg = AutoConfig.for_model(**plain)
        with init_empty_weights(include_buffers=False):  # rotary tables and other buffers computed as usual
            model = AutoModelForCausalLM.from_config(cfg, dtype=None if dtype == "auto" else dtype)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"transformers cannot build the model of {path} ({type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); check its config.json") from exc
    normed, eps = set(qc.get("rms_norm_modules") or ()), float(qc.get("rms_norm_eps", 1e-6))
    packed = sorted({k.rpartition(".")[0] for k in index if k.endswith(".weight_scale")})
    for name in packed:
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"{path} holds packed weights for {name!r}, which its architecture does not have; "
                            "re-pack the student") from None
        in_f, out_f = old.weight.shape if is_conv1d(old) else (old.in_features, old.out_features)
        scale_shape = index[f"{name}.weight_scale"].shape
        _check_scale_length(path, name, scale_shape, out_f)
        model.set_submodule(name, PackedBitLinear(in_f, out_f, bias=getattr(old, "bias", None) is not None,
                                                  use_rms_norm=name in normed, rms_norm_eps=eps,
                                                  per_row=math.prod(scale_shape) != 1, device="meta"))
    tensors = read_tensors(path, list(index))
    if dtype != "auto":
        tensors = {k: t.to(dtype) if t.is_floating_point() and not k.endswith(".weight_scale") else t
                   for k, t in tensors.items()}
    result = model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    empty = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if result.unexpected_keys or empty:
        what = (f"tensor {result.unexpected_keys[0]!r} has no place in the model" if result.unexpected_keys else
                f"tensor {empty[0]!r} is missing from the weights")
        raise UserError(f"{path}: {what}; the folder does not match its config.json: re-pack the student")
    for m in model.modules():
        if isinstance(m, PackedBitLinear) and m.rms_norm is not None:
            m.rms_norm.requires_grad_(False)
    validate_loaded(model, path, packed_modules=packed)
    model.config.quantization_config = dict(qc)  # as load_packed keeps it, so save_packed writes it back
    return model


def _check_scale_length(path: Path, name: str, shape, out_features: int) -> None:
    """A layer's ``weight_scale`` holds one value (per tensor) or ``out_features`` (per row), as one 1-D tensor."""
    n = math.prod(shape)
    if len(shape) > 1 or n not in (1, out_features):
        raise UserError(f"tensor '{name}.weight_scale' in {path} has shape {list(shape)}; a weight scale holds 1 value "
                        f"(per tensor) or {out_features} (one per output row): the folder is corrupt, re-pack the student")


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
        raise UserError("unpack_to_student expects a model from load_packed (no PackedBitLinear layer found)")
    config = copy.deepcopy(model.config)
    qc = config.quantization_config
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    del config.quantization_config
    device = next(iter(model.buffers())).device
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    kept = [re.escape(n) + "$" for n in qc["modules_to_not_convert"]]
    first = next(iter(packed.values()))
    if len({m.per_row for m in packed.values()}) > 1:
        raise UserError("unpack_to_student: some packed layers have per-row weight scales and others one per tensor; "
                        "a student holds one kind (BitNetConfig.weight_scale)")
    weight_scale = "row" if first.per_row else "tensor"
    if is_extension(qc):  # the norms go where the folder had them, as a SubLN student keeps them
        normed = tuple(n for n, m in packed.items() if m.rms_norm is not None)
        eps = next((packed[n].rms_norm.variance_epsilon for n in normed), 1e-6)
        conversion = BitNetConfig(modules_to_not_convert=kept, convert_output_head=True, subln_modules=normed,
                                  subln_eps=eps, weight_scale=weight_scale)
    else:
        conversion = BitNetConfig(modules_to_not_convert=kept, use_rms_norm=first.use_rms_norm,
                                  rms_norm_eps=first.rms_norm.variance_epsilon if first.rms_norm else 1e-6,
                                  convert_output_head=True, weight_scale=weight_scale)
    replace_linear_with_bitlinear(fresh, conversion)
    state = {}
    for key, t in model.state_dict().items():
        module_name, _, leaf = key.rpartition(".")
        if module_name in packed and leaf == "weight_scale":
            continue
        if module_name in packed and leaf == "weight":
            t = packed[module_name].to_bitlinear().weight.detach()
            if isinstance(fresh.get_submodule(module_name), BitConv1D):
                t = t.t()  # Conv1D keeps [in, out]
        state[key] = t.float() if t.is_floating_point() else t
    fresh.load_state_dict(state, strict=True)
    if student_marker(fresh) is None:
        raise UserError("unpack_to_student: the rebuilt model has no BitLinear layer")
    return fresh.to(device).eval()
