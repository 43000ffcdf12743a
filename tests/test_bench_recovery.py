"""``benchmarks/bench_recovery.py`` (held-out blocks, commands, report) and ``recovery_loss_curves.py``."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
from run_utils import load_benchmark

from bitdistill.data.args import DataArguments
from bitdistill.recover.staged import RecoverArguments, _calibration


@pytest.fixture(scope="module")
def bench(shared_data):
    return load_benchmark("bench_recovery")


def test_bench_held_out_blocks_are_the_recipes_at_every_budget(bench):
    """The benchmark scores every student on the tuning split `bitdistill recover` holds out with its defaults (64 x
    256 tokens), and it does not move with the budget (the block stage's learning rate does)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bench.TOKENIZER)
    held = bench.held_out_blocks(tok)
    assert held.shape == (64, 256)
    data = DataArguments(train_files=[str(f) for f in bench.TRAIN])
    for minutes in (10, 30, 90):
        args = RecoverArguments().resolved(minutes * 60)
        _, train, held_there = _calibration(args, data, tok)
        assert torch.equal(held_there, held)
        assert train.shape[1] == args.block_seq_length == 128


@pytest.mark.parametrize("command", ["distill", "recover"])
def test_command_defaults_are_the_flags_the_budget_curve_measured(bench, command):
    """Every default of `bitdistill distill` and of `recover`'s e2e stage is the value the benchmark's e2e and
    staged commands pass."""
    from bitdistill.cli.hfargs import parse_dataclasses
    from bitdistill.cli.main import build_parser
    from bitdistill.distill.args import DISTILL_DEFAULTS

    args = build_parser([command]).parse_args([command, *bench.COMMON, *bench.E2E])
    assert DISTILL_DEFAULTS.keys() <= vars(args).keys()  # the benchmark passes every one explicitly
    types = importlib.import_module(f"bitdistill.cli.{command}")._types()
    parsed = {k: v for obj in parse_dataclasses(args, types) for k, v in vars(obj).items()}
    assert {k: parsed[k] for k in DISTILL_DEFAULTS} == DISTILL_DEFAULTS


def test_report_names_the_other_seeds_per_budget(bench):
    rows = [{"recipe": "teacher", "budget_cpu_min": 0.0, "seed": 0}] + [
        {"recipe": recipe, "budget_cpu_min": budget, "seed": seed} for recipe in ("e2e", "staged")
        for budget, seeds in ((10.0, (0, 1, 2)), (30.0, (0, 1)), (90.0, (0, 1))) for seed in seeds]
    assert bench.other_seed_commands(rows) == "`... --budgets 10 --seeds 1 2`, `... --budgets 30 90 --seeds 1`"
    assert bench.other_seed_commands([r for r in rows if r["seed"] == 0]) == ""


@pytest.mark.parametrize("recipe,command", [("e2e", "distill"), ("staged", "recover")])
def test_train_argv_extra_flags_override_the_recipes(bench, monkeypatch, tmp_path, recipe, command):
    """A probe's arm (`extra`) is appended after the recipe's own flags, so it wins, and leaves `E2E` untouched."""
    from bitdistill.cli.main import build_parser

    monkeypatch.setattr(bench, "_gguf", lambda: tmp_path / "teacher.gguf")
    e2e_before = list(bench.E2E)
    plain = build_parser([command]).parse_args(bench.train_argv(recipe, 10, tmp_path / "run"))
    argv = bench.train_argv(recipe, 10, tmp_path / "run", extra=("--quant_warmup_steps", "7", "--learning_rate", "3e-4"))
    args = build_parser([command]).parse_args(argv)
    assert (args.quant_warmup_steps, args.learning_rate) == (7, 3e-4)
    assert plain.learning_rate == 1e-3 and "quant_warmup_steps" not in vars(plain)
    assert bench.E2E == e2e_before


def test_probe_rows_carry_their_flags_and_never_touch_the_curve(bench, monkeypatch, tmp_path):
    """``--flags`` reaches every training child and the row; its rows go to ``--rows`` only (no teacher row, no
    report), and ``--flags`` without ``--rows`` is refused before any work, so a probe cannot mix into the curve."""
    curve = tmp_path / "curve.jsonl"
    monkeypatch.setattr(bench, "CURVE", curve)
    calls = []

    def child(cmd, log):
        calls.append(cmd)
        return {"cpu_s": 60.0} if cmd[0] == "--child-train" else {"ppl": 100.0, "lastword_acc": 0.0}

    monkeypatch.setattr(bench, "_child", child)
    monkeypatch.setattr(bench, "write_report", lambda limit: pytest.fail("a probe regenerated the curve's report"))
    rows = tmp_path / "probe.jsonl"
    argv = ["bench_recovery.py", "--budgets", "1", "--recipes", "staged", "--seeds", "5", "--work-dir",
            str(tmp_path / "work"), "--flags=--bf16 true --use_cpu true"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exc:
        bench.main()
    assert exc.value.code == 2 and calls == [] and not curve.exists()
    monkeypatch.setattr(sys, "argv", [*argv, "--rows", str(rows)])
    bench.main()
    bench.main()  # a finished row is skipped
    assert [c[0] for c in calls] == ["--child-train", "--child-eval"]
    assert calls[0][-1] == "--flags=--bf16 true --use_cpu true"
    (row,) = bench.read_rows(rows)
    assert (row["recipe"], row["budget_cpu_min"], row["seed"], row["ppl"]) == ("staged", 1, 5, 100.0)
    assert row["flags"] == ["--bf16", "true", "--use_cpu", "true"]
    assert not curve.exists()


def test_loss_curves_place_each_recipes_losses_on_its_cpu_time(tmp_path, shared_data):
    """The staged recipe's e2e-stage losses start where its block stage ended; each tenth of the budget averages
    the losses logged in it."""
    curves_mod = load_benchmark("recovery_loss_curves")

    def log(folder, losses):
        folder.mkdir(parents=True)
        lines = [{"event": "train_begin", "step": 0}] + [
            {"event": "train", "step": 10 * (i + 1), "loss": x} for i, x in enumerate(losses)]
        (folder / "audit_log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        return folder / "audit_log.jsonl"

    e2e = curves_mod.logged_losses(log(tmp_path / "e2e", [9.0, 7.0, 5.0, 4.0]), 0.0, 600.0)
    staged = curves_mod.logged_losses(log(tmp_path / "staged", [6.0, 3.0]), 300.0, 600.0)
    assert e2e == [(150.0, 9.0), (300.0, 7.0), (450.0, 5.0), (600.0, 4.0)]
    assert staged == [(450.0, 6.0), (600.0, 3.0)]
    rows = curves_mod.table({"e2e": e2e, "staged": staged}, 10, parts=2).splitlines()
    assert rows[0] == "| CPU-min | e2e loss | staged loss |"
    assert rows[2:] == ["| 0-5 | 9.00 |  |", "| 5-10 | 5.33 | 4.50 |"]  # the budget's end counts in the last part


def test_loss_curves_tabulate_one_term_and_name_a_log_without_it(tmp_path, shared_data):
    """``key="loss_<term>"`` reads that term of every training record; a log that lacks it (a run from before the
    audit log kept the terms, or one whose weight was 0) is a ``MissingRun`` naming the log and the key."""
    curves_mod = load_benchmark("recovery_loss_curves")
    log = tmp_path / "audit_log.jsonl"
    log.write_text("".join(json.dumps({"event": "train", "step": 10 * (i + 1), "loss": 2 * x + 1, "loss_logits": x})
                           + "\n" for i, x in enumerate([4.0, 2.0])))
    logits = curves_mod.logged_losses(log, 0.0, 60.0, key="loss_logits")
    assert logits == [(30.0, 4.0), (60.0, 2.0)]
    assert curves_mod.table({"a": logits, "b": logits}, 1, parts=1, key="loss_logits").splitlines() == [
        "| CPU-min | a loss_logits | b loss_logits |", "|---|---|---|", "| 0-1 | 3.00 | 3.00 |"]
    with pytest.raises(curves_mod.MissingRun, match="without 'loss_hidden'"):
        curves_mod.logged_losses(log, 0.0, 60.0, key="loss_hidden")


def _train_log(path, losses):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"event": "train", "step": 10 * (i + 1), "loss": x}) + "\n"
                            for i, x in enumerate(losses)))


def _staged_run(folder, losses, blocks_cpu_s, end_cpu_s):
    _train_log(folder / "e2e" / "audit_log.jsonl", losses)
    (folder / "recovery.json").write_text(json.dumps({"stages": [
        {"stage": "blocks", "cpu_s": blocks_cpu_s}, {"stage": "e2e", "cpu_s": end_cpu_s}]}))


def test_loss_curves_take_every_run_under_the_work_dirs(tmp_path, shared_data):
    """One column per run: an e2e run spans its row's CPU time (from ``rows_file``), a staged run its e2e stage
    (from its ``recovery.json``); a recipe under two folders is labelled by folder."""
    mod = load_benchmark("recovery_loss_curves")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"recipe": "e2e", "budget_cpu_min": 10, "seed": 2, "cpu_s": 600.0}) + "\n")
    _train_log(tmp_path / "a" / "e2e-10-seed2" / "audit_log.jsonl", [8.0, 6.0])
    _staged_run(tmp_path / "a" / "staged-10-seed2", [5.0, 4.0], 200.0, 600.0)
    _staged_run(tmp_path / "b" / "staged-10-seed2", [7.0], 300.0, 600.0)
    got = mod.curves([tmp_path / "a", tmp_path / "b"], 10, 2, rows_file=rows)
    assert got == {"e2e": [(300.0, 8.0), (600.0, 6.0)], "staged (a)": [(400.0, 5.0), (600.0, 4.0)],
                   "staged (b)": [(600.0, 7.0)]}
    assert list(mod.curves([tmp_path / "b"], 10, 2, rows_file=rows)) == ["staged"]  # no e2e row needed
    with pytest.raises(mod.MissingRun, match="no recorded e2e rows at 10 CPU-min, seed 2 in"):
        mod.curves([tmp_path / "a"], 10, 2, rows_file=tmp_path / "none.jsonl")
    (tmp_path / "b" / "staged-10-seed2" / "recovery.json").unlink()
    with pytest.raises(mod.MissingRun, match=r"recovery\.json not found: the staged run did not finish"):
        mod.curves([tmp_path / "b"], 10, 2, rows_file=rows)


def test_loss_curves_name_a_missing_run_and_exit_2(tmp_path, shared_data, capsys, monkeypatch):
    mod = load_benchmark("recovery_loss_curves")
    monkeypatch.setattr(sys, "argv", ["recovery_loss_curves.py", "--budget", "7", "--work-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        mod.main()
    assert e.value.code == 2 and "no e2e or staged run at 7 CPU-min, seed 0 under" in capsys.readouterr().err


def test_default_recipe_passes_no_recipe_flag(bench, monkeypatch, tmp_path):
    """The ``default`` rows run what `bitdistill recover` runs given only the teacher (and its tokenizer), the
    text, the budget, the seed and the output: every other option parses to the command's own default, but for
    ``--held_out_curve``, which only adds evaluations outside the budget."""
    from bitdistill.cli import recover
    from bitdistill.cli.hfargs import parse_dataclasses
    from bitdistill.cli.main import build_parser
    from bitdistill.distill.args import DISTILL_DEFAULTS

    monkeypatch.setattr(bench, "_gguf", lambda: tmp_path / "teacher.gguf")
    argv = bench.train_argv("default", 90, tmp_path / "run", seed=1)
    flags = {a for a in argv if a.startswith("--")}
    assert argv[0] == "recover" and flags == {
        "--teacher_model_name_or_path", "--teacher_gguf_file", "--tokenizer_name_or_path", "--train_files",
        "--time_budget", "--seed", "--output_dir", "--held_out_curve"}
    minimal = ["recover", *argv[argv.index("--teacher_model_name_or_path"):argv.index("--time_budget")]]
    plain = parse_dataclasses(build_parser(["recover"]).parse_args([*minimal, "--output_dir", str(tmp_path / "run")]),
                              recover._types(), defaults=DISTILL_DEFAULTS)
    ours = parse_dataclasses(build_parser(["recover"]).parse_args(argv), recover._types(), defaults=DISTILL_DEFAULTS)
    measured = {"time_budget", "held_out_curve"}
    for a, b in zip(plain[:3] + plain[4:], ours[:3] + ours[4:], strict=True):
        assert {k: v for k, v in vars(a).items() if k not in measured} == {
            k: v for k, v in vars(b).items() if k not in measured}
    assert ours[4].time_budget == "90m" and ours[3].seed == 1


def _row(recipe, budget, seed, ppl, **extra):
    return {"recipe": recipe, "budget_cpu_min": budget, "seed": seed, "ppl": ppl, "lastword_acc": 0.1,
            "train_tokens": 1000, "cpu_s": budget * 60.0, "cpu_model": "cpu A", **extra}


def test_report_shows_every_recipe_the_ratio_and_the_continuations(bench, monkeypatch, tmp_path):
    """Old rows (no curve, no held-out tokens, no CPU model) stay readable; the default / baseline ratio is the
    geometric mean over seeds 0 and 1 on one CPU model; the continuations of the 90- and 270-minute default students
    stand beside the teacher's."""
    import math

    curve_file = tmp_path / "curve.jsonl"
    monkeypatch.setattr(bench, "CURVE", curve_file)
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    conts = {p: f"{p} | again\nand" for p in bench.PROMPTS}
    curve = [[4.5, 900.0], [9.0, 160.0], [18.0, 120.0], [30.0, 95.0]]
    rows = [{"recipe": "teacher", "budget_cpu_min": 0, "ppl": 28.7, "lastword_acc": 0.275, "train_tokens": 0,
             "continuations": {p: "teacher text" for p in bench.PROMPTS}},
            {"recipe": "staged", "budget_cpu_min": 90, "ppl": 85.6, "lastword_acc": 0.07, "train_tokens": 5,
             "held_out_ppl": 90.0, "cpu_s": 5400.0}]  # an old row: no seed, no CPU model, 4 x 256 held out
    rows += [_row("baseline", 30, s, p) for s, p in ((0, 150.0), (1, 140.0))]
    rows += [_row("default", 30, s, p, default=True, held_out_tokens=16384, held_out_ppl=p,
                  **bench.curve_fields(curve)) for s, p in ((0, 110.0), (1, 120.0))]
    rows += [_row("baseline", 90, 0, 86.0), _row("default", 90, 0, 60.0, default=True, continuations=conts),
             _row("default", 90, 1, 62.0, default=True, cpu_model="cpu B"), _row("baseline", 90, 1, 88.0),
             _row("default", 270, 0, 50.0, default=True, continuations=conts), _row("e2e", 30, 0, 200.0)]
    curve_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    md = bench.write_report(200).read_text()
    assert [(b, round(new / base, 4)) for b, _, base, new in bench.default_vs_baseline(bench._rows())] == [
        (30, round(math.sqrt(110 * 120) / math.sqrt(150 * 140), 4))]  # at 90 seed 1 ran on another CPU
    assert "| 30 | cpu A | 144.9 | 114.9 | 0.793 | <= 0.78 |" in md
    for recipe in ("baseline", "default", "staged", "e2e"):
        assert f"| {recipe} |" in md
    assert "| default | 30 | 0 | 110.0 | 3.83 | 110.0 | 16384 | 11.0 | 27.4 |" in md  # 150, 100 reached between points
    assert "| staged | 90 | 0 | 85.6 | 2.98 | 90.0 | 1024 |  |  |" in md  # the old row
    assert "| prompt | teacher | default, 90 CPU-min | default, 270 CPU-min |" in md
    line = next(x for x in md.splitlines() if x.startswith(f"| *{bench.PROMPTS[0]}*"))
    assert line.count("again\\nand") == 2 and "teacher text" in line and "\\|" in line
    assert "PYTHONPATH=<dir>" in md and f"detached at `{bench.BASELINE_COMMIT}`" in md


def test_curve_fields_name_the_first_minute_of_each_threshold(bench):
    assert bench.curve_fields(None) == {}
    got = bench.curve_fields([[3.0, 400.0], [9.0, 140.0], [30.0, 120.0]])
    assert got["cpu_min_to_ppl_100"] is None and 3.0 < got["cpu_min_to_ppl_150"] < 9.0


def test_import_baseline_relabels_the_pinned_rows_once(bench, tmp_path):
    """The pinned commit's staged rows become ``baseline`` rows (a second import adds none); a row of another
    recipe or commit is refused before anything is written."""
    source, curve = tmp_path / "baseline.jsonl", tmp_path / "curve.jsonl"
    rows = [{**_row("staged", 30, s, 150.0), "git_sha": bench.BASELINE_COMMIT} for s in (0, 1)]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert bench.import_baseline(source, curve) == 2 and bench.import_baseline(source, curve) == 0
    assert [(r["recipe"], r["seed"]) for r in bench.read_rows(curve)] == [("baseline", 0), ("baseline", 1)]
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({**rows[0], "git_sha": "1234567"}) + "\n")
    before = curve.read_text()
    with pytest.raises(SystemExit, match="the baseline is the staged recipe at abf192d"):
        bench.import_baseline(other, curve)
    assert curve.read_text() == before


def test_default_rows_train_with_the_commands_defaults(bench, monkeypatch, tmp_path):
    """The training child runs the recorded command as the console script does, so the options the ``default``
    recipe leaves out take `bitdistill recover`'s defaults (``DISTILL_DEFAULTS``), never the dataclasses'."""
    import bitdistill.allocator
    import bitdistill.recover.staged as staged
    from bitdistill.distill.args import DISTILL_DEFAULTS

    seen = {}

    def fake_run(model_args, data_args, loss_args, training_args, recover_args, task_args, **kwargs):
        seen.update(data=data_args, loss=loss_args, training=training_args)
        out = Path(training_args.output_dir)
        out.mkdir(parents=True)
        (out / "recovery.json").write_text(json.dumps({"stages": [{"cpu_s": 60.0}], "train_tokens": 10,
                                                       "held_out_curve": [[1.0, 120.0]]}))
        return out / "student"

    monkeypatch.setattr(bench, "_gguf", lambda: tmp_path / "teacher.gguf")
    monkeypatch.setattr(staged, "run_staged_recovery", fake_run)
    monkeypatch.setattr(bitdistill.allocator, "keep_freed_memory", lambda: None)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    info = bench.child_train("default", 1, tmp_path / "run", 0)
    assert seen["data"].max_seq_length == DISTILL_DEFAULTS["max_seq_length"]
    assert seen["training"].per_device_train_batch_size == DISTILL_DEFAULTS["per_device_train_batch_size"]
    assert seen["loss"].hidden_weight == DISTILL_DEFAULTS["hidden_weight"]
    assert info["curve"] == [[1.0, 120.0]] and info["cpu_min_to_ppl_150"] == 1.0 and info["cpu_min_to_ppl_100"] is None


def test_bench_prompts_are_the_model_cards(bench):
    """The benchmark's report and a recovered student's model card continue the same prompts."""
    from bitdistill.recover.staged import CARD_NEW_TOKENS, CARD_PROMPTS

    assert bench.PROMPTS == CARD_PROMPTS and bench.NEW_TOKENS == CARD_NEW_TOKENS
