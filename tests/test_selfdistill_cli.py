"""`bitdistill self-distill` end to end on tiny models with the GPT-2 tokenizer and WikiText-2 text."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_utils import StopAt, free_port, parse_cli
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from bitdistill import load_multi_exit, load_student
from bitdistill.cli.main import main
from bitdistill.models import tiny_config


def _config_folder(path: Path, arch: str) -> Path:
    cfg = tiny_config(arch)
    cfg.vocab_size = 50257
    cfg.bos_token_id = cfg.eos_token_id = 50256
    cfg.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("selfdistill")
    wiki = shared_data / "wikitext-2-raw-v1"
    (root / "train.txt").write_text((wiki / "wiki.train.prefix.raw").read_text()[:8000])
    (root / "test.txt").write_text((wiki / "wiki.test.raw").read_text()[:3000])
    common = ["--tokenizer_name_or_path", str(shared_data / "tokenizers" / "gpt2"),
              "--train_files", str(root / "train.txt"), "--max_seq_length", "32",
              "--per_device_train_batch_size", "2", "--logging_steps", "1", "--learning_rate", "3e-3",
              "--data_cache_dir", str(root / "cache"), "--seed", "0", "--disable_tqdm", "true", "--report_to", "none"]
    return {"root": root, "common": common, "llama": _config_folder(root / "llama", "llama"),
            "qwen2": _config_folder(root / "qwen2", "qwen2"), "gpt_neox": _config_folder(root / "gpt_neox", "gpt_neox")}


def _metrics(model_dir: Path) -> dict:
    return json.loads((model_dir / "self_distill_metrics.json").read_text())


@pytest.mark.parametrize("arch,variant", [("llama", "separate"), ("gpt_neox", "shared")])
def test_trains_logs_every_exit_and_reloads(setup, arch, variant):
    root = setup["root"]
    out = root / f"run_{arch}_{variant}"
    rc = main(["self-distill", "--model_config", str(setup[arch]), *setup["common"], "--output_dir", str(out),
               "--max_steps", "8", "--exit_variant", variant, "--validation_blocks", "2",
               "--eval_files", str(root / "test.txt"), "--eval_max_windows", "3", "--save_strategy", "no"])
    assert rc == 0
    model_dir = out / "model"
    m = _metrics(model_dir)
    exits = ["block0", "block1"]
    train_logs = [h for h in m["log_history"] if "loss" in h]
    assert len(train_logs) == 8
    for e in exits:
        assert all(f"train_ce_{e}" in h for h in train_logs)
        for prefix in ("start", "final"):
            assert m[prefix][f"{prefix}_perplexity_{e}"] > 1 and f"{prefix}_loss_{e}" in m[prefix]
        # a few steps at a high learning rate lower every exit's held-out loss and eval NLL
        assert m["final"][f"final_nll_{e}"] < m["start"][f"start_nll_{e}"]
    assert all(f"train_kl_{e}" in train_logs[0] for e in exits[:-1]) and f"train_kl_{exits[-1]}" not in train_logs[0]

    mx = load_multi_exit(model_dir)
    plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.randint(0, 50257, (1, 12))
    with torch.no_grad():
        out_mx = mx(ids)
        torch.testing.assert_close(out_mx.logits[-1], plain(input_ids=ids).logits)
    assert mx.exit_layers == [0] and mx.variant == variant
    if variant == "separate":
        saved = load_file(str(model_dir / "exits.safetensors"))
        torch.testing.assert_close(mx.exit_heads[0].weight, saved["multi_exit.exit_heads.0.weight"])
        assert not torch.equal(mx.exit_heads[0].weight, plain.get_output_embeddings().weight)
        assert "bottlenecks.0.down.weight" in saved  # the hint adapters are kept too
    audit = [json.loads(line) for line in (out / "audit_log.jsonl").read_text().splitlines()]
    events = [r["event"] for r in audit]
    assert events.count("train") == 8 and events.count("evaluate") == 2
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0 for r in audit if r["event"] == "train")
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["args"]["self_distill"]["exit_variant"] == variant
    card = (model_dir / "README.md").read_text()
    assert "| block0 |" in card and "bitdistill self-distill" in card


def test_plain_ternary_run_is_a_packable_student_with_logit_lens_exits(setup, tmp_path):
    root = setup["root"]
    out = tmp_path / "plain"
    assert main(["self-distill", "--model_config", str(setup["llama"]), *setup["common"], "--output_dir", str(out),
                 "--max_steps", "2", "--exit_variant", "none", "--bitnet", "true", "--save_strategy", "no",
                 "--eval_files", str(root / "test.txt"), "--eval_max_windows", "2"]) == 0
    m = _metrics(out / "model")
    assert {f"final_perplexity_block{i}" for i in range(2)} <= set(m["final"])
    assert set(json.loads((out / "model" / "self_distill.json").read_text())) >= {"exit_variant", "exit_layers"}
    student = load_student(out / "model")
    assert type(student.model.layers[0].mlp.up_proj).__name__ == "BitLinear"
    assert main(["pack", str(out / "model"), str(tmp_path / "packed")]) == 0


def _parse(argv):
    return parse_cli("self-distill", argv)


def test_resume_with_tied_embeddings_equals_an_uninterrupted_run(setup):
    from bitdistill.selfdistill.run import run_self_distillation

    root = setup["root"]
    opts = ["--model_config", str(setup["qwen2"]), *setup["common"], "--max_steps", "4", "--save_steps", "2",
            "--exit_variant", "separate", "--lr_scheduler_type", "linear", "--warmup_steps", "1"]
    full, part = root / "resume_full", root / "resume_part"
    run_self_distillation(*_parse([*opts, "--output_dir", str(full)]))
    run_self_distillation(*_parse([*opts, "--output_dir", str(part)]), callbacks=[StopAt(2)])
    assert (part / "checkpoint-2").is_dir() and not (part / "checkpoint-4").exists()
    shutil.rmtree(part / "model")  # as if the run had been killed after its step-2 checkpoint
    run_self_distillation(*_parse([*opts, "--output_dir", str(part), "--resume_from_checkpoint", "latest"]))
    la = [h["loss"] for h in _metrics(full / "model")["log_history"] if "loss" in h]
    lb = [h["loss"] for h in _metrics(part / "model")["log_history"] if "loss" in h]
    assert lb == pytest.approx(la, rel=1e-5)
    a, b = load_multi_exit(full / "model").state_dict(), load_multi_exit(part / "model").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k])
    with pytest.raises(ValueError, match="different configuration"):
        run_self_distillation(*_parse([*opts, "--output_dir", str(part), "--resume_from_checkpoint",
                                       str(part / "checkpoint-2"), "--alpha", "0.5"]))


@pytest.mark.parametrize("extra,message", [
    ([], "exactly one of --model_name_or_path"),
    (["--model_config", "MODEL", "--model_name_or_path", "tiny:llama"], "exactly one of"),
    (["--model_config", "MODEL", "--exit_variant", "concat"], "hints need per-block exits"),
    (["--model_config", "MODEL", "--exit_variant", "sideways"], "unknown --exit_variant"),
    (["--model_config", "MODEL", "--exit_layers", "7"], "out of range"),
    (["--model_config", "MODEL", "--exit_weights", "1", "2"], "one weight per exit"),
    (["--model_config", "MODEL", "--gradient_checkpointing", "true"], "not supported with exits"),
    (["--model_config", "MODEL", "--eval_strategy", "steps", "--eval_steps", "0.5"], "whole number"),
    (["--model_config", "MODEL", "--eval_strategy", "epoch"], "not supported here"),
    (["--model_config", "MODEL", "--exit_variant", "none", "--exit_layers", "9"], "out of range"),
    (["--model_config", "/nonexistent/config"], "does not exist"),
    (["--model_name_or_path", "tiny:llama"], "vocabulary is 256"),
])
def test_bad_input_is_one_line(setup, tmp_path, capsys, extra, message):
    extra = [str(setup["llama"]) if x == "MODEL" else x for x in extra]
    out = tmp_path / "bad"
    rc = main(["self-distill", *setup["common"], "--output_dir", str(out), "--max_steps", "1", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1
    assert not (out / "model").exists()


def test_refuses_an_existing_model_folder(setup, tmp_path, capsys):
    (tmp_path / "model").mkdir()
    rc = main(["self-distill", "--model_config", str(setup["llama"]), *setup["common"], "--output_dir",
               str(tmp_path), "--max_steps", "1"])
    assert rc == 2 and "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(setup):
    root = setup["root"]
    base = [a for a in setup["common"] if a not in ("--per_device_train_batch_size", "2")]
    opts = ["--model_config", str(setup["llama"]), *base, "--max_steps", "3", "--exit_variant", "separate",
            "--save_strategy", "no", "--gradient_accumulation_steps", "2", "--use_cpu", "true"]
    one = root / "ddp_one"
    assert main(["self-distill", *opts, "--per_device_train_batch_size", "2", "--output_dir", str(one)]) == 0
    two = root / "ddp_two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "bitdistill.cli.main", "self-distill", *opts, "--per_device_train_batch_size", "1",
           "--ddp_backend", "gloo", "--output_dir", str(two)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    la = [h["loss"] for h in _metrics(one / "model")["log_history"] if "loss" in h]
    lb = [h["loss"] for h in _metrics(two / "model")["log_history"] if "loss" in h]
    assert len(la) == 3 and lb == pytest.approx(la, rel=1e-4)
    a, b = load_multi_exit(one / "model").state_dict(), load_multi_exit(two / "model").state_dict()
    # One process's batch-2 GEMMs and two processes' batch-1 GEMMs sum in different orders (on CPUs with AMX the
    # kernels differ too), and Adam's update of an element whose gradient is near zero amplifies that rounding: one
    # element of 3.2M was 1.8e-5 off on 2026-12-04, against updates of up to the lr (3e-3) per step.
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4)


def test_plain_mode_gradient_accumulation_matches_a_larger_batch_and_card_has_no_secret(setup, tmp_path):
    base = [a for a in setup["common"] if a not in ("--per_device_train_batch_size", "2")]
    opts = ["--model_config", str(setup["llama"]), *base, "--max_steps", "2", "--exit_variant", "none",
            "--save_strategy", "no"]
    assert main(["self-distill", *opts, "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path / "a")]) == 0
    assert main(["self-distill", *opts, "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2",
                 "--hub_token", "hf_do_not_leak", "--output_dir", str(tmp_path / "b")]) == 0
    la = [h["loss"] for h in _metrics(tmp_path / "a" / "model")["log_history"] if "loss" in h]
    lb = [h["loss"] for h in _metrics(tmp_path / "b" / "model")["log_history"] if "loss" in h]
    assert len(la) == 2 and lb == pytest.approx(la, rel=1e-4)
    for f in (tmp_path / "b").rglob("*"):
        if f.is_file() and f.suffix in (".md", ".json", ".jsonl"):
            assert "hf_do_not_leak" not in f.read_text(), f


def test_tiny_model_runs_without_a_tokenizer_of_its_own(setup, tmp_path, monkeypatch):
    """`tiny:<arch>` models get the byte-level tiny tokenizer (256 ids = their vocabulary); TensorBoard scalars,
    the start evaluation's included, land in the output folder, not in ./runs."""
    from transformers import AutoTokenizer

    root = setup["root"]
    monkeypatch.chdir(tmp_path)
    out = root / "run_tiny"
    rc = main(["self-distill", "--model_name_or_path", "tiny:llama", *setup["common"][2:], "--output_dir", str(out),
               "--max_steps", "2", "--save_strategy", "no", "--eval_files", str(root / "test.txt"),
               "--eval_max_windows", "2", "--report_to", "tensorboard"])
    assert rc == 0
    assert len(AutoTokenizer.from_pretrained(out / "model")) == 256
    assert _metrics(out / "model")["start"]
    assert list(out.glob("runs/*/events.out.tfevents.*")) and not (tmp_path / "runs").exists()


def test_budgeted_self_distill_spends_the_budget_on_the_planned_steps(setup, capsys):
    """``--time_budget``: the schedule fit to the planned steps, the plan in the progress bar, the logs, the metrics
    and the card; what a budget cannot do is refused in one line before any work."""
    import re

    root = setup["root"]
    common = ["self-distill", "--model_config", str(setup["llama"]), *setup["common"], "--save_strategy", "no"]
    out = root / "budget"
    assert main([*common, "--time_budget", "6s", "--disable_tqdm", "false", "--output_dir", str(out)]) == 0
    captured = capsys.readouterr()
    train = _metrics(out / "model")["train"]
    steps, planned = train["train_steps"], train["planned_steps"]
    assert train["budget_cpu_s"] == 6.0 and 4.0 <= train["train_cpu_s"] < 8.0, train
    assert planned is not None and 0.7 * planned <= steps <= planned, train
    totals = {int(t) for t in re.findall(r"\d+/(\d+) \[", captured.err)}  # tqdm's "step/total [elapsed<left"
    assert planned in totals and max(totals) < 1000, totals
    assert "'planned_steps': " in captured.out and "'cpu_s_left': " in captured.out
    assert f"{planned} steps planned" in (out / "model" / "README.md").read_text()
    for flags, match in ((["--time_budget", "10x"], "is not a CPU time"),
                         (["--time_budget", "5s", "--max_steps", "3"], "drop --max_steps")):
        bad = root / "budget-bad"
        assert main([*common, *flags, "--output_dir", str(bad)]) == 2
        err = capsys.readouterr().err
        assert match in err and len([line for line in err.splitlines() if "error:" in line]) == 1, err
        assert not bad.exists()
