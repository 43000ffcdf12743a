"""The tuning split of ``bitdistill recover`` (held out of every stage) and its held-out curve (tiny models, CPU)."""

from __future__ import annotations

import copy
import logging
import math
import random
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerControl, TrainingArguments

from bitdistill.budget import CpuBudgetCallback, CpuClock
from bitdistill.data.args import DataArguments
from bitdistill.errors import UserError
from bitdistill.models import tiny_model
from bitdistill.nn.replace import replace_linear_with_bitlinear
from bitdistill.recover.curve import HeldOutCurveCallback, cpu_min_to_ppl, held_out_loss, tenth_marks
from bitdistill.recover.staged import HELD_OUT_TOKENS, RecoverArguments, _kd_blocks, _split
from bitdistill.runs import setup_run


def _indexed_blocks(n: int, s: int) -> torch.Tensor:
    """``[n, s]`` token blocks whose tokens are their own index in the text."""
    return torch.arange(n * s).reshape(n, s)


@pytest.mark.parametrize(("s", "held_tokens", "kd_length", "mode", "max_train_blocks"), [
    (256, None, 128, "joint", None), (256, 16384, 100, "joint", None), (32, 100, 512, "sequential", None),
    (48, 1000, 128, "joint", 40), (256, 300, 24, "joint", None)])
def test_no_held_out_token_is_in_any_training_block(tmp_path, s, held_tokens, kd_length, mode, max_train_blocks):
    """Every stage's training tokens (calibration, the joint block stage's blocks, each KD stage's training blocks
    after the engine holds out its validation tail) avoid the held-out split's token indices."""
    args = RecoverArguments(calibration_seq_length=s, held_out_tokens=held_tokens, block_mode=mode,
                            calibration_tokens=4 * s).resolved(30 * 60)
    blocks = _indexed_blocks(HELD_OUT_TOKENS // s + 300, s)
    cal, train, held = _split(args, blocks)
    assert held.numel() >= (held_tokens or HELD_OUT_TOKENS) and held.shape[1] == s
    held_ids = set(held.reshape(-1).tolist())
    assert held_ids == set(range(blocks.numel() - held.numel(), blocks.numel()))  # the text's tail
    trained = {"calibration": cal, "blocks": train}
    data = DataArguments(train_files=["unused"], max_seq_length=kd_length, max_train_blocks=max_train_blocks)
    kd, kd_data = _kd_blocks(blocks, held, data)
    run = setup_run(kd, None, kd_data, TrainingArguments(output_dir=str(tmp_path), report_to=[]), {}, None)
    trained["kd"] = run.train_ds.blocks
    for name, ids in trained.items():
        assert not held_ids & set(ids.reshape(-1).tolist()), name
    assert run.train_ds.blocks.numel() > 0.9 * (kd.numel() - held.numel() - 2 * kd_length) or max_train_blocks


def test_held_out_split_defaults_rounds_up_and_deprecates_held_out_blocks(caplog):
    """The default split is 64 x 256 tokens; a token count is rounded up to whole blocks; ``--held_out_blocks``
    still works (as ``--held_out_tokens N x S``, with a one-line warning) and may not be given with it."""
    assert RecoverArguments().resolved(600).held_out_tokens == HELD_OUT_TOKENS == 64 * 256
    blocks = _indexed_blocks(200, 32)
    assert _split(RecoverArguments(calibration_seq_length=32, held_out_tokens=100, calibration_tokens=64).resolved(600),
                  blocks)[2].shape == (
        4, 32)
    with caplog.at_level(logging.WARNING):
        old = RecoverArguments(calibration_seq_length=32, held_out_blocks=3).resolved(600)
    assert old.held_out_tokens == 96 and old.held_out_blocks is None and old.resolved(600) == old
    assert "--held_out_blocks is deprecated; use --held_out_tokens 96" in caplog.text
    with pytest.raises(UserError, match="drop --held_out_blocks"):
        RecoverArguments(held_out_blocks=3, held_out_tokens=96).resolved(600)


def test_text_too_short_for_the_split_is_one_line():
    args = RecoverArguments(calibration_seq_length=32, calibration_tokens=64).resolved(600)
    with pytest.raises(UserError) as exc:
        _split(args, _indexed_blocks(100, 32))  # 3,200 tokens, 16,384 held out asked
    msg = str(exc.value)
    assert "\n" not in msg and "16384 held-out tokens" in msg and "--held_out_tokens" in msg


def test_held_out_loss_batches_like_one_block_at_a_time():
    model = tiny_model("llama", seed=0).train()
    ids = torch.randint(3, 256, (7, 13), generator=torch.Generator().manual_seed(0))
    one = held_out_loss(model, ids, batch=1)
    assert math.isclose(held_out_loss(model, ids, batch=3), one, rel_tol=1e-5)
    assert math.isclose(held_out_loss(model, ids), one, rel_tol=1e-5)
    assert model.training  # the model's mode is restored


def _log_linear(a: float, b: float, cpus: list[float]) -> list[list[float]]:
    return [[c, math.exp(a - b * c)] for c in cpus]


def test_cpu_min_to_ppl_on_synthetic_curves():
    """Exact where the loss is linear in CPU time; the first crossing of a curve that goes back up; ``None`` when
    never reached; the first point when it starts below; later (or equal) for a lower threshold; between the two
    points around the crossing."""
    rng = random.Random(0)
    for _ in range(50):
        a, b = rng.uniform(5, 9), rng.uniform(0.01, 0.1)
        cpus = sorted(rng.uniform(0, 90) for _ in range(rng.randint(2, 12)))
        curve = _log_linear(a, b, cpus)
        thresholds = sorted(rng.uniform(20, 2000) for _ in range(5))
        times = [cpu_min_to_ppl(curve, t) for t in thresholds]
        for t, got in zip(thresholds, times, strict=True):
            exact = (a - math.log(t)) / b
            if t < curve[-1][1]:
                assert got is None
            elif t >= curve[0][1]:
                assert got == cpus[0]
            else:
                assert math.isclose(got, exact, rel_tol=1e-9)
                after = next(i for i, (_, p) in enumerate(curve) if p <= t)
                assert cpus[after - 1] <= got <= cpus[after]
        reached = [x for x in times if x is not None]
        assert reached == sorted(reached, reverse=True)  # a lower threshold is reached later
    bumpy = [[1.0, 400.0], [2.0, 140.0], [3.0, 180.0], [4.0, 90.0]]
    assert cpu_min_to_ppl(bumpy, 150) == pytest.approx(1 + math.log(400 / 150) / math.log(400 / 140))
    assert cpu_min_to_ppl(bumpy, 100) == pytest.approx(3 + math.log(180 / 100) / math.log(180 / 90))
    assert cpu_min_to_ppl(bumpy, 50) is None and cpu_min_to_ppl([], 150) is None


def test_tenth_marks():
    assert tenth_marks(600) == pytest.approx([60.0 * k for k in range(1, 10)])


def test_curve_points_are_excluded_from_the_budget_and_monotone(monkeypatch):
    """A KD stage's loop on a fake CPU clock (1 s a step) with a budget callback and the curve callback on the same
    clock: the evaluations (10 s each here) are not counted, the points fall at the marks the stage passes (those
    before its start skipped), in increasing CPU time, and the budget still buys its steps."""
    import bitdistill.budget as budget_mod
    import bitdistill.recover.curve as curve_mod

    now = [0.0]
    monkeypatch.setattr(budget_mod.time, "process_time", lambda: now[0])

    def slow_loss(model, held, batch=8):
        now[0] += 10.0
        return 5.0 - now[0] / 1000

    monkeypatch.setattr(curve_mod, "held_out_loss", slow_loss)
    clock = CpuClock()
    now[0] = 30.0  # the block stage used 30 s of a 100 s budget
    budget = CpuBudgetCallback(70.0, clock=clock, fit_schedule=False)
    curve = HeldOutCurveCallback(torch.zeros(1, 2), clock, clock.used(), tenth_marks(100.0), log=lambda _: None)
    state, control = SimpleNamespace(global_step=0, max_steps=10**6), TrainerControl()
    for cb in (budget, curve):
        cb.on_train_begin(None, state, control)
    while not control.should_training_stop:
        now[0] += 1.0
        state.global_step += 1
        for cb in (budget, curve):
            cb.on_step_end(None, state, control, model=None)
    budget.on_train_end(None, state, control)
    assert state.global_step == 70 and budget.used_s == pytest.approx(70.0)
    cpus = [c for c, _ in curve.points]
    assert cpus == pytest.approx([s / 60 for s in (40, 50, 60, 70, 80, 90)]) and cpus == sorted(cpus)
    assert clock.used() == pytest.approx(100.0)  # 70 steps + 30 before; the 60 s of evaluations excluded


def test_staged_curve_of_a_tiny_run(tmp_path):
    """The curve callback inside the real engine: points recorded inside the KD stage, below the stage's end (how
    many depends on the CPU a step takes here; the marks themselves are tested on a fake clock above)."""
    from bitdistill.distill.args import LossArguments
    from bitdistill.distill.engine import distill_student

    teacher = tiny_model("llama", seed=0).requires_grad_(False)
    student = copy.deepcopy(teacher)
    replace_linear_with_bitlinear(student)
    student.requires_grad_(True)
    ids = torch.randint(3, 256, (64, 16), generator=torch.Generator().manual_seed(0))
    clock = CpuClock()
    curve = HeldOutCurveCallback(ids[-4:], clock, 0.0, tenth_marks(3.0), log=lambda _: None)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], save_strategy="no", max_steps=-1,
                             per_device_train_batch_size=2, learning_rate=1e-3, disable_tqdm=True, use_cpu=True)
    data = DataArguments(train_files=["unused"], max_seq_length=16, validation_blocks=4)
    result = distill_student(student, teacher, ids, None, data_args=data, loss_args=LossArguments(), training_args=args,
                             config={}, budget_s=3.0, callbacks=[curve], clock=clock)
    cpus = [c for c, _ in curve.points]
    assert len(cpus) >= 1 and cpus == sorted(cpus) and cpus[-1] <= result.train_cpu_s / 60 + 1e-9
    assert all(p > 1 for _, p in curve.points)
    assert 1.5 <= result.train_cpu_s <= 6.0  # the 3-second plan, within a step or two on a loaded machine
