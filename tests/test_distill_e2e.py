"""End-to-end tests of `bitdistill distill` / `cache-teacher` on a tiny Llama with the GPT-2 tokenizer.

The tiny teacher has the tokenizer's vocabulary (50,257) so WikiText-2 text from ``../shared/data``
can be used as is. The resume and distributed tests are ``slow``; CI runs them with
``pytest -m slow tests/test_distill_e2e.py``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_utils import StopAt, free_port, parse_cli, tiny_gpt2_vocab_folder

from bitdistill import load_student
from bitdistill.cli.main import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("distill")
    tok = shared_data / "tokenizers" / "gpt2"
    wiki = shared_data / "wikitext-2-raw-v1"
    (root / "train.txt").write_text((wiki / "wiki.train.prefix.raw").read_text()[:6000])
    (root / "test.txt").write_text((wiki / "wiki.test.raw").read_text()[:4000])
    return {"root": root, "teacher": tiny_gpt2_vocab_folder(root / "teacher", "llama", tok), "tok": tok,
            "common": ["--teacher_model_name_or_path", str(root / "teacher"), "--train_files", str(root / "train.txt"),
                       "--max_seq_length", "32", "--per_device_train_batch_size", "2", "--logging_steps", "1",
                       "--data_cache_dir", str(root / "cache"), "--seed", "0", "--disable_tqdm", "true"]}


def _losses(output_dir: Path, step: int) -> dict[int, float]:
    state = json.loads((output_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def test_cli_end_to_end(setup, capsys, tmp_path, monkeypatch):
    root = setup["root"]
    monkeypatch.chdir(tmp_path)  # TensorBoard scalars (the start evaluation's included) go to OUT, not ./runs
    out = root / "run"
    rc = main(["distill", *setup["common"], "--eval_files", str(root / "test.txt"), "--eval_max_windows", "3",
               "--output_dir", str(out), "--max_steps", "3", "--save_steps", "2", "--eval_strategy", "steps",
               "--eval_steps", "2", "--report_to", "tensorboard", "--ce_weight", "0.5", "--hidden_weight", "1",
               "--hidden_layer_map", "uniform+last", "--attention_weight", "1", "--attention_relation_heads", "4",
               "--subln", "true", "--quant_warmup_steps", "2", "--temperature", "2.0"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    for line in ("teacher perplexity: ", "student perplexity before training: ", "student perplexity after training: ",
                 "packed student perplexity: ", "loading the teacher "):
        assert f"[bitdistill distill] {line}" in captured.out, line
    student_dir = out / "student"
    # checkpoints on the --save_steps schedule only: none for the last step (3), the student folder is the result
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert (out / "checkpoint-2" / "distill_config.json").is_file()
    assert len({p.parent for p in out.glob("runs/*/events.out.tfevents.*")} - {out / "runs" / "audit"}) == 1
    assert not (tmp_path / "runs").exists()
    metrics = json.loads((student_dir / "distill_metrics.json").read_text())
    assert math.isfinite(metrics["student_end"]["final_perplexity"])
    assert math.isfinite(metrics["teacher"]["perplexity"])
    card = (student_dir / "README.md").read_text()
    assert "--hidden_weight 1" in card and "| teacher |" in card
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    logged = [h for h in state["log_history"] if "loss" in h]
    assert {"loss_ce", "loss_logits", "loss_hidden", "loss_attention"} <= set(logged[0])
    student = load_student(student_dir)
    assert student.config.bitdistill["subln_modules"]
    with torch.no_grad():
        assert torch.isfinite(student(input_ids=torch.randint(0, 50257, (1, 8))).logits).all()

    # resuming with a different configuration is refused, naming the difference
    rc = main(["distill", *setup["common"], "--output_dir", str(out), "--max_steps", "3", "--temperature", "1.0",
               "--resume_from_checkpoint", str(out / "checkpoint-2")])
    err = capsys.readouterr().err
    assert rc == 2 and "different configuration" in err and "temperature" in err


def test_bad_inputs(setup, capsys, tmp_path):
    _root, common = setup["root"], setup["common"]

    def fails(*extra, match):
        rc = main(["distill", *common, "--output_dir", str(tmp_path / "o"), "--max_steps", "1", *extra])
        err = capsys.readouterr().err
        assert rc == 2 and match in err, err

    fails("--max_seq_length", "256", match="exceeds the teacher's context of 128")
    fails("--student_model_name_or_path", "tiny:llama", match="different vocabularies")
    fails("--hidden_weight", "1", "--hidden_layer_map", "1:7", match="teacher hidden state 7")
    fails("--attention_weight", "1", "--attention_layers", "4", match="attention layer 4 does not exist")
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    fails("--train_files", str(short), match="fewer than one block")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    fails("--train_files", str(empty), match="is empty")
    gpt2 = tiny_gpt2_vocab_folder(tmp_path / "gpt2", "gpt2", setup["tok"])
    fails("--teacher_model_name_or_path", str(gpt2), "--subln", "true", match="does not apply to 'gpt2'")
    gguf_only = tmp_path / "gguf_only"
    gguf_only.mkdir()
    (gguf_only / "m.Q4_1.gguf").write_bytes(b"GGUF")
    for tokenizer in ([], ["--tokenizer_name_or_path", str(setup["tok"])]):  # tokenizer and teacher loading
        fails("--teacher_model_name_or_path", str(gguf_only), *tokenizer,
              match="holds the GGUF file m.Q4_1.gguf; pass --teacher_gguf_file m.Q4_1.gguf")


def test_teacher_cache_cli_trains_without_teacher(setup, capsys):
    root, common = setup["root"], setup["common"]
    rc = main(["cache-teacher", *[a for a in common if a not in ("--per_device_train_batch_size", "2", "--logging_steps",
                                                                 "1", "--seed", "0", "--disable_tqdm", "true")],
               "--max_train_blocks", "6", "--cache_dir", str(root / "tcache"), "--top_k", "16"])
    assert rc == 0, capsys.readouterr().err
    rc = main(["distill", "--teacher_cache", str(root / "tcache"), "--tokenizer_name_or_path", str(root / "teacher"),
               "--student_model_name_or_path", str(root / "teacher"), "--train_files", str(root / "train.txt"),
               "--max_seq_length", "32", "--max_train_blocks", "6", "--data_cache_dir", str(root / "cache"),
               "--output_dir", str(root / "cached_run"), "--max_steps", "2", "--per_device_train_batch_size", "2",
               "--disable_tqdm", "true", "--attention_weight", "0", "--hidden_weight", "0"])
    assert rc == 0, capsys.readouterr().err
    assert (root / "cached_run" / "student" / "model.safetensors").is_file()
    rc = main(["distill", "--teacher_cache", str(root / "tcache"), "--tokenizer_name_or_path", str(root / "teacher"),
               "--student_model_name_or_path", str(root / "teacher"), "--train_files", str(root / "train.txt"),
               "--max_seq_length", "32", "--data_cache_dir", str(root / "cache"),
               "--output_dir", str(root / "cached_run2"), "--max_steps", "1", "--attention_weight", "0",
               "--hidden_weight", "0"])
    assert rc == 2 and "different training data" in capsys.readouterr().err


def test_config_file_and_flag_override(setup, tmp_path):
    from bitdistill.cli.distill import _types
    from bitdistill.cli.hfargs import parse_dataclasses
    from bitdistill.cli.main import build_parser

    cfg = tmp_path / "c.yaml"
    cfg.write_text("temperature: 3.0\nlogits_loss: jsd\nmax_seq_length: 64\noutput_dir: /tmp/x\n")
    args = build_parser().parse_args(["distill", "--config", str(cfg), "--max_seq_length", "16"])
    _model_args, data_args, loss_args, training_args, _tasks = parse_dataclasses(args, _types())
    assert loss_args.temperature == 3.0 and loss_args.logits_loss == "jsd"
    assert data_args.max_seq_length == 16 and training_args.output_dir == "/tmp/x"


def _parse(argv):
    return parse_cli("distill", argv)


@pytest.mark.slow
def test_resume_continues_with_same_data_order_optimizer_and_scheduler(setup):
    from bitdistill.distill.run import run_distillation

    root, common = setup["root"], setup["common"]
    opts = [*common, "--max_steps", "4", "--save_steps", "2", "--learning_rate", "1e-3", "--lr_scheduler_type",
            "linear", "--warmup_steps", "1", "--quant_warmup_steps", "3", "--ce_weight", "0.3"]
    full = root / "full"
    run_distillation(*_parse([*opts, "--output_dir", str(full)]))
    part = root / "part"
    run_distillation(*_parse([*opts, "--output_dir", str(part)]), callbacks=[StopAt(2)])
    assert (part / "checkpoint-2").is_dir() and not (part / "checkpoint-4").exists()
    shutil.rmtree(part / "student")  # as if the run had been killed after its step-2 checkpoint
    run_distillation(*_parse([*opts, "--output_dir", str(part), "--resume_from_checkpoint", "latest"]))
    a, b = _losses(full, 4), _losses(part, 4)
    assert sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], rel=1e-5)
    sa = load_student(full / "student").state_dict()
    sb = load_student(part / "student").state_dict()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k])


def _one_vs_two_processes(setup, name: str, device_opts: list[str], parallel_opts: list[str], rel: float) -> None:
    """Train 3 steps in one process (batch 2) and in two (batch 1 each, ``parallel_opts``); same losses, same student."""
    root, common = setup["root"], setup["common"]
    base = [a for a in common if a not in ("--per_device_train_batch_size", "2")]
    opts = [*base, "--max_steps", "3", "--learning_rate", "1e-3", "--ce_weight", "0.5", "--save_steps", "3",
            "--gradient_accumulation_steps", "2", *device_opts]
    one = root / f"{name}-one"
    assert main(["distill", *opts, "--per_device_train_batch_size", "2", "--output_dir", str(one)]) == 0
    two = root / f"{name}-two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "bitdistill.cli.main", "distill", *opts, "--per_device_train_batch_size", "1", *parallel_opts,
           "--output_dir", str(two)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 2 processes" in (two / "student" / "README.md").read_text()
    a, b = _losses(one, 3), _losses(two, 3)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=rel)
    sa = load_student(one / "student").state_dict()
    sb = load_student(two / "student").state_dict()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=rel, atol=1e-5)


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(setup):
    _one_vs_two_processes(setup, "ddp", ["--use_cpu", "true"], ["--ddp_backend", "gloo"], rel=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP through the Trainer needs 2 CUDA devices: "
                    "accelerate turns FSDP on only for GPU-type distributed runs, never for CPU (gloo) ones")
def test_fsdp_two_gpus_match_one_process(setup):
    """The Trainer's FSDP path with BitLinear: ``pytest -m gpu tests/test_distill_e2e.py -k fsdp`` (2+ GPUs)."""
    _one_vs_two_processes(setup, "fsdp", ["--tf32", "false"],
                          ["--fsdp", "full_shard"], rel=1e-3)
