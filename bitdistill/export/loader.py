"""Read a packed ``bitnet`` folder (see :mod:`bitdistill.export.format`) and turn it back into a student."""

from __future__ import annotations

import contextlib
import copy
import logging
import re
from pathlib import Path

import torch
from torch import nn

from bitdistill.errors import UserError
from bitdistill.export.format import check_packed_config
from bitdistill.nn.bitlinear import BitLinear
from bitdistill.nn.config import BitNetConfig, student_marker
from bitdistill.nn.packed import PackedBitLinear
from bitdistill.nn.replace import replace_linear_with_bitlinear
from bitdistill.weights import from_local_folder, read_config, read_tensors, tensor_index, validate_loaded

__all__ = ["load_packed", "unpack_to_student"]


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
    check_packed_config(read_config(path), path)
    index = tensor_index(path)
    torch_dtype = dtype if dtype == "auto" else _dtype(dtype)
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
        new.weight_scale = scale.float().reshape(-1).to(m.weight.device)
        new.bias = m.bias
        if m.rms_norm is not None:
            new.rms_norm = m.rms_norm
        model.set_submodule(name, new)
        packed.append(name)
    validate_loaded(model, path, packed_modules=packed)
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
        raise UserError("unpack_to_student expects a model from load_packed (no PackedBitLinear layer found)")
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
        raise UserError("unpack_to_student: the rebuilt model has no BitLinear layer")
    return fresh.to(device).eval()
