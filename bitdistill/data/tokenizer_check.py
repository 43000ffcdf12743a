"""Check a tokenizer against the model it will feed: size, special tokens and, where the model records its own
vocabulary, a round trip of a sample text."""

from __future__ import annotations

from torch import nn

from bitdistill.errors import UserError

__all__ = ["SAMPLE_TEXT", "check_tokenizer"]

SAMPLE_TEXT = "The quick brown fox jumps over the lazy dog. 1234 élan, naïve café; x = y + 2."


def _ids(value) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}


def check_tokenizer(tokenizer, model: nn.Module, *, tokenizer_name: str, model_name: str,
                    own_tokenizer=None, from_model: bool = False) -> None:
    """Refuse a tokenizer that does not belong to ``model``.

    Args:
        tokenizer: the tokenizer that will encode the text.
        model: a causal LM (its output embedding rows are the vocabulary; its config may record
            ``bos_token_id``/``eos_token_id``).
        tokenizer_name, model_name: how the message names them (a path or flag).
        own_tokenizer: the tokenizer stored with the model (a folder's tokenizer files, a GGUF vocabulary),
            when there is one and it is not ``tokenizer`` itself: the sample text must encode to the same ids
            and each id must name the same token string in both.
        from_model: ``tokenizer`` was read from the model's own files (then only its size is checked: models
            and their own tokenizers do not always agree on bos/eos ids, and the files are the record).

    Raises:
        UserError: naming both and the first disagreement.
    """
    vocab = model.get_output_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise UserError(f"tokenizer {tokenizer_name} has {len(tokenizer)} tokens but the vocabulary is {vocab} "
                        f"({model_name}); pass the model's own tokenizer")
    if from_model:
        return
    config = getattr(model, "config", None)
    for role in ("bos", "eos"):
        model_ids = _ids(getattr(config, f"{role}_token_id", None))
        tok_id = getattr(tokenizer, f"{role}_token_id", None)
        if model_ids and tok_id is not None and tok_id not in model_ids:
            raise UserError(f"tokenizer {tokenizer_name} has {role}_token_id {tok_id} but {model_name} expects "
                            f"{sorted(model_ids)}; it belongs to another model family: pass the model's own tokenizer")
    if own_tokenizer is None or own_tokenizer is tokenizer:
        return
    ids = tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    own_ids = own_tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    if ids != own_ids or tokenizer.convert_ids_to_tokens(ids) != own_tokenizer.convert_ids_to_tokens(ids):
        raise UserError(f"tokenizer {tokenizer_name} encodes text differently from the tokenizer stored with "
                        f"{model_name} (sample {SAMPLE_TEXT[:20]!r}...: {ids[:6]} vs {own_ids[:6]}); pass the "
                        "model's own tokenizer")
