"""``bitdistill recover`` end to end on a tiny model: stage results, packing, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from run_utils import tiny_gpt2_vocab_folder
from transformers import AutoModelForCausalLM

from bitdistill import load_student
from bitdistill.cli.main import main
from bitdistill.export.folder import pack_pretrained


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("recover")
    tok = shared_data / "tokenizers" / "gpt2"
    wiki = shared_data / "wikitext-2-raw-v1"
    (root / "train.txt").write_text((wiki / "wiki.train.prefix.raw").read_text()[:12000])
    return {"root": root, "common": [
        "--teacher_model_name_or_path", str(tiny_gpt2_vocab_folder(root / "teacher", "llama", tok)),
        "--train_files", str(root / "train.txt"), "--max_seq_length", "32", "--per_device_train_batch_size", "2",
        "--data_cache_dir", str(root / "cache"), "--seed", "0", "--disable_tqdm", "true", "--report_to", "none",
        "--save_strategy", "no", "--calibration_tokens", "256", "--calibration_seq_length", "32",
        "--held_out_tokens", "128", "--block_micro_batch", "4", "--block_fraction", "0.5"]}


def test_recover_runs_every_stage_and_packs(setup, capsys, tmp_path):
    from bitdistill.recover import staged

    out = setup["root"] / "run"
    rc = main(["recover", *setup["common"], "--time_budget", "20s", "--held_out_curve", "true", "--block_steps", "4",
               "--block_init", "gptq",
               "--block_seq_length", "16", "--context_fraction", "0.25", "--output_dir", str(out)])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    summary = json.loads((out / "recovery.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["init", "blocks", "e2e", "context"]
    assert [s["detail"]["seq_length"] for s in summary["stages"][2:]] == [32, 128]  # the teacher's context: 128
    blocks = summary["stages"][1]["detail"]  # 4 steps of 4 x 16 tokens (--block_micro_batch, --block_seq_length)
    assert blocks["steps"] == 4 and blocks["train_tokens"] == 4 * 4 * 16
    assert summary["recover_args"]["block_seq_length"] == 16
    e2e, context = summary["stages"][2:]  # tokens a step: 2 x 32, then 1 x 128 (the same tokens, at least a block)
    assert e2e["detail"]["train_tokens"] == e2e["detail"]["steps"] * 2 * 32
    assert context["detail"]["train_tokens"] == context["detail"]["steps"] * 128
    for s in summary["stages"]:
        assert f"stage {s['stage']}: held-out loss" in printed
        assert s["held_out_perplexity"] > 1 and s["cpu_s"] > 0
    curve = summary["held_out_curve"]  # the tenths of the budget inside the KD stages, and every stage's end
    assert e2e["detail"]["curve"] and len(curve) > len(summary["stages"]) and summary["held_out_tokens"] == 128
    assert [c for c, _ in curve] == sorted(c for c, _ in curve) and curve[-1] == [context["cpu_s"] / 60,
                                                                                context["held_out_perplexity"]]
    assert context["cpu_s"] < 20 * 1.2  # the held-out evaluations inside the stages are not counted
    audit = [json.loads(line) for line in (out / "audit_log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in audit if r.get("event") == "stage"] == ["init", "blocks", "e2e", "context"]
    card = (out / "student" / "README.md").read_text()
    assert "## Staged recovery" in card and "in a budget of 0 CPU-minutes" in card  # 20 s
    teacher_ppl = math.exp(summary["teacher_held_out_loss"])
    assert f"| teacher | {summary['teacher_held_out_loss']:.4f} | {teacher_ppl:.2f} | |" in card
    ratio = context["held_out_perplexity"] / teacher_ppl
    assert f"The student's held-out perplexity is {ratio:.2f}x its teacher's." in card
    table = card.split("### Greedy continuations")[1].split("| prompt | teacher | student |\n|---|---|---|\n")[1]
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0][2:] for r in rows] == list(staged.CARD_PROMPTS)
    assert all(r.count(" | ") == 2 + r.count("\\|") for r in rows)  # one line each, pipes escaped
    pack_pretrained(out / "student", tmp_path / "packed", dtype="float32")  # float32: the student's exact function
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "packed", dtype=torch.float32).eval()(ids).logits
        student = load_student(out / "student").eval()(ids).logits
    torch.testing.assert_close(plain, student, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("flags", "match"), [
    (["--time_budget", "0.0001s", "--block_init", "gptq"], "first stage alone needs"),
    (["--time_budget", "0.0001s"], "first stage alone needs"),
    (["--time_budget", "10x"], "is not a CPU time"),
    (["--time_budget", "1m", "--calibration_tokens", "100000"], "fewer than the"),
    (["--time_budget", "1m", "--held_out_tokens", "100000"], "held-out tokens asked; give more text or lower"),
    (["--time_budget", "1m", "--held_out_blocks", "2"], "both set the held-out split; drop --held_out_blocks"),
    (["--time_budget", "1m", "--block_mode", "sequential", "--state_memory_mb", "0"], "memory budget"),
    (["--time_budget", "1m", "--block_mode", "parallel"], "unknown --block_mode"),
    (["--time_budget", "1m", "--block_loss", "l1"], "unknown block loss"),
    (["--time_budget", "1m", "--context_length", "256"], "exceeds the teacher's context of 128"),
    (["--time_budget", "1m", "--context_fraction", "1"], "--context_fraction in [0, 1)"),
    (["--time_budget", "1m", "--block_seq_length", "1"], "--block_seq_length must be at least 2"),
    (["--time_budget", "1m", "--block_seq_length", "256"], "--block_seq_length 256 exceeds the teacher's context"),
    (["--time_budget", "1m", "--block_micro_batch", "20", "--block_seq_length", "128"], "fewer than one block step"),
    (["--time_budget", "1m", "--block_mode", "sequential", "--block_seq_length", "16"], "drop it with --block_mode"),
])
def test_recover_bad_input_fails_before_work(setup, capsys, flags, match):
    out = Path(setup["root"]) / f"bad{abs(hash(tuple(flags)))}"
    rc = main(["recover", *setup["common"], *flags, "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and match in err, err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1
    assert not (out / "student").exists() and not (out / "init").exists()


def test_joint_training_blocks_are_the_training_text_before_the_held_out_tail(setup, shared_data):
    """The joint stage's ``[T, block_seq_length]`` blocks hold the tokens of the ``[N, calibration_seq_length]``
    blocks that are not held out, in order, whatever the two lengths."""
    from transformers import AutoTokenizer

    from bitdistill.data.args import DataArguments
    from bitdistill.recover.staged import RecoverArguments, _calibration

    tok = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "gpt2")
    data = DataArguments(train_files=[str(setup["root"] / "train.txt")])
    base = RecoverArguments(calibration_tokens=64, calibration_seq_length=32, held_out_blocks=3, block_micro_batch=1)
    _, train, held = _calibration(base, data, tok)
    for length in (16, 24, 100):
        _, blocks, held2 = _calibration(RecoverArguments(**{**base.__dict__, "block_seq_length": length}), data, tok)
        assert blocks.shape[1] == length and torch.equal(held2, held)
        assert torch.equal(blocks.reshape(-1), train.reshape(-1)[: blocks.numel()])
        assert train.numel() - blocks.numel() < length


def test_recover_refuses_text_too_short_for_the_context_stage(setup, capsys, shared_data):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "gpt2")
    words = (shared_data / "wikitext-2-raw-v1" / "wiki.train.prefix.raw").read_text().split()
    text = " ".join(words[:230])
    while len(tok(text).input_ids) > 240:  # 192-255 tokens: the 6 blocks of 32 asked, one block of 128
        text = text.rsplit(" ", 1)[0]
    short = setup["root"] / "short.txt"
    short.write_text(text)
    out = setup["root"] / "short-run"
    rc = main(["recover", *setup["common"], "--train_files", str(short), "--calibration_tokens", "64",
               "--held_out_tokens", "64", "--time_budget", "1m", "--context_fraction", "0.25", "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "the context stage needs" in err, err
    assert not (out / "student").exists() and not (out / "stage2_student").exists()


def test_recover_resumes_after_each_training_stage_with_subln(setup, capsys, monkeypatch):
    """A run killed in the middle of the e2e stage resumes from its saved block stage, one killed in the context
    stage from its saved e2e stage (neither redone, their CPU time counted; the killed stage starts over)."""
    from transformers import TrainerCallback

    from bitdistill.recover import staged

    out = setup["root"] / "resume"
    argv = ["recover", *setup["common"], "--time_budget", "20s", "--block_steps", "3", "--subln", "true",
            "--context_fraction", "0.25", "--output_dir", str(out)]
    real = staged.distill_student

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise RuntimeError(f"killed at step 2 of {args.output_dir}")

    def kill_in(stage):
        def run(*args, data_args, callbacks=None, **kwargs):
            extra = [Kill()] if data_args.max_seq_length == {"e2e": 32, "context": 128}[stage] else []
            return real(*args, data_args=data_args, callbacks=[*(callbacks or []), *extra], **kwargs)
        return run

    def stages():
        return [json.loads(line) for line in (out / "audit_log.jsonl").read_text().splitlines()
                if json.loads(line).get("event") == "stage"]

    monkeypatch.setattr(staged, "distill_student", kill_in("e2e"))
    with pytest.raises(RuntimeError, match=r"killed at step 2 of .*e2e"):
        main(argv)
    assert [r["stage"] for r in stages()] == ["blocks"] and (out / "e2e" / "provenance.json").is_file()
    assert main([*argv, "--block_lr", "5e-4"]) == 2  # other options would reuse a block stage they did not train
    err = capsys.readouterr().err
    assert "started with other options (block_lr: 0.01 -> 0.0005)" in err and "--output_dir" in err, err
    assert [r["stage"] for r in stages()] == ["blocks"]
    monkeypatch.setattr(staged, "distill_student", kill_in("context"))
    with pytest.raises(RuntimeError, match=r"killed at step 2 of .*context"):
        main(argv)
    assert "block stage already finished" in capsys.readouterr().out
    first = stages()
    assert [r["stage"] for r in first] == ["blocks", "e2e"] and not (out / "student").exists()
    monkeypatch.setattr(staged, "distill_student", real)
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "block stage already finished" in printed and "e2e stage already finished" in printed
    summary = json.loads((out / "recovery.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["blocks", "e2e", "context"]
    assert len(summary["held_out_curve"]) == 3  # no --held_out_curve: the stages' ends only
    for kept, logged in zip(summary["stages"][:2], first, strict=True):
        assert kept == {k: v for k, v in logged.items() if k not in ("event", "time")}
    cpu = [s["cpu_s"] for s in summary["stages"]]
    assert cpu[0] < cpu[1] < cpu[2] and cpu[2] - cpu[1] < cpu[1] - cpu[0]  # the context stage got its quarter
    assert summary["recover_args"]["context_fraction"] == 0.25 and summary["recover_args"]["context_length"] == 128
    student = load_student(out / "student")
    assert student.model.layers[0].self_attn.o_proj.rms_norm is not None  # SubLN kept
    assert (out / "student" / "README.md").read_text().count("## Staged recovery") == 1


def test_recover_resumes_killed_block_and_e2e_stages_from_their_last_resume_points(setup, capsys, monkeypatch):
    """Killed after a resume point of the joint block stage, then after one of the e2e stage, a rerun continues each
    from it: the steps, the budget's CPU time and the held-out curve carry on (each stage ends within the run's
    budget), and the finished run keeps no resume point."""
    from transformers import TrainerCallback

    from bitdistill.budget import BUDGET_STATE_FILE
    from bitdistill.recover import joint, staged

    out = setup["root"] / "resume-e2e"
    argv = ["recover", *setup["common"], "--time_budget", "20s", "--held_out_curve", "true", "--resume_points", "10",
            "--output_dir", str(out)]
    save = joint._save_atomic

    def killed_blocks(obj, path):
        save(obj, path)
        raise RuntimeError(f"killed after block step {obj['loop']['step']}")

    monkeypatch.setattr(joint, "_save_atomic", killed_blocks)
    with pytest.raises(RuntimeError, match="killed after block step") as info:
        main(argv)
    block_step = int(str(info.value).rsplit(" ", 1)[1])
    monkeypatch.setattr(joint, "_save_atomic", save)
    real = staged.distill_student

    class Kill(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step >= 4:
                raise RuntimeError(f"killed after checkpoint-{state.global_step}")

    def killed(*a, callbacks=None, **kw):
        return real(*a, callbacks=[*(callbacks or []), Kill()], **kw)

    monkeypatch.setattr(staged, "distill_student", killed)
    capsys.readouterr()
    with pytest.raises(RuntimeError, match="killed after checkpoint-") as info:
        main(argv)
    assert f"joint reconstruction resumes from {out / 'blocks' / joint.RESUME_FILE} at step {block_step}" in \
        capsys.readouterr().out
    assert not (out / "blocks" / joint.RESUME_FILE).exists()  # replaced by stage2_student
    monkeypatch.setattr(staged, "distill_student", real)
    point = out / "e2e" / f"checkpoint-{str(info.value).rsplit('-', 1)[1]}"
    stage = json.loads((point / staged.STAGE_STATE_FILE).read_text())
    budget = json.loads((point / BUDGET_STATE_FILE).read_text())
    assert stage["stage"] == "e2e" and 0 < stage["base_s"] < 20 and stage["budget_s"] == budget["budget_s"]
    assert stage["curve"]  # past a tenth of the budget inside the stage
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"e2e stage resumes from {point}" in printed and "block stage already finished" in printed
    summary = json.loads((out / "recovery.json").read_text())
    blocks, e2e = summary["stages"]
    assert blocks["detail"]["steps"] > block_step and 20 * 0.5 * 0.8 < blocks["cpu_s"] < 20 * 0.5 * 1.3
    assert e2e["stage"] == "e2e" and e2e["detail"]["resumed_from"] == point.name
    assert e2e["detail"]["steps"] > int(point.name.split("-")[1])
    assert e2e["detail"]["train_cpu_s"] >= budget["used_s"] and e2e["cpu_s"] < 20 * 1.2
    assert e2e["detail"]["curve"][: len(stage["curve"])] == stage["curve"]  # the points before the kill, kept
    assert not list((out / "e2e").glob("checkpoint-*")) and (out / "student" / "config.json").is_file()


def test_recover_defaults_on_an_architecture_without_subln_skip_it(setup, capsys, shared_data):
    """SubLN (on by default) does not apply to GPT-2: ``--subln true`` fails before any stage; the defaults run every
    stage with SubLN skipped (one line), recorded in the final student's marker and card."""
    gpt2 = tiny_gpt2_vocab_folder(setup["root"] / "gpt2", "gpt2", shared_data / "tokenizers" / "gpt2")
    common = [*setup["common"], "--teacher_model_name_or_path", str(gpt2), "--time_budget", "20s", "--block_steps", "2"]
    out = setup["root"] / "gpt2-run"
    assert main(["recover", *common, "--subln", "true", "--output_dir", str(out)]) == 2
    assert "does not apply to 'gpt2'" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written
    assert main(["recover", *common, "--output_dir", str(out)]) == 0
    assert "recipe parts skipped for gpt2: SubLN" in capsys.readouterr().out
    marker = json.loads((out / "student" / "config.json").read_text())["bitdistill"]
    assert set(marker["recipe"]["skipped"]) == {"subln"}
    assert "Recipe part skipped for this architecture: subln" in (out / "student" / "README.md").read_text()


def test_recover_tokenizes_the_eval_text_once(setup, shared_data, monkeypatch, capsys):
    """Every KD stage (e2e and context here) and the packed student's perplexity read ``--eval_files`` tokenized once."""
    from transformers import PreTrainedTokenizerBase

    root = setup["root"]
    eval_text = (shared_data / "wikitext-2-raw-v1" / "wiki.test.raw").read_text()[:3000]
    (root / "eval.txt").write_text(eval_text)
    calls = []
    real = PreTrainedTokenizerBase.__call__

    def counting(self, text=None, *args, **kwargs):
        calls.append(text == eval_text)
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", counting)
    out = root / "eval-once"
    # 12 s: an e2e step of this run costs about 1.5 CPU-s, and a stage may overrun its share by one step; at 8 s an
    # overrun of the e2e stage's 3 s could leave nothing for the context stage on a loaded machine
    rc = main(["recover", *setup["common"], "--time_budget", "12s", "--block_steps", "2", "--context_fraction", "0.25",
               "--eval_files", str(root / "eval.txt"), "--eval_max_windows", "2", "--output_dir", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert [s["stage"] for s in json.loads((out / "recovery.json").read_text())["stages"]] == ["blocks", "e2e", "context"]
    metrics = json.loads((out / "student" / "distill_metrics.json").read_text())
    assert metrics["student_end"]["final_perplexity"] > 1 and metrics["packed"]["perplexity"] > 1
    assert sum(calls) == 1, calls
