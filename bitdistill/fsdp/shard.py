"""FSDP2 (``torch.distributed.fsdp.fully_shard``) over a BitNet student: wrapping, the full state dict, saving.

A student is sharded per decoder block (each block one FSDP unit, so one block's latent weights are gathered at
a time) and then at the root (embeddings, final norm, head). The teacher is never part of the sharded model:
it is frozen, so each rank keeps its own copy (or a teacher-logit cache replaces it). BitLinear needs nothing
from FSDP2 beyond its ordinary parameters: the all-gathered unsharded weight is the float latent weight (or, with
:mod:`bitdistill.fsdp.ternary`, its 2-bit codes), and SubLN norms and the attention-relation hooks live inside
the block. Everything here runs with any process group backend (gloo on CPU, NCCL on GPUs).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bitdistill.errors import UserError
from bitdistill.host import available_host_bytes
from bitdistill.io import atomic_output_dir, check_output_location
from bitdistill.nn.arch import decoder_layers
from bitdistill.nn.config import student_marker

__all__ = [
    "check_full_state_dict_fits",
    "decoder_block_class",
    "full_state_dict",
    "full_state_dict_bytes",
    "fully_shard_student",
    "save_sharded_student",
]


def decoder_block_class(model: nn.Module) -> str:
    """The class name of ``model``'s decoder block (``LlamaDecoderLayer``, ``Phi3DecoderLayer``, ...): the module
    accelerate's ``fsdp_transformer_layer_cls_to_wrap`` must name."""
    _, blocks = decoder_layers(model, "FSDP wraps one decoder block per unit")
    return type(blocks[0]).__name__


def fully_shard_student(model: nn.Module, *, mesh=None, mp_policy=None, reshard_after_forward: bool = True,
                        ternary_all_gather: bool = False) -> nn.Module:
    """Shard ``model`` in place with FSDP2: one unit per decoder block, then the root; returns ``model``.

    Args:
        model: a student (or any causal LM) on the device its ranks compute on; every rank passes an identical model.
        mesh: a 1-D ``DeviceMesh`` (default: all ranks of the default process group).
        mp_policy: a ``torch.distributed.fsdp.MixedPrecisionPolicy`` (e.g. ``param_dtype=torch.bfloat16,
            reduce_dtype=torch.float32``); ``None`` computes and reduces in the parameters' dtype.
        reshard_after_forward: free each block's gathered weights after its forward (gather again for backward).
        ternary_all_gather: gather BitLinear weights as 2-bit codes and one exact absmean per tensor instead of
            the latent weights (:func:`bitdistill.fsdp.ternary.use_ternary_all_gather`; opt-in).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if ternary_all_gather:
        from bitdistill.fsdp.ternary import use_ternary_all_gather

        use_ternary_all_gather(model)
    kwargs = dict(mesh=mesh, reshard_after_forward=reshard_after_forward,
                  mp_policy=mp_policy if mp_policy is not None else MixedPrecisionPolicy())
    _, blocks = decoder_layers(model, "FSDP wraps one decoder block per unit")
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def full_state_dict_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s full (unsharded) state dict: every distinct parameter and buffer at its global shape."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()  # a DTensor's numel is its global one
    return total


def check_full_state_dict_fits(model: nn.Module, *, available: int | None = None, where: str = "rank 0's host memory",
                               margin: float = 1.25) -> None:
    """Fail in one line, before training, when saving the full state dict could not fit on rank 0.

    Saving gathers every tensor to rank 0 (offloaded to host memory there); it needs ``margin`` times the state
    dict's bytes. ``available`` defaults to :func:`available_host_bytes`.

    Raises:
        UserError: naming both sizes and the fixes.
    """
    need = int(full_state_dict_bytes(model) * margin)
    have = available_host_bytes() if available is None else available
    if need > have:
        raise UserError(f"saving the sharded student gathers its full state dict ({need / 2**30:.2f} GiB with "
                        f"margin) into {where}, which has {have / 2**30:.2f} GiB free; free memory on rank 0, use "
                        f"a machine with more host memory, or save sharded checkpoints (fsdp_state_dict_type "
                        f"SHARDED_STATE_DICT) and consolidate them offline")


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict of a sharded ``model`` as CPU tensors on rank 0 (an empty dict on the other ranks).

    A collective: every rank calls it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from bitdistill.fsdp.ternary import latent_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return latent_state_dict(state)


def save_sharded_student(model: nn.Module, out: str | Path, *, tokenizer=None, overwrite: bool = False) -> Path | None:
    """Gather a sharded student's full state dict and write it on rank 0 as a normal student folder.

    The folder is what ``model.save_pretrained`` writes for an unsharded student (``config.json`` with the
    student marker, safetensors), so :func:`bitdistill.load_student` and ``bitdistill pack`` accept it. A
    collective: every rank calls it; rank 0 writes atomically (temp folder, then rename) and returns the path,
    the others return ``None``.
    """
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    if student_marker(model) is None:
        raise UserError(f"save_sharded_student saves BitNet students; {type(model).__name__} has no bitdistill marker "
                        "on its config (convert it with replace_linear_with_bitlinear before sharding)")
    out = Path(out)
    check_output_location(out)
    if out.exists() and not overwrite:  # before the gather, on every rank: no rank waits on a failed one
        raise FileExistsError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it")
    state = full_state_dict(model)
    if dist.is_initialized() and dist.get_rank() != 0:
        dist.barrier()
        return None
    try:
        with torch.device("meta"):  # no second copy of the weights: only the config and the save logic are used
            skeleton = AutoModelForCausalLM.from_config(model.config, dtype=next(iter(state.values())).dtype)
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            skeleton.save_pretrained(tmp, state_dict=state)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    finally:
        if dist.is_initialized():
            dist.barrier()
    return out
