"""Tiny random causal LMs built from configs: the test fixtures and the quick-start default.

They need no network: each is a real transformers architecture with a few small layers and a
256-token vocabulary, which :func:`tiny_tokenizer` (byte-level: one token per byte) fits exactly, so
``tiny:<arch>`` models run through ``distill``, ``self-distill`` and ``eval`` with no tokenizer of their own.
"""

from __future__ import annotations

import torch

from bitdistill.errors import UserError

__all__ = ["TINY_ARCHITECTURES", "TINY_VOCAB", "tiny_config", "tiny_model", "tiny_tokenizer"]

TINY_VOCAB = 256

_COMMON = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)


def _llama():
    from transformers import LlamaConfig
    return LlamaConfig(**_COMMON)


def _qwen2():
    from transformers import Qwen2Config
    return Qwen2Config(**_COMMON, tie_word_embeddings=True)


def _qwen3():
    from transformers import Qwen3Config
    return Qwen3Config(**_COMMON, head_dim=16)


def _phi3():
    from transformers import Phi3Config
    return Phi3Config(**_COMMON, pad_token_id=0)


def _mistral():
    from transformers import MistralConfig
    return MistralConfig(**_COMMON, sliding_window=None)


def _gpt_neox():
    from transformers import GPTNeoXConfig
    return GPTNeoXConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.25,
                         bos_token_id=1, eos_token_id=2)


def _gpt2():
    from transformers import GPT2Config
    return GPT2Config(vocab_size=TINY_VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)


def _for_model(model_type: str, **extra):
    from transformers import AutoConfig
    return AutoConfig.for_model(model_type, **_COMMON, **extra)


_BUILDERS = {"llama": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "phi3": _phi3, "mistral": _mistral,
             "gpt_neox": _gpt_neox, "gpt2": _gpt2,
             "gemma": lambda: _for_model("gemma", head_dim=16),
             "gemma2": lambda: _for_model("gemma2", head_dim=16, sliding_window=64),
             "gemma3": lambda: _for_model("gemma3_text", head_dim=16, sliding_window=64),
             "olmo": lambda: _for_model("olmo"), "olmo2": lambda: _for_model("olmo2"),
             "granite": lambda: _for_model("granite"), "stablelm": lambda: _for_model("stablelm")}
TINY_ARCHITECTURES = tuple(_BUILDERS)


def tiny_config(arch: str):
    """A small config (vocab 256, hidden 64, 2 layers) of architecture ``arch`` (one of ``TINY_ARCHITECTURES``)."""
    if arch not in _BUILDERS:
        raise UserError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_ARCHITECTURES)}")
    return _BUILDERS[arch]()


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialized causal LM of architecture ``arch`` (deterministic for a given ``seed``)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def tiny_tokenizer():
    """A byte-level tokenizer with exactly the tiny models' 256 ids: byte ``b`` is id ``b``.

    Ids 0, 1 and 2 (the control bytes NUL, SOH and STX, which text does not contain) are the special tokens
    ``<pad>``, ``<s>`` (``bos_token_id=1``) and ``<|endoftext|>`` (``eos_token_id=2``) of the tiny configs;
    ``<|endoftext|>`` is the name Qwen2's tokenizer class expects, so transformers adds no 257th token when it
    picks that class for a saved tiny Qwen2 folder. Any UTF-8 text round-trips through ``encode``/``decode``.
    Built in memory (the ``tokenizers`` library), no files.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {_byte_char(b): b for b in range(TINY_VOCAB)}
    specials = {"<pad>": 0, "<s>": 1, "<|endoftext|>": 2}
    for char, idx in list(vocab.items()):
        if idx in specials.values():
            del vocab[char]
    vocab.update(specials)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="<|endoftext|>")


def _byte_char(b: int) -> str:
    """GPT-2's printable stand-in for byte ``b`` (what the ByteLevel pre-tokenizer emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if b in printable:
        return chr(b)
    return chr(256 + sum(1 for x in range(b) if x not in printable))
