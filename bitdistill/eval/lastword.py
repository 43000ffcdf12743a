"""``wikitext_lastword``: a LAMBADA-style last-word task built offline from WikiText-2's ``wiki.test.raw``.

How an example is built (the whole rule; ``docs/eval.md`` says the same):

1. Read ``wiki.test.raw`` (UTF-8) and split it into lines. Each non-blank line that does not start
   with ``=`` (after stripping surrounding whitespace) is one paragraph; ``= Heading =`` lines are skipped.
2. Split the paragraph on whitespace into tokens (WikiText is already tokenized: punctuation stands
   alone, e.g. ``... the film .``).
3. Drop trailing tokens that contain no letter or digit (``.``, ``"``, ``)``, ``@-@``, ...).
4. The last remaining token is the target word. Keep the paragraph only if the target is purely
   alphabetic (``str.isalpha()``; numbers, ``'s`` and hyphenated tokens are skipped) and at least
   :data:`MIN_CONTEXT_WORDS` tokens precede it.
5. ``context`` = the preceding tokens joined by single spaces; ``target`` = ``" " + word``.

Examples keep file order, so lm-eval's ``limit=N`` takes the first N paragraphs. The model is scored
like lm-eval's ``lambada_openai``: ``acc`` = the target is the model's greedy continuation of the
context, ``perplexity`` = ``exp(-mean log p(target | context))`` over examples.

The examples are cached as JSONL (one ``{"context", "target"}`` object a line) in
``$BITDISTILL_CACHE_DIR`` (default ``~/.cache/bitdistill``), named by the SHA-256 of the source file
and the rule version, and written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from bitdistill.errors import UserError
from bitdistill.io import atomic_write

__all__ = [
    "MIN_CONTEXT_WORDS",
    "TASK_DIR",
    "TASK_NAME",
    "WIKITEXT_ENV",
    "lastword_examples",
    "lastword_jsonl",
    "load_lastword_dataset",
    "resolve_wikitext_file",
]

TASK_NAME = "wikitext_lastword"
TASK_DIR = Path(__file__).resolve().parent / "tasks"
WIKITEXT_ENV = "BITDISTILL_WIKITEXT_DIR"
TEST_FILE = "wiki.test.raw"
MIN_CONTEXT_WORDS = 30
_RULE_VERSION = 1
METADATA_KEY = "bitdistill_wikitext_dir"


def lastword_examples(text: str, *, min_context_words: int = MIN_CONTEXT_WORDS) -> list[dict[str, str]]:
    """The ``{"context", "target"}`` examples of ``text`` (the raw WikiText file) under the module's rule."""
    examples = []
    for line in text.split("\n"):
        paragraph = line.strip()
        if not paragraph or paragraph.startswith("="):
            continue
        words = paragraph.split()
        while words and not any(c.isalnum() for c in words[-1]):
            words.pop()
        if len(words) <= min_context_words or not words[-1].isalpha():
            continue
        examples.append({"context": " ".join(words[:-1]), "target": " " + words[-1]})
    return examples


def resolve_wikitext_file(data_dir: str | os.PathLike | None = None) -> Path:
    """``wiki.test.raw`` in ``data_dir``, else ``$BITDISTILL_WIKITEXT_DIR``, else ``../shared/data/wikitext-2-raw-v1``.

    Raises:
        FileNotFoundError: no such file; the message names the three ways to point at it.
    """
    if data_dir is None:
        data_dir = os.environ.get(WIKITEXT_ENV) or Path("..") / "shared" / "data" / "wikitext-2-raw-v1"
    path = Path(data_dir) / TEST_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"the {TASK_NAME} task needs WikiText-2's {TEST_FILE}, not found at {path}; pass --data_dir DIR "
            f"(or set {WIKITEXT_ENV}=DIR) where DIR holds {TEST_FILE} from wikitext-2-raw-v1")
    return path


def _cache_dir() -> Path:
    return Path(os.environ.get("BITDISTILL_CACHE_DIR") or Path.home() / ".cache" / "bitdistill")


def lastword_jsonl(data_dir: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """Build (or reuse) the task's JSONL file from ``wiki.test.raw`` and return its path."""
    source = resolve_wikitext_file(data_dir)
    raw = source.read_bytes()
    key = hashlib.sha256(raw).hexdigest()[:16]
    folder = Path(cache_dir) if cache_dir is not None else _cache_dir()
    path = folder / f"{TASK_NAME}-v{_RULE_VERSION}-{key}.jsonl"
    if path.is_file():
        return path
    examples = lastword_examples(raw.decode("utf-8"))
    if not examples:
        raise UserError(f"{source} yields no {TASK_NAME} examples; is it WikiText-2's {TEST_FILE}?")
    atomic_write(path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples))
    return path


def load_lastword_dataset(**metadata):
    """lm-eval ``custom_dataset`` hook: a ``DatasetDict`` with the examples as its ``test`` split.

    lm-eval passes the task metadata as keywords; the WikiText folder is ``metadata["bitdistill_wikitext_dir"]``
    when set (see :func:`bitdistill.eval.evaluate_tasks`), else resolved as in :func:`resolve_wikitext_file`.
    """
    import datasets

    path = lastword_jsonl(metadata.get(METADATA_KEY))
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
