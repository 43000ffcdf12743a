"""``bitdistill plan``: parameter counts of published configs, the plans, bad input, and the estimate against the
peak live tensor bytes of real CPU steps on shapes the constants were not fitted to."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from run_utils import load_benchmark

from bitdistill.cli.main import main
from bitdistill.errors import UserError
from bitdistill.live_memory import LiveTensorBytes
from bitdistill.plan import GB, Options, estimate_memory, model_shape, plan, read_teacher_config

# Published config.json values (the fields the architecture reads), written out so the tests need no network.
PUBLISHED = {
    "phi-3-mini": ({"model_type": "phi3", "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192,
                    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                    "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000}, 3.821e9),
    "Qwen2.5-0.5B": ({"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                      "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                      "max_position_embeddings": 32768, "tie_word_embeddings": True}, 0.494e9),
    "Qwen2.5-1.5B": ({"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
                      "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                      "max_position_embeddings": 131072, "tie_word_embeddings": True}, 1.544e9),
    "Qwen2.5-7B": ({"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                    "max_position_embeddings": 131072, "tie_word_embeddings": False}, 7.616e9),
}


def _write(tmp_path, name: str):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(PUBLISHED[name][0]))
    return path


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_configs_count_their_parameters(tmp_path, name):
    shape = model_shape(read_teacher_config(_write(tmp_path, name)))
    assert shape.params == pytest.approx(PUBLISHED[name][1], rel=0.005)
    assert 0 < shape.linear_params < shape.params
    assert shape.linear_params + shape.embed_head_params < shape.params  # norms are the rest
    assert shape.layers == PUBLISHED[name][0]["num_hidden_layers"]


def test_phi3_mini_plans(tmp_path, capsys):
    cfg = _write(tmp_path, "phi-3-mini")
    p24 = plan(cfg, gpus=1, gpu_gb=24)
    assert not p24.fits
    line = p24.shortfall()
    assert "\n" not in line and "GB more than" in line and "latent weights, gradients and optimizer" in line
    p80 = plan(cfg, gpus=1, gpu_gb=80)
    assert p80.fits and p80.recommended_estimate.total <= p80.usable_bytes
    assert p80.asked_estimate.total > p80.usable_bytes  # as asked it would not fit; the plan found options
    p8 = plan(cfg, gpus=8, gpu_gb=80)
    assert p8.fits and p8.recommended.fsdp
    assert p8.recommended_estimate.latent_weights == pytest.approx(4 * p8.shape.params / 8)
    # the CLI: exit 2 and one line on stderr when nothing fits, 0 and the table otherwise
    assert main(["plan", str(cfg), "--gpus", "1", "--gpu_memory_gb", "24"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "does not fit" in captured.err
    assert main(["plan", str(cfg), "--gpus", "8", "--gpu_memory_gb", "80", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["recommended"]["fsdp"] is True


def test_estimate_terms_follow_the_options(tmp_path):
    shape = model_shape(read_teacher_config(_write(tmp_path, "Qwen2.5-1.5B")))
    base = Options(gpus=4, micro_batch=4, seq_len=1024)
    one = estimate_memory(shape, base)
    sharded = estimate_memory(shape, replace(base, fsdp=True))
    assert sharded.latent_weights * 4 == pytest.approx(one.latent_weights) and sharded.gathered_weights > 0
    assert estimate_memory(shape, replace(base, optimizer="adamw_8bit")).optimizer * 4 == pytest.approx(one.optimizer)
    assert estimate_memory(shape, replace(base, teacher="cache")).teacher == 0
    assert estimate_memory(shape, replace(base, teacher="int8")).teacher < one.teacher
    assert estimate_memory(shape, replace(base, gradient_checkpointing=True)).activations < one.activations
    assert estimate_memory(shape, replace(base, micro_batch=2)).activations < one.activations


@pytest.mark.parametrize("args, match", [
    (dict(gpus=0, gpu_gb=80), "--gpus"),
    (dict(gpus=1, gpu_gb=-1), "--gpu_memory_gb"),
    (dict(gpus=1, gpu_gb=80, teacher_dtype="fp8"), "--teacher_dtype"),
    (dict(gpus=1, gpu_gb=80, fsdp=True), "--fsdp needs"),
])
def test_bad_input_is_one_line(tmp_path, args, match):
    with pytest.raises(UserError, match=match) as err:
        plan(_write(tmp_path, "Qwen2.5-0.5B"), **args)
    assert "\n" not in str(err.value)


def test_unreadable_teacher_is_one_line(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    assert main(["plan", str(bad), "--gpu_memory_gb", "24"]) == 2
    assert "cannot read the teacher config" in capsys.readouterr().err
    bad.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(UserError, match="model_type"):
        read_teacher_config(bad)


def test_live_tensor_bytes_counts_storages_once_and_frees():
    a = torch.zeros(1000)
    with LiveTensorBytes([a, a[:10]]) as live:
        assert live.current == 4000
        b = torch.ones(500, dtype=torch.float64)
        c = b * 2
        assert live.current == 4000 + 2 * 4000
        del b, c
        d = a + 1  # the frees are seen at the next op
        assert live.current == 8000 and live.peak == 12000
        del d


@pytest.mark.parametrize("arch, hidden, inter, layers, vocab, seq, batch", [
    ("qwen2", 96, 288, 3, 3000, 48, 3),  # shapes and architectures the constants were not fitted to
    ("phi3", 80, 240, 2, 1500, 96, 2),
])
def test_estimate_within_15_percent_of_measured_peak(arch, hidden, inter, layers, vocab, seq, batch):
    bench = load_benchmark("bench_plan_memory")
    torch.set_num_threads(1)
    cfg = bench.config_for(arch, hidden, inter, layers, vocab, seq)
    measured = bench.measure(cfg, batch, seq)
    estimated = bench.estimate(cfg, batch, seq)
    assert abs(estimated - measured) <= 0.15 * measured, (estimated / GB, measured / GB)


def test_docs_show_what_plan_prints_now(monkeypatch, capsys):
    """docs/fsdp.md's phi-3-mini plans are this code's output, character for character."""
    import re
    import shlex
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # the documented commands use the repository-relative config path
    block = re.search(r"```text\n(.*?)```", (root / "docs" / "fsdp.md").read_text(), re.S).group(1)
    shown = [c for c in block.split("$ bitdistill ")[1:]]
    assert len(shown) == 3
    for chunk in shown:
        command, _, expected = chunk.partition("\n")
        rc = main(shlex.split(command))
        out = capsys.readouterr()
        printed = out.out + out.err + (f"(exit status {rc})\n" if rc else "")
        assert printed.strip() == expected.strip(), command


@pytest.mark.parametrize("name, gpus, gpu_gb, fits", [
    ("Qwen2.5-0.5B", 1, 24, True), ("Qwen2.5-1.5B", 1, 24, True), ("Qwen2.5-7B", 1, 80, False),
    ("Qwen2.5-7B", 8, 80, True), ("phi-3-mini", 4, 24, True),
])
def test_plans_for_the_published_models(tmp_path, name, gpus, gpu_gb, fits):
    p = plan(_write(tmp_path, name), gpus=gpus, gpu_gb=gpu_gb)
    assert p.fits is fits
    if fits:
        assert p.recommended_estimate.total <= p.usable_bytes < p.asked_estimate.total  # the options were needed
        assert p.recommended.fsdp == (gpus > 1 and p.shape.params > 3e9)
    else:
        assert p.smallest_estimate.total > p.usable_bytes and "GB more than" in p.shortfall()
