"""``bitdistill distill --time_budget``: trains for a process-CPU budget with its schedule fit to the planned steps,
shows the plan in the progress bar and the logs, resumes a killed run with the CPU time and plan its checkpoint
recorded, and refuses what a budget cannot do in one line."""

from __future__ import annotations

import json
import re

import pytest
from run_utils import tiny_gpt2_vocab_folder

from bitdistill.cli.main import main


@pytest.fixture(scope="module")
def common(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("budget")
    (root / "train.txt").write_text((shared_data / "wikitext-2-raw-v1" / "wiki.train.prefix.raw").read_text()[:6000])
    teacher = tiny_gpt2_vocab_folder(root / "teacher", "llama", shared_data / "tokenizers" / "gpt2")
    return root, ["distill", "--teacher_model_name_or_path", str(teacher), "--train_files", str(root / "train.txt"),
                  "--max_seq_length", "32", "--data_cache_dir", str(root / "cache"), "--logging_steps", "1",
                  "--report_to", "none", "--save_strategy", "no"]


def test_budgeted_distill_spends_the_budget_on_the_planned_steps(common, capsys):
    root, argv = common
    out = root / "run"
    assert main([*argv, "--time_budget", "6s", "--disable_tqdm", "false", "--output_dir", str(out)]) == 0
    captured = capsys.readouterr()
    train = json.loads((out / "student" / "distill_metrics.json").read_text())["train"]
    steps, planned = train["train_steps"], train["planned_steps"]
    assert train["budget_cpu_s"] == 6.0 and 4.0 <= train["train_cpu_s"] < 8.0, train  # the plan or the budget ends it
    assert planned is not None and 0.7 * planned <= steps <= planned, train
    assert train["train_samples_per_second"] == pytest.approx(steps * 2 / train["train_runtime"], rel=0.01)
    totals = {int(t) for t in re.findall(r"\d+/(\d+) \[", captured.err)}  # tqdm's "step/total [elapsed<left"
    assert planned in totals and max(totals) < 1000, totals  # the plan, never a step count far past the budget
    assert "'planned_steps': " in captured.out and "'cpu_s_left': " in captured.out


@pytest.mark.parametrize(("flags", "match"), [
    (["--time_budget", "10x"], "--time_budget '10x' is not a CPU time"),
    (["--time_budget", "5s", "--max_steps", "3"], "--time_budget plans the steps itself; drop --max_steps"),
])
def test_budget_refusals_are_one_line_before_any_work(common, capsys, flags, match):
    root, argv = common
    out = root / f"bad{abs(hash(tuple(flags)))}"
    assert main([*argv, *flags, "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert match in err and len([line for line in err.splitlines() if "error:" in line]) == 1, err
    assert not out.exists()


@pytest.fixture
def one_thread():
    """One torch thread: on a loaded machine OpenMP's spinning can cost more CPU time than a tiny model's steps."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_budgeted_distill_resumes_with_the_cpu_time_and_plan_of_its_checkpoint(common, capsys, monkeypatch, one_thread):
    """Killed after a checkpoint, a budgeted run resumed with ``latest`` continues that checkpoint's CPU time and plan:
    it ends within one budget, not a second one. Resuming with another budget, or none, is refused in one line."""
    import time

    from transformers import TrainerCallback

    from bitdistill.budget import BUDGET_STATE_FILE
    from bitdistill.distill import run as distill_run

    root, argv = common
    out = root / "resumed"
    args = [*argv, "--time_budget", "6s", "--save_strategy", "steps", "--save_steps", "2", "--output_dir", str(out)]
    real = distill_run.distill_student

    class Kill(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            saved = json.loads((out / f"checkpoint-{state.global_step}" / BUDGET_STATE_FILE).read_text())
            if saved["used_s"] >= 3.0:
                raise RuntimeError(f"killed after checkpoint-{state.global_step}")

    def killed(*a, callbacks=None, **kw):
        return real(*a, callbacks=[*(callbacks or []), Kill()], **kw)

    monkeypatch.setattr(distill_run, "distill_student", killed)
    first = time.process_time()
    with pytest.raises(RuntimeError, match="killed after checkpoint-") as info:
        main(args)
    first = time.process_time() - first  # setup and half the budget
    monkeypatch.setattr(distill_run, "distill_student", real)
    step = int(str(info.value).rsplit("-", 1)[1])
    saved = json.loads((out / f"checkpoint-{step}" / BUDGET_STATE_FILE).read_text())
    assert saved["budget_s"] == 6.0 and 3.0 <= saved["used_s"] < 6.0 and saved["plan"]["planned_steps"] > step
    other = [a if a != "6s" else "5s" for a in args]
    unbudgeted = [a for a in args if a not in ("--time_budget", "6s")] + ["--max_steps", "1000"]
    for bad, match in ((other, "with --time_budget 6s, this one has --time_budget 5s; resume with the same budget"),
                       (unbudgeted, "with --time_budget 6s, this one has none")):
        assert main([*bad, "--resume_from_checkpoint", "latest"]) == 2
        err = capsys.readouterr().err
        assert match in err and len([line for line in err.splitlines() if "error:" in line]) == 1, err
        assert not (out / "student").exists()
    cpu = time.process_time()
    assert main([*args, "--resume_from_checkpoint", "latest"]) == 0
    cpu = time.process_time() - cpu  # setup and the budget's other half; a second budget: about first + 3 s
    train = json.loads((out / "student" / "distill_metrics.json").read_text())["train"]
    assert train["train_steps"] > step and saved["used_s"] < train["train_cpu_s"] < 8.0, train
    assert cpu < first + 1.5, (cpu, first)
    assert train["planned_steps"] is not None and 0.7 * train["planned_steps"] <= train["train_steps"], train
