"""What ``bitdistill distill`` needs under accelerate's FSDP2 (``--fsdp true --fsdp_config '{"version": 2}'``).

accelerate applies ``fully_shard`` to the student (the Trainer's ``model``) only: the teacher is an attribute of
the trainer, frozen, and every rank keeps its own copy. Three things are ours:

* **which modules to wrap**: the student's decoder block class (:func:`bitdistill.fsdp.shard.decoder_block_class`).
  accelerate wraps ``transformer_layer_cls_to_wrap`` when given, else the model's ``_no_split_modules``;
  :func:`prepare_student_for_fsdp` checks that one of them names the block before anything trains.
* **saving**: after training the student's parameters are ``DTensor`` shards; :func:`unsharded_student` gathers the
  full state dict to rank 0 (a collective) and rebuilds a plain student there, which the normal save, pack and
  evaluation code then use. :func:`prepare_student_for_fsdp` checks first that rank 0's host memory can hold it,
  so a run that could not save fails in one line before training, not after.
* **the ternary all-gather** (opt-in): ``"bitdistill_ternary_all_gather": true`` in ``--fsdp_config`` wraps the
  BitLinear weights (:func:`bitdistill.fsdp.ternary.use_ternary_all_gather`) before accelerate shards them.
"""

from __future__ import annotations

import torch
from torch import nn

from bitdistill.errors import UserError
from bitdistill.fsdp.shard import check_full_state_dict_fits, decoder_block_class, full_state_dict
from bitdistill.nn.config import bitnet_config

__all__ = ["TERNARY_KEY", "is_sharded", "prepare_student_for_fsdp", "unsharded_student"]

TERNARY_KEY = "bitdistill_ternary_all_gather"


def _fsdp_on(training_args) -> bool:
    fsdp = getattr(training_args, "fsdp", None)
    return bool(fsdp) and fsdp != "none"


def prepare_student_for_fsdp(training_args, student: nn.Module, *, available: int | None = None) -> None:
    """Check (and, with the opt-in key, modify) ``student`` for accelerate FSDP; nothing happens without ``--fsdp``.

    Args:
        training_args: the run's ``transformers.TrainingArguments`` (not modified).
        student: the student before the Trainer is built; its BitLinear weights are wrapped in place when
            ``--fsdp_config`` sets ``"bitdistill_ternary_all_gather": true``.
        available: rank 0's free host memory in bytes (default: measured).

    Raises:
        UserError: FSDP1 asked for, a wrap class that is not the student's block, or a full state dict that rank 0
            could not hold (one line each, naming the setting and the fix).
    """
    if not _fsdp_on(training_args):
        return
    cfg = dict(getattr(training_args, "fsdp_config", None) or {})
    version = int(cfg.get("version", 2))
    if version != 2:
        raise UserError(f"--fsdp_config version {version}: bitdistill students are tested under FSDP2 only; set "
                        '"version": 2')
    block = decoder_block_class(student)
    wrap = cfg.get("transformer_layer_cls_to_wrap") or list(getattr(student, "_no_split_modules", None) or [])
    if cfg.get("auto_wrap_policy", "TRANSFORMER_BASED_WRAP") == "TRANSFORMER_BASED_WRAP" and block not in wrap:
        raise UserError(f"--fsdp_config transformer_layer_cls_to_wrap {wrap} does not name the student's decoder "
                        f"block {block}; set it to [\"{block}\"] (one FSDP unit per block)")
    if cfg.get(TERNARY_KEY):
        from bitdistill.fsdp.ternary import use_ternary_all_gather

        use_ternary_all_gather(student, world_size=getattr(training_args, "world_size", 1))
    if getattr(training_args, "process_index", 0) == 0:
        check_full_state_dict_fits(student, available=available)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` has FSDP2-sharded (``DTensor``) parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def unsharded_student(model: nn.Module) -> nn.Module | None:
    """``model`` itself when it is not sharded; else a collective that returns, on rank 0, a plain CPU student
    rebuilt from the full state dict (BitLinear, SubLN, marker: what ``save_pretrained`` and ``pack`` expect), and
    ``None`` on the other ranks."""
    if not is_sharded(model):
        return model
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from bitdistill.nn.replace import replace_linear_with_bitlinear

    state = full_state_dict(model)
    if dist.get_rank() != 0:
        return None
    dtype = next(iter(state.values())).dtype
    with no_init_weights():  # every weight comes from the state dict; buffers (rotary) are built as usual
        plain = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
    plain.load_state_dict(state, strict=False, assign=True)  # the latent weights, before the conversion checks them
    replace_linear_with_bitlinear(plain, bitnet_config(model.config))
    plain.load_state_dict(state, strict=True, assign=True)  # now the SubLN norms too
    plain.tie_weights()
    return plain.to(torch.device("cpu")).train(model.training)
