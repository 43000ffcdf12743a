"""Calibrated ternary initialization, block-wise reconstruction and the staged recipe (tiny models, CPU)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from bitdistill import load_student, replace_linear_with_bitlinear, weight_quant
from bitdistill.budget import CpuBudgetCallback, parse_cpu_budget
from bitdistill.errors import UserError
from bitdistill.models import TINY_ARCHITECTURES, tiny_model
from bitdistill.nn.bitlinear import BitLinear
from bitdistill.recover import (
    BlockwiseConfig,
    JointConfig,
    calibrated_ternary,
    capture_layer_call,
    decoder_layers,
    encode_ternary,
    layer_output,
    output_error,
    reconstruct_blocks_in_place,
    reconstruct_jointly_in_place,
)
from bitdistill.recover.blockwise import block_loss, check_state_budget


def _pair(arch: str, seed: int = 0):
    teacher = tiny_model(arch, seed=seed)
    teacher.requires_grad_(False)
    student = copy.deepcopy(teacher)
    replace_linear_with_bitlinear(student)
    return teacher, student.eval()


def _ids(n: int, seq: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(8, 16), (64, 128), (3, 5)])
def test_encode_ternary_survives_bitlinear_recomputation(shape):
    w = torch.randn(shape) * 0.03
    codes = torch.randint(-1, 2, shape, dtype=torch.int8)
    codes[0, 0] = 1
    for ref in (None, w):
        latent = encode_ternary(codes, 0.0123, ref)
        got, gamma = weight_quant(latent)
        assert torch.equal(got, codes)
        assert abs(gamma.item() - 0.0123) <= 1e-6 * 0.0123
    assert not encode_ternary(torch.zeros(shape, dtype=torch.int8), 0.5).any()


def test_calibrated_ternary_beats_absmean_on_anisotropic_inputs():
    w = torch.randn(32, 64) * 0.02
    x = torch.randn(500, 64) * torch.linspace(0.05, 4.0, 64)
    h = x.T @ x
    fit = calibrated_ternary(w, h)
    codes, gamma = weight_quant(w)
    assert fit.absmean_error == pytest.approx(output_error(w, codes.double() * gamma.double(), h))
    assert fit.error == pytest.approx(output_error(w, fit.codes.double() * fit.alpha, h))
    assert fit.error < 0.9 * fit.absmean_error


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_decoder_layers_replay_matches_the_model(arch):
    model = tiny_model(arch)
    _, layers = decoder_layers(model)
    ids = _ids(2)
    h, call = capture_layer_call(model, ids)
    seen = {}
    hook = layers[-1].register_forward_hook(lambda m, i, o: seen.setdefault("out", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
        hook.remove()
        for layer in layers:
            h = layer_output(layer, h, call)
    assert torch.equal(h, seen["out"])


def test_decoder_layers_refuses_a_model_without_a_block_list():
    model = nn.Sequential(nn.Linear(4, 4))
    model.config = type("C", (), {"num_hidden_layers": 3})()
    with pytest.raises(ValueError, match="cannot find the decoder blocks"):
        decoder_layers(model)
    with pytest.raises(ValueError, match=r"num_hidden_layers=3 layers; use distill instead$"):
        decoder_layers(model, fix="use distill instead")


def _layer_errors(student, teacher, ids) -> list[float]:
    """Each converted layer's output error sum ||x W^T - x Q^T||^2 on the teacher's layer inputs."""
    errs, inputs = [], {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, a[0].detach()))
             for n, m in teacher.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    with torch.no_grad():
        teacher(input_ids=ids)
    for h in hooks:
        h.remove()
    for name, x in inputs.items():
        w = teacher.get_submodule(name).weight
        q = student.get_submodule(name)
        codes, gamma = weight_quant(q.weight)
        errs.append(float((x @ w.T - x @ (codes.float() * gamma).T).pow(2).sum()))
    return errs


def test_init_lowers_layer_error_and_survives_save_and_load(tmp_path):
    teacher, student = _pair("llama")
    naive = copy.deepcopy(student)
    ids = _ids(8)
    rep = reconstruct_blocks_in_place(student, teacher, ids, BlockwiseConfig(steps=0, student_inputs=False),
                                      progress=False)
    assert all(b["init_error"] < b["absmean_error"] for b in rep.blocks)
    before, after = _layer_errors(naive, teacher, ids), _layer_errors(student, teacher, ids)
    assert sum(after) < sum(before)
    assert all(a <= b * (1 + 1e-6) for a, b in zip(after, before, strict=True))
    student.save_pretrained(tmp_path / "s")
    loaded = load_student(tmp_path / "s")
    for name, m in student.named_modules():
        if isinstance(m, BitLinear):
            other = loaded.get_submodule(name)
            assert torch.equal(other.weight, m.weight)
            assert torch.equal(weight_quant(other.weight)[0], weight_quant(m.weight)[0])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, student(input_ids=ids).logits)


# Llama and GPT-2 (Conv1D layers) in the default suite; the other architectures (about 5 CPU-s each) are slow.
@pytest.mark.parametrize("arch", [a if a in ("llama", "gpt2") else pytest.param(a, marks=pytest.mark.slow)
                                  for a in TINY_ARCHITECTURES])
def test_block_reconstruction_lowers_every_blocks_error(arch):
    teacher, student = _pair(arch)
    ids, val = _ids(16), _ids(4, seed=2)
    cfg = BlockwiseConfig(init="keep", steps=20, lr=1e-3, micro_batch=4, student_inputs=False)
    rep = reconstruct_blocks_in_place(student, teacher, ids, cfg, val_ids=val, progress=False)
    assert len(rep.blocks) == teacher.config.num_hidden_layers
    for b in rep.blocks:
        assert b["val_after"] < b["val_before"], b


# Gemma 2 and 3: 10 joint steps at lr 2e-3 raise the held-out block error of tiny random models (seed 0, teacher
# inputs: Gemma 2 0.436 -> 0.467, Gemma 3 0.454 -> 0.494; Llama 0.125 -> 0.097). Measured, one change at a time:
# not the soft-capping (both soft-caps off: the same numbers), not the (1 + w) norms (every norm, or only the
# post-attention/post-feedforward norms, frozen: still rising), not too few blocks (64 training and 32 held-out
# sequences: 0.435 -> 0.460 and 0.447 -> 0.465), not the embedding scale (embeddings / sqrt(hidden): the same
# curve). It is the step size: with 64/32 sequences Gemma 2's held-out error falls while the rate warms up
# (0.435, 0.410, 0.403 at steps 0, 2, 4), then rises at the peak rate (0.424, 0.457, 0.460 at 6, 8, 10); at lr 1e-3
# it falls to 0.386 at step 6 and ends at 0.392. At 1e-3 with 8/4 sequences it falls with teacher inputs
# (0.436 -> 0.416, 0.454 -> 0.414) but not with student inputs (0.436 -> 0.447, 0.454 -> 0.456), and other seeds
# go either way, so no single rate makes the property hold. Their recipe runs in test_architectures.py.
_JOINT_STEP_TOO_LARGE = ("gemma2", "gemma3")


@pytest.mark.parametrize("arch", [a if a in ("llama", "gpt2") else pytest.param(a, marks=[pytest.mark.slow, *(
    [pytest.mark.xfail(reason="lr 2e-3 overshoots on tiny random Gemma 2/3 blocks: the held-out block error falls "
                              "during warm-up, then rises at the peak rate (not soft-capping, the (1 + w) norms, the "
                              "embedding scale or too few blocks: measured, see above)", strict=False)]
    if a in _JOINT_STEP_TOO_LARGE else [])]) for a in TINY_ARCHITECTURES])
@pytest.mark.parametrize("inputs", ["teacher", "student"])
def test_joint_reconstruction_lowers_the_block_error_and_touches_only_blocks(arch, inputs):
    teacher, student = _pair(arch)
    before_teacher = copy.deepcopy(teacher.state_dict())
    _, layers = decoder_layers(student)
    block_keys = {f"{decoder_layers(student)[0]}.{k}" for k in layers.state_dict()}
    before = copy.deepcopy(student.state_dict())
    rep = reconstruct_jointly_in_place(student, teacher, _ids(8), JointConfig(lr=2e-3, micro_batch=4, inputs=inputs),
                                       steps=10, val_ids=_ids(4, seed=2))
    assert rep.steps == 10 and len(rep.losses) == 10
    assert rep.val_after < rep.val_before
    after = student.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and changed <= block_keys  # embeddings, final norm and head untouched
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in before_teacher.items())


def test_joint_reconstruction_bf16_autocasts_only_the_training_steps():
    teacher, student = _pair("llama")
    seen: dict[str, list[bool]] = {"student": [], "teacher": []}
    for name, model in (("student", student), ("teacher", teacher)):
        decoder_layers(model)[1][0].register_forward_pre_hook(
            lambda m, args, name=name: seen[name].append(torch.is_autocast_enabled("cpu")))
    rep = reconstruct_jointly_in_place(student, teacher, _ids(8), JointConfig(lr=2e-3, micro_batch=4, bf16=True),
                                       steps=6, val_ids=_ids(4, seed=2))
    assert rep.val_after < rep.val_before
    # one held-out micro-batch before and after (float32), the 6 training steps in between (bf16); the teacher's
    # first block is entered twice a pass (capturing its inputs, then computing its output)
    assert seen["student"] == [False] + [True] * 6 + [False]
    assert seen["teacher"] == [False] * 2 + [True] * 12 + [False] * 2


def test_joint_reconstruction_budget_and_bad_options():
    teacher, student = _pair("llama")
    rep = reconstruct_jointly_in_place(student, teacher, _ids(8), JointConfig(micro_batch=2), budget_cpu_s=0.5)
    assert rep.steps >= 1 and rep.planned_steps >= rep.steps
    with pytest.raises(ValueError, match="either a CPU budget or a number of steps"):
        reconstruct_jointly_in_place(student, teacher, _ids(8))
    with pytest.raises(ValueError, match="unknown block inputs"):
        reconstruct_jointly_in_place(student, teacher, _ids(8), JointConfig(inputs="mixed"), steps=1)
    with pytest.raises(ValueError, match="lr > 0"):
        reconstruct_jointly_in_place(student, teacher, _ids(8), JointConfig(lr=0.0), steps=1)
    with pytest.raises(ValueError, match="N >= micro_batch"):
        reconstruct_jointly_in_place(student, teacher, _ids(2), JointConfig(micro_batch=4), steps=1)


def test_joint_held_out_evaluations_leave_training_and_budget_unchanged():
    """``eval_every`` adds held-out block losses during the stage without changing a step: the same losses, the
    same student, the last evaluation equal to ``val_after``."""
    teacher, student = _pair("llama")
    plain = copy.deepcopy(student)
    cfg = JointConfig(lr=2e-3, micro_batch=2, seed=3)
    rep = reconstruct_jointly_in_place(student, teacher, _ids(8), cfg, steps=8, val_ids=_ids(4, seed=2), eval_every=3)
    ref = reconstruct_jointly_in_place(plain, teacher, _ids(8), cfg, steps=8, val_ids=_ids(4, seed=2))
    assert rep.losses == ref.losses and [s for s, _ in rep.val_history] == [3, 6]
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), plain.state_dict().values(), strict=True))
    rep = reconstruct_jointly_in_place(student, teacher, _ids(8), cfg, steps=4, val_ids=_ids(4, seed=2), eval_every=2)
    assert rep.val_history[-1] == (4, rep.val_after)


def test_adam_loop_budget_does_not_count_evaluations(monkeypatch):
    """On a fake CPU clock (each step 1 s, each evaluation 10 s) a 5 s budget takes the steps 5 s buy whatever the
    evaluations cost, and the schedule sees the plan."""
    import time

    from bitdistill.recover.loop import adam_loop

    now = [0.0]
    monkeypatch.setattr(time, "process_time", lambda: now[0])
    w = torch.zeros(3)
    seen = []

    def step_loss(step):
        now[0] += 1.0
        return (w - 1).pow(2).sum()

    def evaluate(step):
        now[0] += 10.0
        seen.append(step)

    lrs = []
    done = adam_loop([w], 0.1, step_loss, lambda k, planned: lrs.append(planned) or 1.0, budget_s=5.0,
                     evaluate=evaluate, eval_every=1)
    assert done.steps == 5 and done.cpu_s == 5.0 and seen == [1, 2, 3, 4, 5]
    assert done.planned == 5 and lrs[-1] == 5 and not w.requires_grad and float(w.sum()) > 0
    with pytest.raises(ValueError, match="either a number of steps or a CPU budget"):
        adam_loop([w], 0.1, step_loss, lambda k, p: 1.0)


def test_stop_and_resume_equals_uninterrupted(tmp_path):
    teacher, fresh = _pair("qwen2")
    ids, val = _ids(8), _ids(4, seed=2)
    cfg = BlockwiseConfig(steps=5, micro_batch=4, student_inputs=True)
    whole = copy.deepcopy(fresh)
    reconstruct_blocks_in_place(whole, teacher, ids, cfg, val_ids=val, progress=False)
    first = copy.deepcopy(fresh)
    rep = reconstruct_blocks_in_place(first, teacher, ids, cfg, val_ids=val, work_dir=tmp_path, max_blocks=1,
                                      progress=False)
    assert len(rep.blocks) == 1
    resumed = copy.deepcopy(fresh)  # a new process: the student starts from the naive copy again
    rep = reconstruct_blocks_in_place(resumed, teacher, ids, cfg, val_ids=val, work_dir=tmp_path, progress=False)
    assert len(rep.blocks) == teacher.config.num_hidden_layers
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="other options or data"):
        reconstruct_blocks_in_place(copy.deepcopy(fresh), teacher, ids, BlockwiseConfig(steps=6), work_dir=tmp_path,
                                    progress=False)


def test_joint_stage_killed_after_a_resume_point_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """Killed after its resume point (the first step past 1 CPU-ms, of 5), the joint stage continues in a new call
    from a fresh student: the same steps, batch order and Adam moments give the uninterrupted stage's parameters,
    bit for bit. A resume point of other options is refused, and one holding a non-finite parameter."""
    import bitdistill.recover.joint as joint

    teacher, fresh = _pair("llama")
    ids, val = _ids(8), _ids(4, seed=2)
    cfg = JointConfig(lr=2e-3, micro_batch=3, inputs="student", warmup=2)  # 3 of 8 blocks a step: order carries over
    whole = copy.deepcopy(fresh)
    full = reconstruct_jointly_in_place(whole, teacher, ids, cfg, steps=5, val_ids=val)
    real = joint._save_atomic

    def killed(obj, path):
        real(obj, path)
        raise RuntimeError(f"killed after step {obj['loop']['step']}")

    monkeypatch.setattr(joint, "_save_atomic", killed)
    with pytest.raises(RuntimeError, match=r"killed after step [1-4]$"):
        reconstruct_jointly_in_place(copy.deepcopy(fresh), teacher, ids, cfg, steps=5, val_ids=val, work_dir=tmp_path,
                                     save_marks=[1e-3])
    monkeypatch.setattr(joint, "_save_atomic", real)
    resumed = copy.deepcopy(fresh)  # a new process: the student starts from the naive copy again
    rep = reconstruct_jointly_in_place(resumed, teacher, ids, cfg, steps=5, val_ids=val, work_dir=tmp_path)
    assert rep.steps == 5 and rep.losses == full.losses and rep.val_before == full.val_before and rep.resumed_cpu_s > 0
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(UserError, match="other options or text; remove it"):
        reconstruct_jointly_in_place(copy.deepcopy(fresh), teacher, ids, JointConfig(lr=1e-3, micro_batch=3), steps=5,
                                     work_dir=tmp_path)
    saved = torch.load(tmp_path / joint.RESUME_FILE, weights_only=True)
    name = next(iter(saved["params"]))
    saved["params"][name][0] = float("nan")
    torch.save(saved, tmp_path / joint.RESUME_FILE)
    with pytest.raises(UserError, match=f"non-finite parameters \\({name}\\)"):
        reconstruct_jointly_in_place(copy.deepcopy(fresh), teacher, ids, cfg, steps=5, work_dir=tmp_path)


def test_block_losses_and_budget_checks():
    t = torch.randn(2, 5, 8)
    t[:, 0] *= 100  # a massive-activation position
    p = t + 0.1 * torch.randn_like(t)
    x = t - torch.randn_like(t)
    assert block_loss("mse", t, t, x) == 0
    token, mse = block_loss("token", p, t, x), block_loss("mse", p, t, x)
    assert token > mse  # the massive position no longer hides the others' errors
    assert block_loss("delta", p, t, x) > 0
    with pytest.raises(ValueError, match="memory budget"):
        check_state_budget(10 * 2**20, memory_budget=2**20, work_dir=None, layer_bytes=0)
    assert parse_cpu_budget("90m") == 5400 and parse_cpu_budget("1.5h") == 5400 and parse_cpu_budget("30s") == 30
    for bad in ("ninety", "-5m", "0"):
        with pytest.raises(ValueError, match="time_budget"):
            parse_cpu_budget(bad)
    assert CpuBudgetCallback(10).budget_s == 10


def _run_budgeted(monkeypatch, cost, refits: int, interrupt_at: int | None = None,
                  lrs: list[float] | None = None) -> tuple[CpuBudgetCallback, float, int]:
    """Drive a CpuBudgetCallback with a fake CPU clock whose step ``k`` costs ``cost(k)`` seconds and a real
    linear schedule; returns the callback, the last learning-rate factor used and the step training stopped at.
    With ``interrupt_at``, the run is killed after that step (and ``cost(k)`` more CPU seconds) and resumed as a
    new process would from a checkpoint of that step: a new callback loading the saved state, a new schedule loading
    the saved one, a clock that reads something else. ``lrs`` receives the factor of every step."""
    from types import SimpleNamespace

    from transformers import TrainerControl, get_scheduler

    import bitdistill.budget as budget

    clock = [0.0]
    monkeypatch.setattr(budget.time, "process_time", lambda: clock[0])
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=10**6)
    cb = CpuBudgetCallback(1000.0, refits=refits)
    state, control = SimpleNamespace(global_step=0, max_steps=10**6), TrainerControl()
    cb.on_train_begin(None, state, control)
    lr = 1.0
    while not control.should_training_stop and state.global_step < state.max_steps:
        lr = sched.get_last_lr()[0]
        (lrs if lrs is not None else []).append(lr)
        opt.step()
        sched.step()
        state.global_step += 1
        clock[0] += cost(state.global_step)
        cb.on_step_end(None, state, control, lr_scheduler=sched)
        if state.global_step == interrupt_at:
            saved, saved_sched = json.loads(json.dumps(cb.state())), sched.state_dict()
            clock[0] = 12345.0 + cost(state.global_step)  # lost work, then another process's clock
            sched = get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=10**6)
            sched.load_state_dict(saved_sched)
            cb = CpuBudgetCallback(1000.0, refits=refits)
            cb.load_state(saved)
            state = SimpleNamespace(global_step=state.global_step, max_steps=10**6)
            cb.on_train_begin(None, state, control, lr_scheduler=sched)
    cb.on_train_end(None, state, control)
    return cb, lr, state.global_step


@pytest.mark.parametrize("at", [2, 3, 150, 999])
def test_cpu_budget_resumes_with_the_cpu_time_and_plan_its_checkpoint_recorded(monkeypatch, at):
    """A budgeted run killed after any step (before its first plan, at it, between refits, near its end) and
    resumed from that step's state takes the same steps at the same learning rates as one never killed."""
    def cost(k):
        return 1.0 + 0.5 * min(k, 1000) / 1000

    lrs, resumed = [], []
    cb, _, steps = _run_budgeted(monkeypatch, cost, refits=9, lrs=lrs)
    cb2, _, steps2 = _run_budgeted(monkeypatch, cost, refits=9, interrupt_at=at, lrs=resumed)
    assert steps2 == steps and cb2.planned_steps == cb.planned_steps and cb2.used_s == pytest.approx(cb.used_s)
    assert resumed == pytest.approx(lrs)
    assert cb2.state()["used_s"] == pytest.approx(cb.used_s) and cb2.state()["budget_s"] == 1000.0


def test_resumed_budget_state_refuses_another_budget(tmp_path):
    from bitdistill.budget import BUDGET_STATE_FILE, resumed_budget_state

    assert resumed_budget_state(None, 5.0) is None and resumed_budget_state(tmp_path, None) is None
    with pytest.raises(UserError, match="with no --time_budget, this one has --time_budget 5s; resume with the same"):
        resumed_budget_state(tmp_path, 5.0)
    state = {"budget_s": 5.0, "used_s": 2.0, "plan": CpuBudgetCallback(5.0).plan.state()}
    (tmp_path / BUDGET_STATE_FILE).write_text(json.dumps(state))
    assert resumed_budget_state(tmp_path, 5.0) == state
    with pytest.raises(UserError, match="with --time_budget 5s, this one has --time_budget 6s"):
        resumed_budget_state(tmp_path, 6.0)
    with pytest.raises(UserError, match="with --time_budget 5s, this one has none"):
        resumed_budget_state(tmp_path, None)


@pytest.mark.parametrize("drift", [0.5, -0.3])
def test_cpu_budget_refits_the_schedule_when_step_cost_drifts(monkeypatch, drift):
    """Steps that get dearer (or cheaper) over the run: the refit plan still ends the schedule, with the budget."""
    def cost(k):  # 1 s a step at the start, 1 + drift at step 1000
        return 1.0 + drift * min(k, 1000) / 1000

    cb, lr, steps = _run_budgeted(monkeypatch, cost, refits=9)
    used = sum(cost(k) for k in range(1, steps + 1))
    assert cb.planned_steps is not None and abs(steps - cb.planned_steps) <= 0.01 * steps
    assert lr < 0.05  # the learning rate decayed (almost) to its end
    assert used > 0.97 * 1000  # and the budget was used
    once, lr_once, steps_once = _run_budgeted(monkeypatch, cost, refits=0)
    if drift > 0:  # planned once from the first steps: the budget runs out with the rate still high
        assert steps_once < 0.9 * once.planned_steps and lr_once > 0.1
    else:  # the plan is reached with budget left over
        assert sum(cost(k) for k in range(1, steps_once + 1)) < 0.9 * 1000


def test_joint_stage_refits_its_plan_when_step_cost_drifts(monkeypatch):
    """The joint block stage plans with the same StepPlan: steps that get dearer still end the schedule with
    the budget. A fake CPU clock is advanced by each training step's loss: step k costs 1 + k / 100 s, so
    the first plan (from steps 2-3, 1.025 s a step) is 58 steps, and 60 s buy 49."""
    import time

    import bitdistill.recover.joint as joint

    clock, calls = [0.0], [0]
    local_loss = joint._local_loss

    def dearer(*args, **kwargs):
        calls[0] += 1
        clock[0] += 1.0 + calls[0] / 100
        return local_loss(*args, **kwargs)

    monkeypatch.setattr(time, "process_time", lambda: clock[0])
    monkeypatch.setattr(joint, "_local_loss", dearer)
    teacher, student = _pair("llama")
    rep = reconstruct_jointly_in_place(student, teacher, _ids(8), JointConfig(micro_batch=2), budget_cpu_s=60.0)
    assert 47 <= rep.steps <= 49 and abs(rep.steps - rep.planned_steps) <= 1
    assert rep.cpu_s > 58.0


def test_staged_block_share_depends_on_the_budget():
    """Long budgets (from 60 CPU-minutes) give the block stage 0.3, short ones 0.15; an explicit share wins. The
    context stage is off unless asked for."""
    from bitdistill.recover.staged import RecoverArguments

    short, long = 30 * 60, 90 * 60
    default = RecoverArguments()
    assert (default.resolved(short).block_fraction, default.resolved(long).block_fraction) == (0.15, 0.3)
    assert default.context_fraction == 0.0
    given = RecoverArguments(block_fraction=0.5)
    for budget in (short, long):
        assert given.resolved(budget).block_fraction == 0.5


def test_staged_block_steps_depend_on_the_mode_and_the_budget():
    """The joint stage takes 1 x 128-token steps at every budget, at 1e-2 below 30 CPU-minutes and 3e-3 from 30
    (measured on held-out blocks, docs/distill.md); the sequential one 2 blocks of calibration_seq_length at 1e-3 at
    every budget (not re-measured). Given options win; ``resolved`` does not change its input."""
    from bitdistill.recover.staged import SHORT_BUDGET_S, RecoverArguments

    def shape(args: RecoverArguments, budget: float) -> tuple:
        r = args.resolved(budget)
        return r.block_micro_batch, r.block_seq_length, r.block_lr

    joint, sequential = RecoverArguments(), RecoverArguments(block_mode="sequential")
    assert shape(joint, 10 * 60) == shape(joint, SHORT_BUDGET_S - 1) == (1, 128, 1e-2)
    assert shape(joint, SHORT_BUDGET_S) == shape(joint, 90 * 60) == (1, 128, JointConfig().lr) == (1, 128, 3e-3)
    assert shape(RecoverArguments(calibration_seq_length=512), 90 * 60) == (1, 128, 3e-3)
    assert shape(RecoverArguments(calibration_seq_length=32), 10 * 60) == (1, 32, 1e-2)  # never longer than those
    for budget in (10 * 60, 90 * 60):
        assert shape(sequential, budget) == (2, None, BlockwiseConfig().lr) == (2, None, 1e-3)
        for mode in ("joint", "sequential"):
            given = RecoverArguments(block_mode=mode, block_lr=5e-4, block_micro_batch=3)
            assert shape(given, budget)[::2] == (3, 5e-4)
        assert shape(RecoverArguments(block_seq_length=64), budget)[1] == 64
    assert joint.block_micro_batch is None and joint.block_lr is None  # the input is not changed
