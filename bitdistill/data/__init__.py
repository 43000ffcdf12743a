"""Text -> fixed-length token blocks for training and evaluation (local files or ``datasets``), cached."""

from bitdistill.data.blocks import BlockDataset, load_text, text_fingerprint, token_blocks, tokenize_text

__all__ = ["BlockDataset", "load_text", "text_fingerprint", "token_blocks", "tokenize_text"]
