"""What the FSDP2 tests run, on each gloo rank and (as the reference) in one process.

The student is a tiny Llama BitNet student with SubLN (random SubLN weights, so they matter), distilled from a
tiny Llama teacher with the logit KL, the attention-relation loss on the last block (forward hooks on q/k/v inside
a sharded block) and CE. The global batch is split into equal halves over the ranks; each rank's loss is scaled so
that FSDP's gradient average equals the one-process gradient of the whole batch.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bitdistill.distill.attention import QKVCapture
from bitdistill.distill.losses import (
    attention_relation_loss,
    cross_entropy_loss,
    logits_distillation_loss,
    prediction_mask,
)
from bitdistill.models import tiny_model
from bitdistill.nn.bitlinear import BitLinear
from bitdistill.nn.replace import replace_linear_with_bitlinear
from bitdistill.nn.subln import insert_subln

BATCH, SEQ, STEPS, LR = 4, 16, 3, 1e-3


def build(seed: int = 0):
    """``(student, teacher, batches)``: identical on every rank for a given ``seed``."""
    teacher = tiny_model("llama", seed=seed + 1).requires_grad_(False)
    student = tiny_model("llama", seed=seed).train()
    replace_linear_with_bitlinear(student)
    insert_subln(student, init="ones")
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name.endswith("rms_norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
    batches = [torch.randint(3, 256, (BATCH, SEQ), generator=gen) for _ in range(STEPS)]
    return student, teacher, batches


def step_loss(student, teacher, ids: torch.Tensor, num_items: float) -> torch.Tensor:
    """The distillation loss of ``ids [b, T]`` normalized by the global ``num_items``."""
    mask = prediction_mask(ids)
    s_cap, t_cap = QKVCapture(student, [-1]), QKVCapture(teacher, [-1])
    with torch.no_grad(), t_cap:
        t_logits = teacher(input_ids=ids).logits
    with s_cap:
        s_logits = student(input_ids=ids).logits
    kl = logits_distillation_loss(s_logits[:, :-1], t_logits[:, :-1], mask, num_items, temperature=2.0)
    rel = attention_relation_loss([x[:, :-1] for x in s_cap.states], [x[:, :-1] for x in t_cap.states], mask,
                                  num_items, num_relation_heads=4)
    return kl + rel + 0.5 * cross_entropy_loss(s_logits, ids, num_items)


def _full(t: torch.Tensor) -> torch.Tensor:
    t = t.full_tensor() if hasattr(t, "full_tensor") else t
    return getattr(t, "_data", t).detach().float().clone()


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: _full(p.grad) for name, p in model.named_parameters() if p.grad is not None}


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: _full(p) for name, p in model.named_parameters()}


def train(student, teacher, batches, *, rank: int = 0, world: int = 1, counter=None):
    """Run the steps; returns the losses, the first step's full gradients, the full weights after each step, the
    weight dtypes BitLinear forwards saw, and each BitLinear's first ``(codes, gamma)`` when its weight has them. ``counter`` (a ``CommCounter``) counts the first step's bytes."""
    opt = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=0.0)
    losses, grads, weights, dtypes = [], None, [], set()
    codes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(name):
        def hook(module, _inputs):
            dtypes.add(str(module.weight.dtype))
            if name not in codes and hasattr(module.weight, "ternary_codes_and_scale"):
                codes[name] = tuple(t.clone() for t in module.weight.ternary_codes_and_scale())
        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in student.named_modules() if isinstance(m, BitLinear)]
    for i, batch in enumerate(batches):
        counting = counter.counting() if counter is not None and i == 0 else contextlib.nullcontext()
        num_items = float(prediction_mask(batch).sum())
        local = batch.chunk(world)[rank]
        with counting:
            loss = step_loss(student, teacher, local, num_items) * world
            loss.backward()
        reported = loss.detach().float() / world
        if world > 1:
            dist.all_reduce(reported)
        losses.append(float(reported))
        if grads is None:
            grads = _grads(student)
        opt.step()
        opt.zero_grad()
        weights.append(_weights(student))
    for h in hooks:
        h.remove()
    return {"losses": losses, "grads": grads, "weights": weights, "forward_weight_dtypes": sorted(dtypes),
            "codes": codes}


def train_bf16_reference(student, teacher, batches):
    """One process emulating FSDP2's bf16 policy: a bf16 copy computes, float32 master weights take the step."""
    work = copy.deepcopy(student).to(torch.bfloat16)
    opt = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=0.0)
    losses, grads, weights = [], None, []
    for batch in batches:
        with torch.no_grad():
            for pw, pm in zip(work.parameters(), student.parameters(), strict=True):
                pw.copy_(pm)
        loss = step_loss(work, teacher, batch, float(prediction_mask(batch).sum()))
        loss.backward()
        for pw, pm in zip(work.parameters(), student.parameters(), strict=True):
            pm.grad = pw.grad.float()
            pw.grad = None
        losses.append(float(loss.detach()))
        if grads is None:
            grads = _grads(student)
        opt.step()
        opt.zero_grad()
        weights.append(_weights(student))
    return {"losses": losses, "grads": grads, "weights": weights}


def rank_main(rank: int, world: int, init_file: str, out_dir: str, mode: str) -> None:
    """One gloo rank: shard the student per block (``mode``: ``fp32``, ``bf16`` or ``ternary``), train, save."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from bitdistill.fsdp.shard import fully_shard_student, save_sharded_student
    from bitdistill.fsdp.ternary import CommCounter
    from bitdistill.fsdp.training import unsharded_student

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        student, teacher, batches = build()
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mode == "bf16" else None
        fully_shard_student(student, mp_policy=mp, ternary_all_gather=mode == "ternary")
        counter = CommCounter()
        result = train(student, teacher, batches, rank=rank, world=world, counter=counter)
        result["comm"] = {"received": counter.received, "sent": counter.sent, "calls": counter.calls}
        result["sharded_dtypes"] = sorted({str(p.dtype) for p in student.parameters()})
        saved = save_sharded_student(student, Path(out_dir) / "student")
        gathered = unsharded_student(student)
        if rank == 0:
            result["gathered"] = {n: t.detach().clone() for n, t in gathered.state_dict().items()}
            result["saved"] = str(saved)
            torch.save(result, Path(out_dir) / "rank0.pt")
    finally:
        dist.destroy_process_group()


def spawn(mode: str, out_dir: Path, world: int = 2, timeout: float = 600.0) -> dict:
    """Run :func:`rank_main` on ``world`` spawned gloo ranks; returns rank 0's result. Fails after ``timeout`` s."""
    import torch.multiprocessing as mp

    init_file = out_dir / "init"
    ctx = mp.start_processes(rank_main, args=(world, str(init_file), str(out_dir), mode), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    os.kill(p.pid, 9)
            raise TimeoutError(f"the {world} FSDP ranks did not finish within {timeout} s")
    return torch.load(out_dir / "rank0.pt", weights_only=False)
