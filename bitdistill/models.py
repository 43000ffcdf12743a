"""Tiny random causal LMs built from configs: the test fixtures and the quick-start default.

They need no network: each is a real transformers architecture with a few small layers.
"""

from __future__ import annotations

import torch

from bitdistill.errors import UserError

__all__ = ["TINY_ARCHITECTURES", "tiny_config", "tiny_model"]

_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
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
    return GPTNeoXConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.25,
                         bos_token_id=1, eos_token_id=2)


def _gpt2():
    from transformers import GPT2Config
    return GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)


_BUILDERS = {"llama": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "phi3": _phi3, "mistral": _mistral,
             "gpt_neox": _gpt_neox, "gpt2": _gpt2}
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
