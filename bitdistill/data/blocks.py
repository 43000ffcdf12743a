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
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bitdistill.errors import UserError
from bitdistill.io import atomic_write

__all__ = ["BlockDataset", "load_text", "read_text_file", "text_fingerprint", "token_blocks", "tokenize_text"]

_CACHE_VERSION = 1


def read_text_file(path: str | os.PathLike, flag: str = "text file") -> str:
    """The UTF-8 text of ``path``; the failures a user can fix are one line naming the file and ``flag``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        IsADirectoryError: ``path`` is a folder.
        UserError: the file is not UTF-8 text (the byte offset is named).
    """
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"{flag} {p} is a folder, not a text file; pass the files inside it")
    if not p.is_file():
        raise FileNotFoundError(f"{flag} {p} does not exist")
    try:
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{flag} {p} is not UTF-8 text (invalid byte at offset {exc.start}); convert it, e.g. "
                        "iconv -t UTF-8") from exc


def load_text(files: Sequence[str | os.PathLike] | None = None, *, dataset_name: str | None = None,
              dataset_config_name: str | None = None, split: str = "train", text_column: str = "text") -> str:
    """The text of local ``files`` (concatenated) or of a ``datasets`` split. Exactly one source must be given."""
    if bool(files) == bool(dataset_name):
        raise UserError("give either text files or a datasets name (not both, not neither)")
    if files:
        text = "".join(read_text_file(f) for f in files)
    else:
        try:
            import datasets
        except ImportError as exc:
            raise UserError(f"--dataset_name {dataset_name!r} needs the `datasets` package: "
                            "pip install 'bitdistill[datasets]' (or pass local --train_files)") from exc
        ds = datasets.load_dataset(dataset_name, dataset_config_name, split=split)
        if text_column not in ds.column_names:
            raise UserError(f"dataset {dataset_name} has no column {text_column!r}; columns: {ds.column_names}")
        text = "\n".join(ds[text_column])
    if not text.strip():
        raise UserError(f"the text from {list(map(str, files or [])) or dataset_name} is empty")
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
        raise UserError(f"block size must be at least 2 tokens, got {block_size}")
    path = None
    if cache_dir is not None:
        key = hashlib.sha256(f"{_CACHE_VERSION}|{text_fingerprint(text)}|{_tokenizer_fingerprint(tokenizer)}|"
                             f"{block_size}".encode()).hexdigest()[:32]
        path = Path(cache_dir) / f"blocks-{key}.safetensors"
        if path.is_file():
            try:
                return load_file(str(path))["input_ids"]
            except Exception:  # a corrupt cache entry (safetensors' own error type): rebuild it
                path.unlink()
    ids = tokenize_text(text, tokenizer)
    n = ids.numel() // block_size
    if n == 0:
        raise UserError(f"the text has {ids.numel()} tokens, fewer than one block of {block_size}; give more text "
                        "or a smaller --max_seq_length")
    blocks = ids[: n * block_size].reshape(n, block_size).contiguous()
    if path is not None:
        atomic_write(path, lambda p: save_file({"input_ids": blocks}, str(p)))
    return blocks


class BlockDataset(torch.utils.data.Dataset):
    """Rows of ``blocks [N, L]`` as causal-LM examples with their global row index ``offset + i`` (for the teacher cache).

    Each item: ``input_ids [L]``, ``labels [L]`` (= input_ids), ``attention_mask [L]``, ``block_index`` (int).
    """

    def __init__(self, blocks: torch.Tensor, offset: int = 0) -> None:
        if blocks.dim() != 2 or blocks.shape[0] == 0:
            raise UserError(f"expected non-empty token blocks [N, L], got shape {tuple(blocks.shape)}")
        self.blocks = blocks
        self.offset = offset

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[i]
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids),
                "block_index": torch.tensor(self.offset + i, dtype=torch.long)}
