"""SubLN: an extra RMSNorm before the attention output projection and the MLP down projection.

BitNet b1.58 2B4T and BitDistill add these norms so the activations entering the two projections
whose inputs vary most in scale are normalized before int8 quantization. Here the norm is the
:class:`~bitdistill.nn.BitRMSNorm` that every :class:`~bitdistill.nn.BitLinear` can carry in front of
its activation quantizer (``<module>.rms_norm.weight``), enabled only on those projections; the
student marker records the modules (``config.bitdistill["subln_modules"]``) so
:func:`bitdistill.load_student` restores them.

Initialization. A norm cannot leave the function unchanged: it removes each token's scale. But
BitLinear is exactly scale-equivariant per token (``BitLinear(c x) = c BitLinear(x)`` for ``c > 0``,
since the int8 codes do not change and ``s_x`` scales by ``1/c``), so with a constant weight ``g`` the
projection computes ``BitLinear(x) * g / rms(x)``: the output is unchanged for every token whose input
RMS equals ``g``. ``init="calibrated"`` sets ``g`` to the mean per-token input RMS of each projection on a
calibration batch, so output magnitudes are preserved on average; ``init="ones"`` sets ``g = 1``.
"""

from __future__ import annotations

import torch
from torch import nn

from bitdistill.errors import UserError
from bitdistill.nn.arch import arch_spec, decoder_layers
from bitdistill.nn.bitlinear import BitLinear, BitRMSNorm
from bitdistill.nn.config import MARKER_KEY, student_marker

__all__ = ["SUBLN_INITS", "attach_subln_norms", "default_subln_eps", "insert_subln", "subln_module_names"]

SUBLN_INITS = ("calibrated", "ones")
# The eps of students that predate the default following the model's rms_norm_eps (their marker records it).
FALLBACK_SUBLN_EPS = 1e-6


def default_subln_eps(model: nn.Module) -> float:
    """The SubLN eps when none is given: the model's ``config.rms_norm_eps``, else :data:`FALLBACK_SUBLN_EPS`."""
    eps = getattr(model.config, "rms_norm_eps", None)
    return float(eps) if isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0 else FALLBACK_SUBLN_EPS


def subln_module_names(model: nn.Module) -> list[str]:
    """Names of the attention-output and down projections of every block (where SubLN goes)."""
    spec = arch_spec(model, "SubLN insertion", "turn it off with --subln false", needs="subln")
    prefix, blocks = decoder_layers(model)
    return [f"{prefix}.{i}.{name}" for i in range(len(blocks)) for name in (spec.attn_out, spec.mlp_out)]


def attach_subln_norms(model: nn.Module, names: list[str], eps: float) -> None:
    """Give the BitLinear modules ``names`` an in-layer RMSNorm (weight 1), in place, and record them in the marker."""
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, BitLinear):
            raise UserError(f"SubLN needs {name!r} to be a BitLinear (convert the model first), got "
                            f"{type(module).__name__}")
        if module.rms_norm is None:
            module.rms_norm = BitRMSNorm(module.in_features, eps, device=module.weight.device, dtype=module.weight.dtype)
            module.use_rms_norm = True
    marker = student_marker(model)
    if marker is None:
        raise UserError("SubLN needs a converted student (no bitdistill marker on the model's config)")
    setattr(model.config, MARKER_KEY, {**marker, "subln_modules": list(names), "subln_eps": float(eps)})


@torch.no_grad()
def insert_subln(model: nn.Module, *, eps: float | None = None, init: str = "calibrated",
                 calibration_input_ids: torch.Tensor | None = None) -> list[str]:
    """Insert SubLN norms into a converted student, in place; returns the module names.

    Args:
        model: a causal LM already converted with :func:`bitdistill.replace_linear_with_bitlinear`.
        eps: RMSNorm epsilon; ``None``: the model's own ``config.rms_norm_eps`` (1e-6 if it has none), so the
            SubLN norms match the model's other norms (what ``BitNetForCausalLM`` and llama.cpp express exactly).
        init: ``calibrated`` (weight = mean input RMS on ``calibration_input_ids [B, T]``) or ``ones``.
        calibration_input_ids: token ids for the calibrated init.
    """
    if init not in SUBLN_INITS:
        raise UserError(f"unknown SubLN init {init!r}; choose one of {', '.join(SUBLN_INITS)}")
    names = subln_module_names(model)
    eps = default_subln_eps(model) if eps is None else float(eps)
    if student_marker(model) and student_marker(model).get("use_rms_norm"):
        raise UserError("the student already has an in-layer RMSNorm in every BitLinear (use_rms_norm); SubLN "
                        "would not add anything")
    scales: dict[str, float] = {}
    if init == "calibrated":
        if calibration_input_ids is None:
            raise UserError("SubLN init 'calibrated' needs calibration_input_ids")
        handles = []
        for name in names:
            def pre_hook(_m, inputs, name=name):
                x = inputs[0].float()
                scales[name] = x.pow(2).mean(-1).sqrt().mean().item()
            handles.append(model.get_submodule(name).register_forward_pre_hook(pre_hook))
        was_training = model.training
        model.eval()
        try:
            model(input_ids=calibration_input_ids)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
    attach_subln_norms(model, names, eps)
    for name in names:
        if name in scales:
            model.get_submodule(name).rms_norm.weight.fill_(max(scales[name], eps))
    return names
