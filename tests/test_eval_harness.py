"""``bitdistill eval`` / ``evaluate_tasks`` through lm-eval on tiny models, and the offline ``wikitext_lastword`` task."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bitdistill import evaluate_tasks, load_for_eval
from bitdistill.cli.main import main
from bitdistill.convert import convert_pretrained
from bitdistill.eval.lastword import MIN_CONTEXT_WORDS, lastword_examples, lastword_jsonl
from bitdistill.models import tiny_config

TASK = "wikitext_lastword"
LIMIT = 6
needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval not installed (pip install 'bitdistill[eval]')")


@pytest.fixture(autouse=True)
def _cache_and_data(tmp_path_factory, monkeypatch, shared_data):
    monkeypatch.setenv("BITDISTILL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("BITDISTILL_WIKITEXT_DIR", str(shared_data / "wikitext-2-raw-v1"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory, shared_data) -> dict[str, Path]:
    """A tiny Llama with the GPT-2 vocabulary and tokenizer, its BitNet student and the packed student."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    root = tmp_path_factory.mktemp("models")
    tok = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "gpt2")
    cfg = tiny_config("llama")
    cfg.vocab_size = len(tok)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    convert_pretrained(root / "teacher", root / "student")
    assert main(["pack", str(root / "student"), str(root / "packed"), "--dtype", "float32"]) == 0
    return {"teacher": root / "teacher", "student": root / "student", "packed": root / "packed"}


def _eval(folder: Path, capsys, *extra: str) -> dict[str, float]:
    out = folder.parent / f"{folder.name}-{len(extra)}.json"
    assert main(["eval", str(folder), "--tasks", TASK, "--limit", str(LIMIT), "--output", str(out), *extra]) == 0
    printed = capsys.readouterr().out
    assert TASK in printed and "acc" in printed
    return json.loads(out.read_text())


def _check(metrics: dict[str, float]) -> None:
    assert 0.0 <= metrics["acc"] <= 1.0
    assert math.isfinite(metrics["perplexity"]) and metrics["perplexity"] > 1.0
    assert metrics["sample_len"] == LIMIT


@needs_lm_eval
def test_eval_teacher_student_packed(folders, capsys):
    results = {name: _eval(path, capsys) for name, path in folders.items()}
    assert {name: r["kind"] for name, r in results.items()} == {
        "teacher": "full-precision", "student": "student", "packed": "packed"}
    for r in results.values():
        _check(r["results"][TASK])
    assert results["student"]["results"] == results["packed"]["results"]


@needs_lm_eval
def test_evaluate_tasks_api_matches_cli_and_restores_mode(folders, capsys):
    model, tok, kind = load_for_eval(folders["student"])
    assert kind == "student"
    model.train()
    assert tok.pad_token is None
    api = evaluate_tasks(model, tok, [TASK], limit=LIMIT, batch_size=2)
    assert model.training and tok.pad_token is None
    cli = _eval(folders["student"], capsys, "--batch_size", "3")["results"]
    assert api[TASK].keys() == cli[TASK].keys()
    for name, value in api[TASK].items():
        assert value == pytest.approx(cli[TASK][name], rel=1e-4)


def _independent_examples(text: str) -> list[dict[str, str]]:
    """The documented rule, written differently: a regex over each line's tokens from the right."""
    out = []
    for line in re.split("\n", text):
        if not line.strip() or line.lstrip().startswith("="):
            continue
        tokens = re.findall(r"\S+", line)
        ends = [i for i, t in enumerate(tokens) if re.search(r"[^\W_]", t)]
        if not ends:
            continue
        last = ends[-1]
        if re.fullmatch(r"[^\W\d_]+", tokens[last]) and last >= MIN_CONTEXT_WORDS:
            out.append({"context": " ".join(tokens[:last]), "target": " " + tokens[last]})
    return out


def test_lastword_examples_follow_the_rule(shared_data, tmp_path):
    text = (shared_data / "wikitext-2-raw-v1" / "wiki.test.raw").read_text(encoding="utf-8")
    examples = lastword_examples(text)
    assert examples == _independent_examples(text)
    assert len(examples) > 1000
    path = lastword_jsonl(shared_data / "wikitext-2-raw-v1", cache_dir=tmp_path)
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == examples
    assert lastword_jsonl(shared_data / "wikitext-2-raw-v1", cache_dir=tmp_path) == path


def test_lastword_rule_on_handmade_lines():
    words = " ".join(f"w{i}" for i in range(MIN_CONTEXT_WORDS))
    text = "\n".join([
        " = Heading = ",
        f" {words} Paris . \" ",      # trailing punctuation dropped: target Paris
        f" {words} 1990 . ",          # number: skipped
        f" {words} Smith 's . ",      # 's: skipped
        " too short sentence . ",     # too few words
        f" {words} @-@ end ) ",       # @-@ stays in the context
    ])
    assert lastword_examples(text) == [
        {"context": words, "target": " Paris"},
        {"context": words + " @-@", "target": " end"},
    ]


def _fail(argv: list[str], capsys) -> str:
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    return err


@needs_lm_eval
def test_unknown_task_says_how_to_list(folders, capsys):
    err = _fail(["eval", str(folders["teacher"]), "--tasks", f"{TASK},hellaswagg"], capsys)
    assert "hellaswagg" in err and "hellaswag" in err.split("close:")[1] and "--list_tasks" in err


def test_missing_lm_eval_names_the_extra(folders, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    err = _fail(["eval", str(folders["teacher"]), "--tasks", TASK], capsys)
    assert "pip install 'bitdistill[eval]'" in err


@needs_lm_eval
def test_output_is_never_overwritten_without_flag(folders, capsys, tmp_path):
    out = tmp_path / "r.json"
    out.write_text("keep")
    err = _fail(["eval", str(folders["teacher"]), "--tasks", TASK, "--output", str(out)], capsys)
    assert "--overwrite" in err and out.read_text() == "keep"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


@needs_lm_eval
def test_bad_inputs_are_one_line(folders, capsys, tmp_path):
    assert "no config.json" in _fail(["eval", str(tmp_path), "--tasks", TASK], capsys)
    assert "does not exist" in _fail(["eval", str(tmp_path / "missing"), "--tasks", TASK, "--gguf_file", "m.gguf"], capsys)
    assert "--tasks" in _fail(["eval", str(folders["teacher"])], capsys)
    teacher = ["eval", str(folders["teacher"]), "--tasks", TASK]
    assert "--limit must be > 0" in _fail([*teacher, "--limit", "0"], capsys)
    assert "--num_fewshot must be >= 0" in _fail([*teacher, "--num_fewshot", "-1"], capsys)
    assert "not a torch device" in _fail([*teacher, "--device", "gpu0"], capsys)
    err = _fail(["eval", str(folders["teacher"]), "--tasks", TASK, "--data_dir", str(tmp_path)], capsys)
    assert "wiki.test.raw" in err and "--data_dir" in err
    assert "--limit" in _fail(["eval", str(folders["teacher"]), "--tasks", TASK, "--limit", "2.5"], capsys)


def test_import_bitdistill_does_not_import_lm_eval():
    code = "import sys, bitdistill, bitdistill.eval; print(sorted(m for m in sys.modules if m.startswith('lm_eval')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


@needs_lm_eval
def test_distill_eval_tasks_go_into_metrics_and_card(folders, tmp_path, shared_data):
    train = tmp_path / "train.txt"
    train.write_text((shared_data / "wikitext-2-raw-v1" / "wiki.train.prefix.raw").read_text()[:3000])
    out = tmp_path / "run"
    assert main(["distill", "--teacher_model_name_or_path", str(folders["teacher"]), "--train_files", str(train),
                 "--max_seq_length", "32", "--per_device_train_batch_size", "2", "--max_steps", "2",
                 "--data_cache_dir", str(tmp_path / "cache"), "--report_to", "none", "--disable_tqdm", "true",
                 "--eval_tasks", TASK, "--eval_tasks_limit", str(LIMIT), "--output_dir", str(out)]) == 0
    metrics = json.loads((out / "student" / "distill_metrics.json").read_text())
    tasks = metrics["tasks"]
    assert set(tasks) == {"teacher", "student", "packed"}
    for r in tasks.values():
        _check(r[TASK])
    assert tasks["student"] == tasks["packed"]  # packed inference is bit-identical to the student on CPU
    card = (out / "student" / "README.md").read_text()
    assert TASK in card and f"{tasks['teacher'][TASK]['acc']:.4g}" in card
    assert json.loads((out / "provenance.json").read_text())["args"]["eval_tasks"]["eval_tasks"] == [TASK]


@needs_lm_eval
def test_distill_refuses_unknown_eval_tasks_before_loading_anything(folders, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["distill", "--teacher_model_name_or_path", str(folders["teacher"]), "--train_files", "missing.txt",
               "--eval_tasks", "wikitext_lastwrd", "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "wikitext_lastword" in err and "--list_tasks" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
