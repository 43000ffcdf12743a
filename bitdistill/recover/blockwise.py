"""Calibrated initialization and block-wise reconstruction of a BitNet student, one decoder block at a time.

For block ``i`` (in order), with ``X_t`` the teacher's hidden states entering it on the calibration blocks:

1. the teacher block's output ``Y_t = teacher_block(X_t)`` is computed once (it is the next block's input);
2. **calibrated initialization** (``init="gptq"``): each BitLinear of the student block gets the ternary
   weight (codes, scale) minimizing the output error of the teacher's weight on the block's inputs
   (:func:`bitdistill.recover.ternary.calibrated_ternary`), encoded as latent weights that BitLinear's own
   recomputation maps back to exactly those codes;
3. **reconstruction** (``steps > 0``): Adam on the student block's parameters (latent weights through the
   straight-through estimator, norms, biases) so that ``student_block(X_in)`` matches ``Y_t``, where ``X_in``
   is ``X_t`` or, with ``student_inputs``, the student's own previous-block outputs ``X_s`` (so the block
   also learns to correct the drift accumulated before it).

Only three or four hidden-state tensors of the calibration set are held at a time (``X_t``, ``Y_t``, ``X_s``,
plus the same for the held-out blocks) and one block's optimizer state. With a ``work_dir`` each finished
block's parameters and the hidden states entering the next block are saved, so an interrupted run resumes
at the next block and gives the same student as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from bitdistill.errors import UserError
from bitdistill.host import available_host_bytes
from bitdistill.io import atomic_write
from bitdistill.nn.arch import decoder_layers, is_conv1d
from bitdistill.nn.bitlinear import BitConv1D, BitLinear
from bitdistill.recover.layers import LayerCall, capture_layer_call, layer_output
from bitdistill.recover.loop import adam_loop
from bitdistill.recover.ternary import calibrated_ternary, encode_ternary, hessian_inverse_factor

__all__ = ["BLOCK_LOSSES", "BlockwiseConfig", "BlockwiseReport", "block_loss", "check_state_budget",
           "reconstruct_blocks_in_place", "state_bytes"]

BLOCK_LOSSES = ("mse", "token", "delta")
INITS = ("gptq", "keep")
PROGRESS_FILE = "progress.json"
STATES_FILE = "states.pt"


@dataclass
class BlockwiseConfig:
    """Options of :func:`reconstruct_blocks_in_place` (all recorded in the resume folder and must match there).

    Attributes:
        init: ``gptq`` (calibrated ternary rounding and scale) or ``keep`` (the student's weights as they are).
        steps: Adam steps per block (``None``: as many as ``budget_cpu_s`` allows; 0: no reconstruction).
        lr: Adam learning rate (cosine-decayed to 0 over each block's steps).
        micro_batch: sequences per step (also the batch of every replayed layer call).
        loss: ``mse`` (mean square error over everything / mean square target), ``token`` (per-token squared
            error / the token's squared target norm, averaged: a few massive-activation tokens cannot dominate),
            ``delta`` (per-token squared error / the token's squared block update ``|Y_t - X_t|^2``).
        student_inputs: train each block on the student's own previous-block outputs instead of the teacher's.
        init_scales: grid scales (multiples of ``mean|W|``) of the calibrated rounding.
        seed: seed of each block's batch order (``seed + block index``).
    """

    init: str = "gptq"
    steps: int | None = None
    lr: float = 1e-3
    micro_batch: int = 4
    loss: str = "token"
    student_inputs: bool = True
    init_scales: tuple[float, ...] = (0.7, 0.85, 1.0, 1.2, 1.4)
    seed: int = 0

    def check(self) -> None:
        if self.init not in INITS:
            raise UserError(f"unknown init {self.init!r}; choose one of {', '.join(INITS)}")
        if self.loss not in BLOCK_LOSSES:
            raise UserError(f"unknown block loss {self.loss!r}; choose one of {', '.join(BLOCK_LOSSES)}")
        if self.steps is not None and self.steps < 0:
            raise UserError(f"block steps must be >= 0, got {self.steps}")
        if self.micro_batch < 1 or self.lr <= 0:
            raise UserError("block micro_batch must be >= 1 and lr > 0")


@dataclass
class BlockwiseReport:
    """Per-block results: ``blocks[i] = {"block", "steps", "init_error", "absmean_error", "val_before",
    "val_after", "cpu_s"}`` (errors: the chosen ``loss`` on the held-out blocks with teacher inputs;
    ``val_before`` after initialization, ``val_after`` after reconstruction); ``cpu_s`` the stage's process CPU time."""

    blocks: list[dict] = field(default_factory=list)
    cpu_s: float = 0.0


def block_loss(kind: str, pred: torch.Tensor, target: torch.Tensor, block_input: torch.Tensor) -> torch.Tensor:
    """The block reconstruction loss of ``pred`` against ``target`` (all ``[B, S, hidden]``); see :class:`BlockwiseConfig`.

    ``block_input`` is the teacher's input of the block (used by ``delta``).
    """
    p, t = pred.float(), target.float()
    if kind == "mse":
        return (p - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12)
    err = (p - t).pow(2).sum(-1)
    if kind == "token":
        return (err / t.pow(2).sum(-1).clamp_min(1e-12)).mean()
    if kind == "delta":
        return (err / (t - block_input.float()).pow(2).sum(-1).clamp_min(1e-12)).mean()
    raise UserError(f"unknown block loss {kind!r}; choose one of {', '.join(BLOCK_LOSSES)}")


def state_bytes(n_sequences: int, seq_len: int, hidden: int, *, student_inputs: bool, val_sequences: int = 0) -> int:
    """Memory the hidden-state tensors of :func:`reconstruct_blocks_in_place` need (float32)."""
    per = seq_len * hidden * 4
    return per * (n_sequences * (3 + int(student_inputs)) + val_sequences * 3)


def check_state_budget(needed: int, *, memory_budget: int | None, work_dir: Path | None, layer_bytes: int) -> None:
    """Refuse (one line) when the cached teacher states exceed the memory budget (default: half the available
    memory) or the resume folder's disk lacks room for them plus the block parameters."""
    budget = memory_budget if memory_budget is not None else available_host_bytes() // 2
    if needed > budget:
        raise UserError(f"cached hidden states need {needed / 2**20:.0f} MiB but the memory budget is "
                         f"{budget / 2**20:.0f} MiB; use fewer calibration tokens or raise the budget")
    if work_dir is not None:
        probe = work_dir if work_dir.exists() else work_dir.parent
        while not probe.exists():
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        need_disk = needed + layer_bytes
        if need_disk > free:
            raise UserError(f"the resume folder {work_dir} needs {need_disk / 2**20:.0f} MiB of disk but "
                             f"{free / 2**20:.0f} MiB are free; choose another folder")


def _linears(layer: nn.Module, kinds: tuple[type, ...]) -> dict[str, nn.Module]:
    return {name: m for name, m in layer.named_modules() if isinstance(m, kinds)}


@torch.no_grad()
def _run_layer(layer: nn.Module, x: torch.Tensor, call: LayerCall) -> torch.Tensor:
    b = call.batch
    return torch.cat([layer_output(layer, x[i:i + b], call) for i in range(0, x.shape[0], b)])


@torch.no_grad()
def _hessians(teacher_layer: nn.Module, names: list[str], x: torch.Tensor,
              call: LayerCall) -> tuple[dict[str, int], list[torch.Tensor]]:
    """``X^T X`` (float64) of each named linear's input when ``teacher_layer`` runs on ``x``.

    Returns ``(group, hessians)``: linears fed the same input tensor (e.g. q/k/v) share one group index.
    """
    mods = {n: teacher_layer.get_submodule(n) for n in names}
    group: dict[str, int] = {}
    hs: list[torch.Tensor] = []
    seen: dict[int, tuple[torch.Tensor, int]] = {}  # input tensors of one call (kept alive: ids stay unique)

    def hook(name):
        def fn(module, args):
            x = args[0]
            if id(x) not in seen:
                idx = group.get(name, len(hs))
                seen[id(x)] = (x, idx)
                a = x.detach().reshape(-1, x.shape[-1]).double()
                if idx == len(hs):
                    hs.append(a.T @ a)
                else:
                    hs[idx] += a.T @ a
            group[name] = seen[id(x)][1]
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in mods.items()]
    try:
        b = call.batch
        for i in range(0, x.shape[0], b):
            seen.clear()
            layer_output(teacher_layer, x[i:i + b], call)
    finally:
        for h in handles:
            h.remove()
    return group, hs


@torch.no_grad()
def _calibrate_layer(student_layer: nn.Module, teacher_layer: nn.Module, x: torch.Tensor, call: LayerCall,
                     scales: tuple[float, ...]) -> tuple[float, float]:
    """Set each BitLinear of ``student_layer`` to its calibrated ternary weight; returns summed (fit, absmean) errors."""
    bits = _linears(student_layer, (BitLinear,))
    group, hs = _hessians(teacher_layer, list(bits), x, call)
    factors = [hessian_inverse_factor(h) for h in hs]
    err = base = 0.0
    for name, bl in bits.items():
        tw = teacher_layer.get_submodule(name).weight
        w = tw.t() if is_conv1d(teacher_layer.get_submodule(name)) else tw
        g = group[name]
        fit = calibrated_ternary(w, hs[g], scales=scales, factor=factors[g])
        latent = encode_ternary(fit.codes, fit.alpha, w, dtype=bl.weight.dtype, per_row=bl.per_row)
        bl.weight.copy_(latent.t() if isinstance(bl, BitConv1D) else latent)
        err += fit.error
        base += fit.absmean_error
    return err, base


@torch.no_grad()
def _val_error(layer: nn.Module, kind: str, x_in: torch.Tensor, y: torch.Tensor, x_t: torch.Tensor,
               call: LayerCall) -> float:
    b = call.batch
    losses = [block_loss(kind, layer_output(layer, x_in[i:i + b], call), y[i:i + b], x_t[i:i + b]).item()
              for i in range(0, x_in.shape[0], b)]
    return sum(losses) / len(losses)


def _train_layer(layer: nn.Module, cfg: BlockwiseConfig, steps: int, x_in: torch.Tensor, y: torch.Tensor,
                 x_t: torch.Tensor, call: LayerCall, block: int, desc: str, progress: bool,
                 step_cost: Callable[[float], None] | None) -> None:
    """``steps`` Adam steps (:func:`~bitdistill.recover.loop.adam_loop`) on ``layer``, the learning rate
    cosine-decayed to 0, each on a random micro-batch of the cached states."""
    from tqdm.auto import tqdm

    params = [p for p in layer.parameters() if p.is_floating_point()]
    gen = torch.Generator().manual_seed(cfg.seed + block)
    n = x_in.shape[0]

    def step_loss(step: int) -> torch.Tensor:
        idx = torch.randperm(n, generator=gen)[: call.batch]
        return block_loss(cfg.loss, layer_output(layer, x_in[idx], call), y[idx], x_t[idx])

    def on_step(step: int, planned: int, loss: torch.Tensor, cpu_s: float) -> None:
        bar.update()
        if step_cost is not None:
            step_cost(cpu_s)

    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False)
    layer.train()
    try:
        adam_loop(params, cfg.lr, step_loss, lambda step, planned: 0.5 * (1 + math.cos(math.pi * step / planned)),
                  steps=steps, on_step=on_step)
    finally:
        bar.close()
        layer.eval()


def _time_step(layer: nn.Module, cfg: BlockwiseConfig, x_in: torch.Tensor, y: torch.Tensor, x_t: torch.Tensor,
               call: LayerCall) -> float:
    """CPU seconds of one forward + backward of ``layer`` on a micro-batch (gradients discarded)."""
    params = [p for p in layer.parameters() if p.is_floating_point()]
    was = [p.requires_grad for p in params]
    t0 = time.process_time()
    for p in params:
        p.requires_grad_(True)
    b = call.batch
    block_loss(cfg.loss, layer_output(layer, x_in[:b], call), y[:b], x_t[:b]).backward()
    for p, w in zip(params, was, strict=True):
        p.grad = None
        p.requires_grad_(w)
    return time.process_time() - t0


def _fingerprint(cfg: BlockwiseConfig, input_ids: torch.Tensor, val_ids: torch.Tensor | None) -> dict:
    d = asdict(cfg)
    d["init_scales"] = list(cfg.init_scales)
    d["inputs"] = [list(input_ids.shape), int(input_ids.long().sum()), int((input_ids.long() ** 2).sum() % 1000003)]
    d["val"] = None if val_ids is None else [list(val_ids.shape), int(val_ids.long().sum())]
    return d


def _save_atomic(obj: str | dict, path: Path) -> None:
    """Write text or ``torch.save`` a dict of tensors to ``path`` atomically (a full disk is one-line error)."""
    atomic_write(path, obj if isinstance(obj, str) else lambda tmp: torch.save(obj, tmp))


def reconstruct_blocks_in_place(
    student: nn.Module,
    teacher: nn.Module,
    input_ids: torch.Tensor,
    cfg: BlockwiseConfig | None = None,
    *,
    val_ids: torch.Tensor | None = None,
    budget_cpu_s: float | None = None,
    work_dir: str | os.PathLike | None = None,
    memory_budget: int | None = None,
    max_blocks: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> BlockwiseReport:
    """Initialize and reconstruct ``student``'s decoder blocks against ``teacher``'s, in place.

    Args:
        student: a BitNet student (``replace_linear_with_bitlinear``) of the teacher's architecture and depth,
            e.g. a converted copy of it. Its decoder blocks are modified in place.
        teacher: the full-precision teacher (not modified).
        input_ids: ``[N, S]`` calibration token blocks; ``N`` a multiple of ``cfg.micro_batch``.
        cfg: options (default :class:`BlockwiseConfig`).
        val_ids: ``[V, S]`` held-out blocks (``V`` a multiple of ``micro_batch``) on which each block's error is
            reported before and after reconstruction.
        budget_cpu_s: process CPU seconds for the whole stage when ``cfg.steps`` is ``None``: after each
            block's initialization, its steps are the remaining budget over the remaining blocks, divided by
            the measured CPU time of one step.
        work_dir: resume folder (block parameters, hidden states entering the next block, ``progress.json``);
            a run with the same options and data continues after the last finished block.
        memory_budget: bytes allowed for the cached hidden states (default: half the available memory).
        max_blocks: stop after finishing this many blocks in this call (the rest on a later, resumed call).
        progress: a progress bar per block.
        log: called with one line per finished block.

    Returns:
        A :class:`BlockwiseReport`.

    Raises:
        ValueError: bad options, undiscoverable or mismatched block structure, too little memory or disk,
            or a resume folder written with other options (each before any work).
    """
    cfg = cfg or BlockwiseConfig()
    cfg.check()
    if cfg.steps is None and budget_cpu_s is None:
        raise UserError("give the block stage a number of steps per block or a CPU budget")
    _, s_layers = decoder_layers(student)
    _, t_layers = decoder_layers(teacher)
    if len(s_layers) != len(t_layers):
        raise UserError(f"student and teacher have {len(s_layers)} and {len(t_layers)} decoder blocks; block-wise "
                         "recovery needs a student of the teacher's depth")
    mb = cfg.micro_batch
    for name, ids in (("calibration", input_ids), ("held-out", val_ids)):
        if ids is not None and (ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[0] % mb):
            raise UserError(f"the {name} token blocks must be [N, S] with N a positive multiple of the block "
                             f"micro-batch {mb}, got {tuple(ids.shape)}")
    hidden = teacher.config.hidden_size
    n_val = 0 if val_ids is None else val_ids.shape[0]
    needed = state_bytes(input_ids.shape[0], input_ids.shape[1], hidden, student_inputs=cfg.student_inputs,
                         val_sequences=n_val)
    layer_bytes = sum(p.numel() * p.element_size() for p in s_layers.parameters())
    work = Path(work_dir) if work_dir is not None else None
    check_state_budget(needed, memory_budget=memory_budget, work_dir=work, layer_bytes=layer_bytes)

    start_cpu = time.process_time()
    fingerprint = _fingerprint(cfg, input_ids, val_ids)
    report = BlockwiseReport()
    done = 0
    if work is not None and (work / PROGRESS_FILE).is_file():
        saved = json.loads((work / PROGRESS_FILE).read_text())
        if saved["fingerprint"] != fingerprint:
            raise UserError(f"{work} holds a block-wise run with other options or data; resume with the same ones "
                             "or choose another folder")
        done = saved["done"]
        report.blocks = saved["blocks"]
        start_cpu -= saved.get("cpu_s", 0.0)

    with torch.no_grad():
        call = None
        x_t, x_v = [], []
        for i in range(0, input_ids.shape[0], mb):
            h, call = capture_layer_call(teacher, input_ids[i:i + mb])
            x_t.append(h)
        for i in range(0, n_val, mb):
            x_v.append(capture_layer_call(teacher, val_ids[i:i + mb])[0])
        x_t = torch.cat(x_t)
        x_v = torch.cat(x_v) if x_v else None
        x_s = x_t.clone() if cfg.student_inputs else None
        x_sv = x_v.clone() if (cfg.student_inputs and x_v is not None) else None
    if done:
        for j in range(done):
            s_layers[j].load_state_dict(torch.load(work / f"block_{j:03d}.pt", weights_only=True))
        states = torch.load(work / STATES_FILE, weights_only=True)
        x_t, x_s, x_v, x_sv = states["x_t"], states.get("x_s"), states.get("x_v"), states.get("x_sv")
    elif work is not None:
        work.mkdir(parents=True, exist_ok=True)

    costs: list[float] = []
    n_layers = len(s_layers)
    stop = n_layers if max_blocks is None else min(n_layers, done + max_blocks)
    for i in range(done, stop):
        s_layer, t_layer = s_layers[i], t_layers[i]
        block_start = time.process_time()
        y_t = _run_layer(t_layer, x_t, call)
        y_v = _run_layer(t_layer, x_v, call) if x_v is not None else None
        x_in = x_s if cfg.student_inputs else x_t
        init_err = base_err = float("nan")
        if cfg.init == "gptq":
            init_err, base_err = _calibrate_layer(s_layer, t_layer, x_in, call, cfg.init_scales)
        v_in = x_sv if cfg.student_inputs else x_v
        val_before = _val_error(s_layer, cfg.loss, v_in, y_v, x_v, call) if x_v is not None else float("nan")
        if cfg.steps is not None:
            steps = cfg.steps
        else:
            if not costs:
                costs.append(_time_step(s_layer, cfg, x_in, y_t, x_t, call))
            used = time.process_time() - start_cpu
            overhead = (report.blocks[-1]["overhead_s"] if report.blocks
                        else 1.5 * (time.process_time() - block_start))
            per_block = (budget_cpu_s - used - overhead * (n_layers - i - 1)) / (n_layers - i)
            est = sum(costs[-8:]) / len(costs[-8:])
            steps = max(0, int(per_block / est))
        train_start = time.process_time()
        _train_layer(s_layer, cfg, steps, x_in, y_t, x_t, call, i, f"block {i + 1}/{n_layers}", progress,
                     costs.append if cfg.steps is None else None)
        train_cpu = time.process_time() - train_start
        val_after = _val_error(s_layer, cfg.loss, v_in, y_v, x_v, call) if x_v is not None else float("nan")
        if cfg.student_inputs:
            x_s = _run_layer(s_layer, x_s, call)
            if x_sv is not None:
                x_sv = _run_layer(s_layer, x_sv, call)
        x_t, x_v = y_t, y_v
        rec = {"block": i, "steps": steps, "init_error": init_err, "absmean_error": base_err,
               "val_before": val_before, "val_after": val_after, "cpu_s": time.process_time() - start_cpu,
               "overhead_s": time.process_time() - block_start - train_cpu}
        report.blocks.append(rec)
        if log is not None:
            log(f"block {i + 1}/{n_layers}: {steps} steps, held-out {cfg.loss} error {val_before:.4g} -> "
                f"{val_after:.4g}, init output error {init_err:.4g} (absmean {base_err:.4g})")
        if work is not None:
            _save_atomic(s_layer.state_dict(), work / f"block_{i:03d}.pt")
            states = {k: v for k, v in (("x_t", x_t), ("x_s", x_s), ("x_v", x_v), ("x_sv", x_sv)) if v is not None}
            _save_atomic(states, work / STATES_FILE)
            prog = {"fingerprint": fingerprint, "done": i + 1, "blocks": report.blocks,
                    "cpu_s": time.process_time() - start_cpu}
            _save_atomic(json.dumps(prog, indent=1), work / PROGRESS_FILE)
    report.cpu_s = time.process_time() - start_cpu
    return report
