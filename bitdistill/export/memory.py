"""Pack a trained BitNet student in memory, to evaluate exactly what ``bitdistill pack`` would ship."""

from __future__ import annotations

import copy

from torch import nn

from bitdistill.errors import UserError
from bitdistill.export.bitnet_arch import packs_as_bitnet, subln_to_bitnet
from bitdistill.export.format import packed_quantization_config
from bitdistill.export.writer import pack_model
from bitdistill.nn.bitlinear import BitLinear
from bitdistill.nn.packed import PackedBitLinear

__all__ = ["pack_in_memory"]


def pack_in_memory(student: nn.Module) -> nn.Module:
    """A copy of ``student`` whose BitLinear layers are :class:`PackedBitLinear` holding :func:`pack_model`'s tensors.

    Args:
        student: a BitNet student (BitLinear layers). Not modified.

    Returns:
        The packed model in eval mode, on the student's device.

    A SubLN student becomes transformers' ``BitNetForCausalLM`` (:func:`subln_to_bitnet`) where it maps exactly,
    as ``bitdistill pack`` writes it; other students keep their architecture (the extension of the format where
    the ``bitnet`` format cannot express them).

    Raises:
        ValueError: the student cannot be packed (in-layer norms with different eps values, a converted
            output head, ``out_features % 4 != 0``, NaN/Inf); the message says why.
    """
    if packs_as_bitnet(student):
        return subln_to_bitnet(student)
    packed_quantization_config(student)
    state = pack_model(student)
    model = copy.deepcopy(student)
    packed_names = set()
    for name, m in list(model.named_modules()):
        if isinstance(m, BitLinear):
            packed_names.add(name)
            model.set_submodule(name, PackedBitLinear.like(m, device=m.weight.device, dtype=m.weight.dtype))
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k.rsplit(".", 1)[0] in packed_names]
    if result.unexpected_keys or missing:
        raise UserError(f"the packed tensors do not match the model: unexpected {result.unexpected_keys[:3]}, "
                        f"missing {missing[:3]}")
    return model.eval()
