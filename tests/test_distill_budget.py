"""``bitdistill distill --time_budget``: trains for a process-CPU budget with its schedule fit to the planned steps,
shows the plan in the progress bar and the logs, and refuses what a budget cannot do in one line."""

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
    (["--time_budget", "5s", "--resume_from_checkpoint", "latest"], "cannot resume a checkpoint"),
])
def test_budget_refusals_are_one_line_before_any_work(common, capsys, flags, match):
    root, argv = common
    out = root / f"bad{abs(hash(tuple(flags)))}"
    assert main([*argv, *flags, "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert match in err and len([line for line in err.splitlines() if "error:" in line]) == 1, err
    assert not out.exists()
