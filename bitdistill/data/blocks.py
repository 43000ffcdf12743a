"""Text -> packed token blocks ``[N, L]``, with an on-disk cache keyed by (text, tokenizer, length).

Text comes from local files (read as they are, files concatenated in the given order) or from a
``datasets`` dataset (rows of ``text_column`` joined with newlines). The whole text is tokenized once
without special tokens and cut into consecutive non-overlapping blocks of ``block_size`` tokens; the
remainder shorter than a block is dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["BlockDataset", "load_text", "text_fingerprint", "token_blocks", "tokenize_text"]

_CACHE_VERSION = 1


def load_text(files: Sequence[str | os.PathLike] | None = None, *, dataset_name: str | None = None,
              dataset_config_name: str | None = None, split: str = "train", text_column: str = "text") -> str:
    """The text of local ``files`` (concatenated) or of a ``datasets`` split. Exactly one source must be given."""
    if bool(files) == bool(dataset_name):
        raise ValueError("give either text files or a datasets name (not both, not neither)")
    if files:
        parts = []
        for f in files:
            p = Path(f)
            if not p.is_file():
                raise FileNotFoundError(f"text file {p} does not exist")
            parts.append(p.read_text(encoding="utf-8"))
        text = "".join(parts)
    else:
        try:
            import datasets
        except ImportError as exc:
            raise ValueError(f"--dataset_name {dataset_name!r} needs the `datasets` package: "
                             "pip install 'bitdistill[datasets]' (or pass local --train_files)") from exc
        ds = datasets.load_dataset(dataset_name, dataset_config_name, split=split)
        if text_column not in ds.column_names:
            raise ValueError(f"dataset {dataset_name} has no column {text_column!r}; columns: {ds.column_names}")
        text = "\n".join(ds[text_column])
    if not text.strip():
        raise ValueError(f"the text from {list(map(str, files or [])) or dataset_name} is empty")
    return text


def text_fingerprint(text: str) -> str:
    """sha256 of the text (utf-8)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    desc = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(desc.encode("utf-8")).hexdigest()


def tokenize_text(text: str, tokenizer) -> torch.Tensor:
    """All token ids of ``text`` (no special tokens) as a 1-D int64 tensor."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_blocks(text: str, tokenizer, block_size: int, *, cache_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """Tokenize ``text`` and pack it into ``[N, block_size]`` int64 blocks, reusing ``cache_dir`` when given.

    The cache file is named by a hash of the text, the tokenizer (its full serialized form) and
    ``block_size``, and written atomically.

    Raises:
        ValueError: ``block_size`` < 2, or the text has fewer than ``block_size`` tokens.
    """
    if block_size < 2:
        raise ValueError(f"block size must be at least 2 tokens, got {block_size}")
    path = None
    if cache_dir is not None:
        key = hashlib.sha256(f"{_CACHE_VERSION}|{text_fingerprint(text)}|{_tokenizer_fingerprint(tokenizer)}|"
                             f"{block_size}".encode()).hexdigest()[:32]
        path = Path(cache_dir) / f"blocks-{key}.safetensors"
        if path.is_file():
            return load_file(str(path))["input_ids"]
    ids = tokenize_text(text, tokenizer)
    n = ids.numel() // block_size
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one block of {block_size}; give more text "
                         "or a smaller --max_seq_length")
    blocks = ids[: n * block_size].reshape(n, block_size).contiguous()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".blocks-", suffix=".tmp", dir=path.parent)
        os.close(fd)
        save_file({"input_ids": blocks}, tmp)
        os.replace(tmp, path)
    return blocks


class BlockDataset(torch.utils.data.Dataset):
    """Rows of ``blocks [N, L]`` as causal-LM examples with their global row index ``offset + i`` (for the teacher cache).

    Each item: ``input_ids [L]``, ``labels [L]`` (= input_ids), ``attention_mask [L]``, ``block_index`` (int).
    """

    def __init__(self, blocks: torch.Tensor, offset: int = 0) -> None:
        if blocks.dim() != 2 or blocks.shape[0] == 0:
            raise ValueError(f"expected non-empty token blocks [N, L], got shape {tuple(blocks.shape)}")
        self.blocks = blocks
        self.offset = offset

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[i]
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids),
                "block_index": torch.tensor(self.offset + i, dtype=torch.long)}
