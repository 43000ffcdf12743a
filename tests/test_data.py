"""Text -> token blocks: packing, caching, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from bitdistill.data import BlockDataset, load_text, token_blocks, tokenize_text


@pytest.fixture(scope="module")
def tokenizer(shared_data):
    return AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "gpt2")


def test_blocks_pack_consecutive_tokens_and_cache(tmp_path, tokenizer, shared_data):
    src = tmp_path / "a.txt"
    src.write_text((shared_data / "wikitext-2-raw-v1" / "wiki.valid.raw").read_text()[:5000])
    text = load_text([src])
    ids = tokenize_text(text, tokenizer)
    blocks = token_blocks(text, tokenizer, 64, cache_dir=tmp_path / "cache")
    assert blocks.shape == (ids.numel() // 64, 64)
    assert torch.equal(blocks.flatten(), ids[: blocks.numel()])
    cached = list((tmp_path / "cache").glob("blocks-*.safetensors"))
    assert len(cached) == 1
    assert torch.equal(token_blocks(text, tokenizer, 64, cache_dir=tmp_path / "cache"), blocks)
    token_blocks(text, tokenizer, 32, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("blocks-*.safetensors"))) == 2


def test_files_are_concatenated_in_order(tmp_path):
    (tmp_path / "a.txt").write_text("first ")
    (tmp_path / "b.txt").write_text("second")
    assert load_text([tmp_path / "a.txt", tmp_path / "b.txt"]) == "first second"


def test_block_dataset_items():
    ds = BlockDataset(torch.arange(12).reshape(3, 4), offset=5)
    item = ds[1]
    assert item["input_ids"].tolist() == [4, 5, 6, 7]
    assert torch.equal(item["labels"], item["input_ids"])
    assert item["block_index"].item() == 6 and len(ds) == 3


def test_bad_inputs(tmp_path, tokenizer):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(ValueError, match="empty"):
        load_text([empty])
    with pytest.raises(FileNotFoundError):
        load_text([tmp_path / "missing.txt"])
    with pytest.raises(ValueError, match="either"):
        load_text()
    with pytest.raises(ValueError, match="fewer than one block"):
        token_blocks("a few words", tokenizer, 64)
    with pytest.raises(ValueError, match="at least 2"):
        token_blocks("a few words", tokenizer, 1)
    with pytest.raises(ValueError, match="non-empty"):
        BlockDataset(torch.zeros(0, 4, dtype=torch.long))
