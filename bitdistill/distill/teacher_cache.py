"""Teacher logit cache: run the teacher once, store its top-k distribution, replay it during distillation.

Stored per training block (row of the token blocks) and per predicting position ``t = 0..L-2``:

* ``topk_ids [n, L-1, k]`` (int32): the ``k`` largest teacher logits' token ids;
* ``topk_logprobs [n, L-1, k]``: ``log softmax(z / tau)`` of those tokens over the **full** vocabulary;
* ``tail_logmass [n, L-1]`` (float32): ``log`` of the probability mass of all other tokens.

The approximation. With the cache, losses compare distributions over ``k + 1`` bins: the teacher's
top-k tokens plus one "tail" bin holding the rest of the mass, for the teacher (stored) and the student
(its probabilities of the same k tokens, and its own remaining mass). Mass inside the tail is not
resolved, so the cached divergence is a lower bound of the full one (data-processing inequality for
f-divergences) and is exact when ``k`` equals the vocabulary size (then there is no tail bin). The
temperature is fixed at cache time. Logit-space losses (``mse``, ``cosine``) and hidden/attention losses
need the live teacher.

Files: ``meta.json`` (format, k, temperature, vocabulary, block size, a hash of the token blocks, shard
list) and ``shard-XXXXX.safetensors``.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from bitdistill.distill.losses import divergence, masked_token_sum
from bitdistill.errors import UserError
from bitdistill.io import atomic_output_dir

__all__ = ["CACHE_FORMAT", "TeacherCache", "blocks_sha256", "cache_teacher_logits", "cached_logits_loss",
           "collapse_to_topk"]

CACHE_FORMAT = "bitdistill-teacher-cache"
_CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def blocks_sha256(blocks: torch.Tensor) -> str:
    """sha256 of the int64 token blocks (identifies the training data a cache belongs to)."""
    return hashlib.sha256(blocks.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def collapse_to_topk(logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``logits [..., V]`` -> (``topk_ids [..., k]`` int64, ``topk_logprobs [..., k]``, ``tail_logmass [...]``) at ``temperature``."""
    log_p = F.log_softmax(logits.float() / temperature, dim=-1)
    top_logp, ids = log_p.topk(k, dim=-1)
    if k == logits.shape[-1]:
        tail = torch.full(log_p.shape[:-1], float("-inf"), device=logits.device)
    else:
        tail = torch.logsumexp(log_p.scatter(-1, ids, float("-inf")), dim=-1)
    return ids, top_logp, tail


@torch.no_grad()
def cache_teacher_logits(teacher: nn.Module, blocks: torch.Tensor, out_dir: str | Path, *, top_k: int,
                         temperature: float = 1.0, batch_size: int = 4, blocks_per_shard: int = 256,
                         dtype: str = "float32", overwrite: bool = False, teacher_name: str = "") -> Path:
    """Run ``teacher`` on every row of ``blocks [N, L]`` and write the top-k cache to ``out_dir`` (atomically)."""
    vocab = teacher.get_output_embeddings().weight.shape[0]
    if not 1 <= top_k <= vocab:
        raise UserError(f"top_k must be in 1..{vocab} (the vocabulary size), got {top_k}")
    if dtype not in _CACHE_DTYPES:
        raise UserError(f"unknown cache dtype {dtype!r}; choose one of {', '.join(_CACHE_DTYPES)}")
    if temperature <= 0:
        raise UserError(f"temperature must be > 0, got {temperature}")
    device = next(teacher.parameters()).device
    teacher.eval()
    shards = []
    with atomic_output_dir(out_dir, overwrite=overwrite, replaceable_if=("meta.json",)) as tmp:
        for start in range(0, blocks.shape[0], blocks_per_shard):
            rows = blocks[start:start + blocks_per_shard]
            ids_out, lp_out, tail_out = [], [], []
            for b in range(0, rows.shape[0], batch_size):
                logits = teacher(input_ids=rows[b:b + batch_size].to(device)).logits[:, :-1]
                ids, lp, tail = collapse_to_topk(logits, top_k, temperature)
                ids_out.append(ids.to(torch.int32).cpu())
                lp_out.append(lp.to(_CACHE_DTYPES[dtype]).cpu())
                tail_out.append(tail.cpu())
            name = f"shard-{len(shards):05d}.safetensors"
            save_file({"topk_ids": torch.cat(ids_out), "topk_logprobs": torch.cat(lp_out),
                       "tail_logmass": torch.cat(tail_out)}, str(tmp / name))
            shards.append({"file": name, "start": start, "count": rows.shape[0]})
        meta = {"format": CACHE_FORMAT, "version": 1, "top_k": top_k, "temperature": temperature,
                "vocab_size": vocab, "block_size": blocks.shape[1], "num_blocks": blocks.shape[0],
                "blocks_sha256": blocks_sha256(blocks), "dtype": dtype, "teacher": teacher_name, "shards": shards}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return Path(out_dir)


_META_KEYS = ("vocab_size", "block_size", "num_blocks", "blocks_sha256", "temperature", "shards")


class TeacherCache:
    """Reader of a cache written by :func:`cache_teacher_logits`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{self.path} is not a teacher cache (no meta.json); write one with "
                                    "`bitdistill cache-teacher`")
        try:
            self.meta = json.loads(meta_file.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{meta_file} is not valid JSON ({exc}); the cache is corrupt: rebuild it with "
                            "`bitdistill cache-teacher`") from exc
        if not isinstance(self.meta, dict) or self.meta.get("format") != CACHE_FORMAT:
            raise UserError(f"{meta_file} is not a bitdistill teacher cache; rebuild it with `bitdistill cache-teacher`")
        missing = [k for k in _META_KEYS if k not in self.meta]
        if missing:
            raise UserError(f"{meta_file} lacks {', '.join(missing)}; the cache is corrupt: rebuild it")
        self._shards = []
        for s in self.meta["shards"]:
            shard = self.path / s["file"]
            try:
                self._shards.append((s["start"], s["count"], safe_open(str(shard), framework="pt")))
            except Exception as exc:  # safetensors' own error type for a missing or truncated file
                raise UserError(f"{shard} is missing or corrupt ({exc}); rebuild the cache with "
                                "`bitdistill cache-teacher`") from exc

    def check_compatible(self, blocks: torch.Tensor, vocab_size: int, temperature: float) -> None:
        """Raise ValueError unless the cache was written for these blocks, this vocabulary and temperature."""
        m = self.meta
        if m["vocab_size"] != vocab_size:
            raise UserError(f"teacher cache {self.path} has vocabulary {m['vocab_size']}, the student {vocab_size}")
        if m["block_size"] != blocks.shape[1] or m["num_blocks"] != blocks.shape[0] or \
                m["blocks_sha256"] != blocks_sha256(blocks):
            raise UserError(f"teacher cache {self.path} was written for different training data (blocks, "
                            "tokenizer or --max_seq_length differ); rebuild it with `bitdistill cache-teacher`")
        if not math.isclose(m["temperature"], temperature):
            raise UserError(f"teacher cache {self.path} stores temperature {m['temperature']}, but --temperature is "
                            f"{temperature}; use the same or rebuild the cache")

    def lookup(self, block_indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cached ``(topk_ids int64, topk_logprobs float32, tail_logmass float32)`` for rows ``block_indices [B]``."""
        ids, lps, tails = [], [], []
        for i in block_indices.tolist():
            for start, count, f in self._shards:
                if start <= i < start + count:
                    r = i - start
                    ids.append(f.get_slice("topk_ids")[r:r + 1])
                    lps.append(f.get_slice("topk_logprobs")[r:r + 1])
                    tails.append(f.get_slice("tail_logmass")[r:r + 1])
                    break
            else:
                raise IndexError(f"block {i} is not in teacher cache {self.path}")
        return torch.cat(ids).long(), torch.cat(lps).float(), torch.cat(tails).float()


def cached_logits_loss(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                       tail_logmass: torch.Tensor, mask: torch.Tensor, num_items: torch.Tensor | float, *,
                       kind: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5,
                       alpha: float = 0.1) -> torch.Tensor:
    """Logit divergence against a cached top-k teacher over ``k + 1`` bins (``k`` bins when ``k = V``), x tau^2.

    ``student_logits [..., V]``, ``topk_ids``/``topk_logprobs [..., k]``, ``tail_logmass``/``mask [...]``.
    """
    if kind in ("mse", "cosine"):
        raise UserError(f"logit loss {kind!r} needs the full teacher logits; a teacher cache supports "
                        "forward_kl, reverse_kl, jsd, skew_kl, tvd")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    q_top = log_q.gather(-1, topk_ids)
    if topk_ids.shape[-1] == log_q.shape[-1]:
        log_q_bins, log_p_bins = q_top, topk_logprobs
    else:
        q_tail = torch.logsumexp(log_q.scatter(-1, topk_ids, float("-inf")), dim=-1)
        log_q_bins = torch.cat([q_top, q_tail[..., None]], dim=-1)
        log_p_bins = torch.cat([topk_logprobs, tail_logmass[..., None]], dim=-1)
    per_token = divergence(log_q_bins, log_p_bins, kind, beta=beta, alpha=alpha) * temperature**2
    return masked_token_sum(per_token, mask, num_items)
