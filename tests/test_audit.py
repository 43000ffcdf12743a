"""The generic run-audit pieces: AuditCallback on a plain Trainer, provenance, the model card builder, the data cache."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, Trainer, TrainingArguments

from bitdistill.audit import AuditCallback, provenance, redact_args, redact_command, write_provenance
from bitdistill.data.blocks import BlockDataset, load_text, token_blocks
from bitdistill.distill.card import metric_rows, model_card
from bitdistill.models import tiny_model

REPO = Path(__file__).resolve().parents[1]


def test_audit_callback_on_a_plain_trainer(tmp_path):
    blocks = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, logging_steps=1,
                             eval_strategy="steps", eval_steps=2, report_to="none", save_strategy="no",
                             include_num_input_tokens_seen=True, disable_tqdm=True, use_cpu=True)
    trainer = Trainer(model=tiny_model("llama").train(), args=args, train_dataset=BlockDataset(blocks[:6]),
                      eval_dataset=BlockDataset(blocks[6:]), callbacks=[AuditCallback()])
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "audit_log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records] == ["train_begin", "train", "train", "evaluate"]
    for r in records[1:3]:
        assert r["tokens"] == 2 * 16 and r["tokens_per_s"] > 0 and r["step_time_s"] > 0 and r["peak_memory_mb"] > 0
    ev = records[-1]
    assert ev["step"] == 2 and ev["eval_time_s"] > 0 and "eval_loss" in ev["metrics"]


def test_redaction():
    args = {"hub_token": "x", "model": {"teacher": "t", "api_secret": "y", "nested": {"db_password": "z", "k": 1}},
            "lr": 1e-3, "tokenizer_name_or_path": "tok", "include_num_input_tokens_seen": True}
    assert redact_args(args) == {"model": {"teacher": "t", "nested": {"k": 1}}, "lr": 1e-3,
                                 "tokenizer_name_or_path": "tok", "include_num_input_tokens_seen": True}
    cmd = ("bitdistill distill --hub_token hf_abc --lr 1 --my_secret=s3 --x a b --push_to_hub_token t --y "
           "--tokenizer_name_or_path tok")
    assert redact_command(cmd) == "bitdistill distill --lr 1 --x a b --y --tokenizer_name_or_path tok"


def test_write_provenance_atomic_and_never_overwrites(tmp_path):
    out = write_provenance(tmp_path / "run", {"training": {"hub_token": "secret", "seed": 3}}, "bitdistill x --seed 3")
    prov = json.loads(out.read_text())
    assert prov["args"] == {"training": {"seed": 3}} and prov["command"] == "bitdistill x --seed 3"
    assert prov["torch"] == torch.__version__ and prov["device"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert prov["git_commit"].split("-")[0] == (head or "unknown")
    assert sorted(p.name for p in out.parent.iterdir()) == ["provenance.json"]
    with pytest.raises(FileExistsError):
        write_provenance(tmp_path / "run", {}, None)
    assert provenance({}, None)["command"] is None


def test_model_card_with_task_results_parses_as_a_hub_card():
    from huggingface_hub import ModelCard

    metrics = {"teacher": {"perplexity": 20.0}, "student_start": {"start_perplexity": 900.0},
               "student_end": {"final_perplexity": 45.5}, "packed": {"perplexity": 45.51},
               "tasks": {"teacher": {"arc_easy": {"acc": 0.61, "acc_norm": 0.58}},
                         "student": {"arc_easy": {"acc": 0.41, "acc_norm": 0.39}, "piqa": {"acc": 0.6}},
                         "packed": {"arc_easy": {"acc": 0.41, "acc_norm": 0.39}}}}
    text = model_card(metrics, name="tiny-ternary", teacher="org/teacher", method="Distilled.", details=["d"],
                      eval_dataset="wiki.test.raw", command="bitdistill distill --x 1",
                      provenance={"git_commit": "abc", "args": {"seed": 0}}, base_model="org/teacher",
                      base_model_relation="quantized", datasets=["wikitext"])
    card = ModelCard(text)
    assert card.data.base_model == "org/teacher" and card.data.base_model_relation == "quantized"
    assert card.data.datasets == ["wikitext"] and "1.58-bit" in card.data.tags
    got = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert got == {("wiki.test.raw", "perplexity"): 45.5, ("arc_easy", "acc"): 0.41, ("arc_easy", "acc_norm"): 0.39,
                   ("piqa", "acc"): 0.6}
    assert "| arc_easy | acc | 0.61 | - | 0.41 | 0.41 |" in card.text
    assert "| piqa | acc | - | - | 0.6 | - |" in card.text
    assert "| wiki.test.raw | perplexity | 20 | 900 | 45.5 | 45.51 |" in card.text
    assert "bitdistill distill --x 1" in card.text and "abc" in card.text
    assert len(metric_rows(metrics)) == 4


def test_model_card_says_why_there_is_no_packed_column_and_rejects_unknown_models():
    metrics = {"student_end": {"final_perplexity": 50.0}, "packed": {"skipped": "SubLN student"}}
    text = model_card(metrics, name="n", teacher="t", method="m", details=[], eval_dataset="e", command=None)
    assert "packed student (not evaluated: SubLN student)" in text and "base_model" not in text
    with pytest.raises(ValueError, match="unknown model 'other'"):
        metric_rows({"tasks": {"other": {"t": {"acc": 1.0}}}})


def _tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def test_data_cache_is_reused_and_disk_use_does_not_grow(tmp_path, shared_data, monkeypatch):
    import bitdistill.data.blocks as blocks_module
    from bitdistill.data.args import DataArguments
    from bitdistill.runs import build_blocks

    tok = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "gpt2")
    text_file = shared_data / "wikitext-2-raw-v1" / "wiki.valid.raw"
    text = load_text([text_file])[:20000]
    cache = tmp_path / "cache"
    first = token_blocks(text, tok, 64, cache_dir=cache)
    after_first = _tree(cache)
    monkeypatch.setattr(blocks_module, "tokenize_text", lambda *a: pytest.fail("tokenized again"))
    reloaded = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "gpt2")  # as a re-run would
    second = token_blocks(text, reloaded, 64, cache_dir=cache)
    monkeypatch.undo()
    assert torch.equal(first, second) and _tree(cache) == after_first and len(after_first) == 1

    data_args = DataArguments(train_files=[str(text_file)], max_seq_length=128, data_cache_dir=str(cache))
    a = build_blocks(data_args, tok)
    after_build = _tree(cache)
    b = build_blocks(data_args, reloaded)
    assert torch.equal(a, b) and _tree(cache) == after_build and len(after_build) == 2


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "qwen2"])
def test_pack_in_memory_computes_the_student_function(arch):
    from bitdistill import PackedBitLinear, pack_in_memory, replace_linear_with_bitlinear

    student = tiny_model(arch)
    replace_linear_with_bitlinear(student)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    packed = pack_in_memory(student)
    assert any(isinstance(m, PackedBitLinear) for m in packed.modules())
    assert not any(p.requires_grad for n, p in packed.named_parameters() if "proj" in n or "dense" in n)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(packed(input_ids=ids).logits, student(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())


def test_pack_in_memory_says_why_not():
    from bitdistill import pack_in_memory, replace_linear_with_bitlinear

    mixed = tiny_model("llama")  # in-layer norms of two eps values: no packed form holds them
    replace_linear_with_bitlinear(mixed)
    from bitdistill.nn.bitlinear import BitRMSNorm

    mixed.model.layers[0].self_attn.o_proj.rms_norm = BitRMSNorm(64, 1e-6)
    mixed.model.layers[0].mlp.down_proj.rms_norm = BitRMSNorm(128, 1e-5)
    with pytest.raises(ValueError, match="different eps values"):
        pack_in_memory(mixed)
