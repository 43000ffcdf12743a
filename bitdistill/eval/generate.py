"""Text generation from any model bitdistill handles: greedy or sampled, streamed piece by piece.

:func:`stream_text` continues one prompt and yields the text as tokens are produced; :func:`generate_text`
collects it. Both run on a loaded model (:func:`bitdistill.eval.load_for_eval` loads a teacher, a student
folder, a packed folder or a GGUF file). The decoder is :class:`bitdistill.nn.fast_decode.FastDecoder`
(static KV cache; the native C stack for packed models on CPU) wherever it applies, else the model's own
forward with transformers' KV cache (``Generation.reason`` says why). Sampling is applied here, on the logits
either decoder returns, so both sample alike: temperature, then nucleus (top-p), then one draw from a
``torch.Generator`` seeded with ``seed`` (the same seed gives the same text on the same machine).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from bitdistill.errors import UserError
from bitdistill.nn.fast_decode import FastDecoder, greedy_token

__all__ = ["DECODERS", "HEADS", "Generation", "generate_text", "sample_next_token", "stream_text", "validate_generation"]

DECODERS = ("auto", "fast", "torch")
HEADS = ("auto", "int8", "model")  # the fast decoder's output head; auto: int8 on the native stack


@dataclass
class Generation:
    """One prompt's continuation.

    Attributes:
        prompt: the prompt text.
        text: the generated text (special tokens left out), exactly what :func:`stream_text` yielded.
        token_ids: the generated token ids (an end-of-sequence token that stopped generation included).
        decoder: ``"fast-native"``, ``"fast-torch"`` (:class:`FastDecoder`'s backends) or ``"torch"``.
        reason: why the fast decoder was not used (``None`` when it was).
        head: the output head that ran: ``"int8"`` (approximate) or ``"model"`` (the model's own).
    """

    prompt: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    decoder: str = ""
    reason: str | None = None
    head: str = ""


def validate_generation(prompts: Sequence[str], *, max_new_tokens: int, temperature: float, top_p: float,
                        decoder: str = "auto", head: str = "auto") -> None:
    """Check the generation options before any model is loaded; raises :class:`UserError` naming the flag."""
    if isinstance(prompts, str) or not prompts:
        raise UserError("give at least one prompt: --prompt TEXT (repeatable)")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise UserError(f"--prompt number {i + 1} is empty; give the text to continue")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not _finite(temperature) or temperature < 0:
        raise UserError(f"--temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if not _finite(top_p) or not 0 < top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1] (1: no nucleus filtering), got {top_p!r}")
    if decoder not in DECODERS:
        raise UserError(f"--decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if head not in HEADS:
        raise UserError(f"--head must be one of {', '.join(HEADS)}, got {head!r}")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def sample_next_token(logits: torch.Tensor, *, temperature: float = 0.0, top_p: float = 1.0,
                      generator: torch.Generator | None = None) -> int:
    """The next token from one position's ``logits [1, vocab]`` (or ``[vocab]``); the logits are not modified.

    ``temperature == 0``: the argmax (greedy; the first of equal maxima, as ``torch.argmax``). Otherwise the
    softmax of ``logits / temperature`` in float32, restricted to the smallest set of most likely tokens whose
    probability reaches ``top_p`` (the most likely token always stays), renormalized, then one draw with
    ``generator``.
    """
    row = logits.reshape(-1)
    if temperature == 0:
        return int(greedy_token(row))
    probs = torch.softmax(row.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the more likely tokens
        keep = before < top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    return set() if eos is None else ({int(eos)} if isinstance(eos, int) else {int(e) for e in eos})


def _context(model: nn.Module) -> int | None:
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _steps_fast(decoder: FastDecoder, ids: torch.Tensor) -> Callable[[int | None], torch.Tensor]:
    """A function: ``None`` -> the prompt's last logits; a token id -> the logits after it (``[1, vocab]``)."""
    pos = ids.shape[1]

    def step(token: int | None) -> torch.Tensor:
        nonlocal pos
        if token is None:
            return decoder.step(ids, 0)
        logits = decoder.step(torch.tensor([[token]], device=decoder.device), pos)
        pos += 1
        return logits

    return step


def _steps_torch(model: nn.Module, ids: torch.Tensor) -> Callable[[int | None], torch.Tensor]:
    """As :func:`_steps_fast`, through the model's own forward and transformers' KV cache."""
    params = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}  # as generate asks
    cache = None

    def step(token: int | None) -> torch.Tensor:
        nonlocal cache
        inputs = ids if token is None else torch.tensor([[token]], device=ids.device)
        out = model(input_ids=inputs, use_cache=True, **{cache_arg: cache}, **extra)
        cache = out[cache_arg] if cache_arg in out else out.past_key_values
        return out.logits[:, -1]

    return step


def _pick_decoder(model: nn.Module, max_length: int, decoder: str,
                  head: str = "auto") -> tuple[FastDecoder | None, str | None]:
    if decoder == "torch":
        return None, "--decoder torch was asked for"
    try:
        return FastDecoder(model, max_length, int8_head=None if head == "auto" else head == "int8"), None
    except UserError as exc:
        if decoder == "fast":
            raise UserError(f"--decoder fast is not possible: {exc}".removesuffix("; use model.generate")
                            + "; use --decoder auto") from exc
        return None, f"the fast decoder does not apply: {str(exc).removesuffix('; use model.generate')}"


def _prompt_ids(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int) -> torch.Tensor:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise UserError(f"--prompt {prompt!r} gives no tokens; give text to continue")
    context = _context(model)
    if context is not None and ids.shape[1] + max_new_tokens > context:
        raise UserError(f"--prompt is {ids.shape[1]} tokens; with --max_new_tokens {max_new_tokens} that exceeds the "
                        f"model's context of {context} tokens; shorten the prompt or lower --max_new_tokens")
    return ids.to(next(model.parameters()).device)


def stream_text(model: nn.Module, tokenizer, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
                top_p: float = 1.0, generator: torch.Generator | None = None, decoder: str = "auto",
                head: str = "auto", result: Generation | None = None,
                on_decoder: Callable[[Generation], object] | None = None) -> Iterator[str]:
    """Continue ``prompt`` with ``model``; yield the new text piece by piece as tokens are produced.

    Args:
        model: a loaded causal LM (teacher, student or packed model), batch 1; it is not modified.
        tokenizer: its tokenizer.
        prompt: the text to continue (tokenized as the tokenizer does by default, BOS included where it adds one).
        max_new_tokens: stop after this many tokens (or at an end-of-sequence token of the model's
            ``generation_config``, else the tokenizer's).
        temperature: 0 for greedy, else the softmax temperature of sampling.
        top_p: nucleus sampling mass in (0, 1] (1: the whole distribution).
        generator: the random source of sampling (``torch.Generator().manual_seed(seed)`` for reproducible text).
        decoder: ``auto`` (the fast decoder where it applies, else the torch path), ``fast`` or ``torch``.
        head: the fast decoder's output head: ``auto`` (int8 on the native stack, where it is the faster one at
            a measured perplexity cost of at most 0.53%; the model's own elsewhere), ``int8`` or ``model`` (exact).
        result: filled in while streaming (text, token ids, the decoder used and why), for callers that need more
            than the text.
        on_decoder: called with ``result`` once the decoder is chosen, before the first token.

    Yields:
        Text pieces whose concatenation is the continuation's text (special tokens left out); a piece is held back
        while its last token ends inside a multi-byte character.
    """
    validate_generation([prompt], max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        decoder=decoder, head=head)
    result = result if result is not None else Generation(prompt)
    result.prompt = prompt
    ids = _prompt_ids(model, tokenizer, prompt, max_new_tokens)
    fast, result.reason = _pick_decoder(model, ids.shape[1] + max_new_tokens, decoder, head)
    result.decoder = "torch" if fast is None else f"fast-{fast.backend}"
    result.head = "int8" if fast is not None and fast.int8_head is not None else "model"
    step = _steps_torch(model, ids) if fast is None else _steps_fast(fast, ids)
    if on_decoder is not None:
        on_decoder(result)
    eos = _eos_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():  # only around the model: the caller's code runs between pieces
            logits = step(None)
        for n in range(max_new_tokens):
            token = sample_next_token(logits, temperature=temperature, top_p=top_p, generator=generator)
            result.token_ids.append(token)
            text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
            last = n + 1 == max_new_tokens or token in eos
            if text.startswith(result.text) and (last or not text.endswith("\ufffd")):
                piece, result.text = text[len(result.text):], text
                if piece:
                    yield piece
            if last:
                break
            with torch.no_grad():
                logits = step(token)
    finally:
        model.train(was_training)


def generate_text(model: nn.Module, tokenizer, prompts: str | Sequence[str], *, max_new_tokens: int = 64,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, decoder: str = "auto",
                  head: str = "auto", on_text: Callable[[str], object] | None = None,
                  on_decoder: Callable[[Generation], object] | None = None) -> list[Generation]:
    """Continue each of ``prompts`` (see :func:`stream_text`); returns one :class:`Generation` per prompt.

    Args:
        seed: seeds one ``torch.Generator`` for all the prompts (in order); ``None``: a random seed.
        on_text: called with each text piece as it is produced (streaming), e.g. ``print(..., end="", flush=True)``.
        on_decoder: called with each prompt's :class:`Generation` once its decoder is chosen, before its first token.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    validate_generation(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, decoder=decoder,
                        head=head)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise UserError(f"--seed must be an integer >= 0, got {seed!r}")
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    results = []
    for prompt in prompts:
        result = Generation(prompt)
        for piece in stream_text(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_p=top_p, generator=generator, decoder=decoder, head=head, result=result,
                                 on_decoder=on_decoder):
            if on_text is not None:
                on_text(piece)
        results.append(result)
    return results
