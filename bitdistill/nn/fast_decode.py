"""Fast greedy decoding for packed (and student) Llama-family models on CPU, one or several sequences at once.

``transformers``' ``generate`` spends most of a small model's per-token time outside the matmuls: cache
objects that grow by concatenation, mask construction, rotary tables recomputed per step, logits
processors, thousands of small ops. :class:`FastDecoder` has two backends.

* ``native`` (the default where it applies: a packed model on CPU in float32 or bfloat16, every projection a
  plain packed layer): the whole decoder stack, one step at a time, in one C call
  (:class:`bitdistill.cpu_ext.NativeDecoderStack`): RMSNorms, the packed projections (shared inputs
  quantized once), rotary, a static KV cache, attention, the MLP and every residual add, in float32 rounded
  to the model dtype wherever torch rounds. Then the model's own output head on the last position.
  The projections are exact; the reductions (RMSNorm mean square, attention) run in another summation
  order than torch's kernels, so logits can differ from the eager model's in the last bits (tested:
  close logits, the same greedy tokens as ``generate`` on the test models; measured on SmolLM2 in
  ``benchmarks/results/decode_cpu.md``).
* ``torch``: the model's own modules (so the layers compute exactly what they compute under
  ``generate``) with a static KV cache (``[max_batch, n_kv_heads, max_length, head_dim]`` per layer, written in
  place), the rotary table computed once, one ``scaled_dot_product_attention`` call per layer, logits for
  the last position only, and the packed projections that share an input in one native call
  (:class:`bitdistill.cpu_ext.SharedInputPackedLinears`; same bits as the layers' own forward). Used for
  student models (latent weights), other devices and dtypes, or when asked (``backend="torch"``).

Either backend can use an int8 output head (approximate): per-row absmax int8 weights, the input quantized per
64-feature block, multiplied by the native library's integer kernels (:class:`bitdistill.cpu_ext.NativeInt8Head`;
half the bytes of a bf16 head; on the native backend it runs inside the same C call). It is the native backend's
default (``int8_head=None``): on a trained SmolLM2-135M student its perplexity was within 0.53% of
``load_packed``'s in every run, and it is what puts decoding ahead of llama.cpp (``benchmarks/results/decode_cpu.md``);
``int8_head=False`` keeps the model's head. The torch backend keeps the model's head unless ``int8_head=True``.
A batch of prompts of one length decodes together (``max_batch``), and a prompt runs through the native stack as
GEMMs (chunks of 64 tokens), not token by token.

Where the native stack cannot run a model, ``backend="auto"`` prints one line naming why and uses ``torch``.

Supported: ``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``phi3`` (fused ``qkv_proj`` / ``gate_up_proj``; partial
rotary) and ``bitnet`` (transformers' ``BitNetForCausalLM``, what ``bitdistill pack`` makes of a SubLN student:
sub-norms before ``o_proj`` and ``down_proj``, ReLU-squared or SiLU).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from bitdistill.cpu_ext import (
    NATIVE_MAX_K,
    NativeDecoderStack,
    NativeInt8Head,
    NativeLayer,
    NativeLinear,
    NativeNorm,
    SharedInputPackedLinears,
    native_available,
    native_unavailable_reason,
)
from bitdistill.errors import UserError
from bitdistill.nn.arch import SUPPORTED_ARCHITECTURES, fast_decode_unsupported
from bitdistill.nn.packed import PackedBitLinear

__all__ = ["FAST_DECODE_ARCHS", "FAST_DECODE_BACKENDS", "FastDecoder", "generate_fast"]

FAST_DECODE_ARCHS = tuple(name for name, spec in SUPPORTED_ARCHITECTURES.items() if spec.fast_decode)
FAST_DECODE_BACKENDS = ("auto", "native", "torch")
_RMS_NORMS = {f"{n}RMSNorm" for n in ("Llama", "Mistral", "Qwen2", "Qwen3", "Phi3", "BitNet")}


def _shared_input(modules: list[nn.Module]) -> SharedInputPackedLinears | None:
    """One native call for ``modules`` when all are plain packed layers (no in-layer norm) on CPU, else None."""
    if not all(isinstance(m, PackedBitLinear) and m.rms_norm is None and m.weight.device.type == "cpu"
               for m in modules) or not native_available():
        return None
    return SharedInputPackedLinears([(m.weight, m.weight_scale, m.bias) for m in modules])


def _native_linear(module: nn.Module) -> NativeLinear:
    return NativeLinear(module.weight, module.weight_scale, module.bias)


def _native_norm(module: nn.Module | None) -> NativeNorm | None:
    return None if module is None else NativeNorm(module.weight, float(module.variance_epsilon))


def _activation(mlp: nn.Module) -> str | None:
    act = getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)
    if isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation":  # transformers 5 wraps F.silu
        return "silu"
    return "relu2" if type(act).__name__ == "ReLUSquaredActivation" else None


def _native_unsupported(model: nn.Module) -> str | None:
    """Why ``model`` cannot run on the native stack (None: it can)."""
    param = model.model.embed_tokens.weight
    if param.device.type != "cpu" or param.dtype not in (torch.float32, torch.bfloat16):
        return f"the native stack runs float32 or bfloat16 models on CPU, not {param.dtype} on {param.device.type}"
    if not native_available():
        return native_unavailable_reason()
    if type(model.model.norm).__name__ not in _RMS_NORMS or model.model.norm.weight.dtype != param.dtype:
        return "the final norm is not an RMSNorm the native stack implements, in the model's dtype"
    act = _activation(model.model.layers[0].mlp)
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        linears = [getattr(m, n) for m, names in ((attn, ("qkv_proj", "q_proj", "k_proj", "v_proj", "o_proj")),
                                                  (mlp, ("gate_up_proj", "gate_proj", "up_proj", "down_proj")))
                   for n in names if hasattr(m, n)]
        if not all(isinstance(m, PackedBitLinear) and m.rms_norm is None for m in linears):
            return f"layer {i} has projections that are not plain packed layers (a student: load it packed)"
        if any(m.in_features > NATIVE_MAX_K for m in linears):
            return f"layer {i} has a projection wider than the native kernels' {NATIVE_MAX_K} input features"
        norms = [layer.input_layernorm, layer.post_attention_layernorm,
                 *[getattr(m, n) for m, n in ((attn, "q_norm"), (attn, "k_norm"), (attn, "attn_sub_norm"),
                                              (mlp, "ffn_sub_norm")) if hasattr(m, n)]]
        if not all(type(n).__name__ in _RMS_NORMS and n.weight.dtype == param.dtype for n in norms):
            return f"layer {i} has a norm the native stack does not implement, or one not in the model's dtype"
        if act is None or _activation(mlp) != act:
            return (f"layer {i} has an MLP activation the native stack does not implement (SiLU or ReLU squared, "
                    "the same in every layer)")
    return None


def _native_stack(model: nn.Module, cos: torch.Tensor, sin: torch.Tensor, head: NativeInt8Head | None,
                  max_batch: int) -> NativeDecoderStack:
    """The native stack of ``model`` (checked by :func:`_native_unsupported`); ``cos``/``sin`` ``[max_length, rot]``."""
    cfg, inner = model.config, model.model
    layers = []
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [attn.qkv_proj] if hasattr(attn, "qkv_proj") else [attn.q_proj, attn.k_proj, attn.v_proj]
        mlp_in = [mlp.gate_up_proj] if hasattr(mlp, "gate_up_proj") else [mlp.gate_proj, mlp.up_proj]
        layers.append(NativeLayer(
            input_norm=_native_norm(layer.input_layernorm), post_norm=_native_norm(layer.post_attention_layernorm),
            qkv=tuple(_native_linear(m) for m in qkv), o=_native_linear(attn.o_proj),
            mlp_in=tuple(_native_linear(m) for m in mlp_in), down=_native_linear(mlp.down_proj),
            q_norm=_native_norm(getattr(attn, "q_norm", None)), k_norm=_native_norm(getattr(attn, "k_norm", None)),
            attn_sub_norm=_native_norm(getattr(attn, "attn_sub_norm", None)),
            ffn_sub_norm=_native_norm(getattr(mlp, "ffn_sub_norm", None))))
    attn = inner.layers[0].self_attn
    n_heads = cfg.num_attention_heads
    return NativeDecoderStack(layers, final_norm=_native_norm(inner.norm), n_heads=n_heads,
                              n_kv=getattr(cfg, "num_key_value_heads", None) or n_heads, head_dim=attn.head_dim,
                              scaling=float(attn.scaling), act=_activation(inner.layers[0].mlp), cos=cos, sin=sin,
                              dtype=inner.embed_tokens.weight.dtype, head=head, max_batch=max_batch)


class _Linears:
    """``modules`` applied to one input: one native call where :func:`_shared_input` allows, else each module."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self.native = _shared_input(modules)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x [..., K]`` -> ``[y_i [..., N_i]]``."""
        if self.native is None or x.dtype not in (torch.float32, torch.bfloat16):
            return [m(x) for m in self.modules]
        outs = self.native(x.reshape(-1, x.shape[-1]))
        return [y.view(*x.shape[:-1], y.shape[-1]) for y in outs]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first ``cos.shape[-1]`` features of ``x [B, H, T, D]`` (``cos [1, 1, T, R]``)."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


def greedy_token(logits: torch.Tensor) -> torch.Tensor:
    """The greedy choice over the last dimension of ``logits [..., vocab]``: ``[..., 1]`` int64, the first of equal
    maxima (as ``torch.argmax``). Taken over the logits widened to float32, which is exact for bfloat16 and float16,
    so the index is the one ``argmax`` gives on the logits themselves; ``argmax`` over bfloat16 is 5x slower on CPU
    (341 against 62 us for ``[4, 49152]`` on 2 threads), a tenth of a small model's decode step."""
    return logits.float().argmax(dim=-1, keepdim=True)


class FastDecoder:
    """A static-cache greedy decoder around a loaded causal LM (the model is not modified).

    Args:
        model: a ``transformers`` causal LM of a :data:`FAST_DECODE_ARCHS` architecture, e.g. from
            :func:`bitdistill.load_packed` or :func:`bitdistill.load_student`.
        max_length: the longest prompt + generation this decoder holds (its KV cache size).
        int8_head: use an int8-weight output head (approximate; see :class:`bitdistill.cpu_ext.NativeInt8Head`);
            ``None`` (default): on the native backend only, the model's own head on the torch backend.
        backend: ``"native"`` (the whole stack in C; a packed model on CPU), ``"torch"`` (the model's modules),
            or ``"auto"``: native where it applies, else torch with one printed line saying why. The chosen one is
            ``self.backend``.
        max_batch: the most sequences decoded together (the cache holds this many).

    The decoder reads the model's packed weights and scales when it is built; build a new one after
    changing them.
    """

    def __init__(self, model: nn.Module, max_length: int, *, int8_head: bool | None = None, backend: str = "auto",
                 max_batch: int = 1) -> None:
        if backend not in FAST_DECODE_BACKENDS:
            raise UserError(f"backend must be one of {', '.join(FAST_DECODE_BACKENDS)}, got {backend!r}")
        cfg = model.config
        unsupported = fast_decode_unsupported(cfg)
        if unsupported is not None:
            raise UserError(f"{unsupported}; use model.generate")
        if max_length <= 0 or max_length > cfg.max_position_embeddings:
            raise UserError(f"max_length must be in 1..{cfg.max_position_embeddings} (max_position_embeddings), "
                             f"got {max_length}")
        if max_batch < 1:
            raise UserError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.inner = model.model
        self.layers = list(self.inner.layers)
        self.max_length, self.max_batch = max_length, max_batch
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.scaling = attn.scaling
        self.fused_qkv = hasattr(attn, "qkv_proj")
        self.gqa = self.n_kv != self.n_heads
        param = self.inner.embed_tokens.weight
        self.dtype, self.device = param.dtype, param.device
        positions = torch.arange(max_length, device=self.device)[None]
        with torch.no_grad():
            cos, sin = self.inner.rotary_emb(param[:1][None], positions)
        self.cos, self.sin = cos[:, None], sin[:, None]  # [1, 1, max_length, rot]
        reason = "backend='torch' was asked for" if backend == "torch" else _native_unsupported(model)
        if backend == "native" and reason is not None:
            raise UserError(f"backend='native' is not possible: {reason}; use backend='auto' or 'torch'")
        if backend == "auto" and reason is not None:
            print(f"bitdistill: fast decoding runs the torch path, not the native stack: {reason}", file=sys.stderr)
        self.backend = "torch" if reason is not None else "native"
        if int8_head is None:
            int8_head = self.backend == "native"
        self.int8_head = NativeInt8Head(model.lm_head.weight) if int8_head else None
        self.native = (_native_stack(model, cos[0], sin[0], self.int8_head, max_batch) if reason is None else None)
        self.k_cache, self.v_cache, self.qkv, self.o, self.mlp_in, self.down = [], [], [], [], [], []
        if self.native is None:
            self._build_torch_backend()

    def _build_torch_backend(self) -> None:
        shape = (self.max_batch, self.n_kv, self.max_length, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.qkv.append(_Linears([attn.qkv_proj] if self.fused_qkv else [attn.q_proj, attn.k_proj, attn.v_proj]))
            self.o.append(_Linears([attn.o_proj]))
            split_mlp = all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn"))
            self.mlp_in.append(_Linears([mlp.gate_proj, mlp.up_proj]) if split_mlp else None)
            self.down.append(_Linears([mlp.down_proj]) if split_mlp else None)

    def _attention(self, layer: nn.Module, i: int, h: torch.Tensor, pos: int, cos: torch.Tensor,
                   sin: torch.Tensor) -> torch.Tensor:
        attn = layer.self_attn
        b, t = h.shape[:2]
        if self.fused_qkv:
            (qkv,) = self.qkv[i](h)
            q, k, v = qkv.split([self.n_heads * self.head_dim, self.n_kv * self.head_dim,
                                 self.n_kv * self.head_dim], dim=-1)
        else:
            q, k, v = self.qkv[i](h)
        q = q.view(b, t, -1, self.head_dim)
        k = k.view(b, t, -1, self.head_dim)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(b, t, -1, self.head_dim).transpose(1, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        self.k_cache[i][:b, :, pos:pos + t] = k
        self.v_cache[i][:b, :, pos:pos + t] = v
        keys, values = self.k_cache[i][:b, :, :pos + t], self.v_cache[i][:b, :, :pos + t]
        mask = None
        if t > 1 and pos > 0:  # a chunk after cached positions: causal within the chunk, all earlier keys visible
            mask = torch.ones(t, pos + t, dtype=torch.bool, device=h.device).tril(diagonal=pos)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=t > 1 and pos == 0,
                                             scale=self.scaling, enable_gqa=self.gqa)
        out = out.transpose(1, 2).reshape(b, t, -1)
        if hasattr(attn, "attn_sub_norm"):  # BitNetForCausalLM (a packed SubLN student)
            out = attn.attn_sub_norm(out)
        return self.o[i](out)[0]

    def _mlp(self, layer: nn.Module, i: int, h: torch.Tensor) -> torch.Tensor:
        if self.mlp_in[i] is None:  # fused gate_up (phi3): the module itself
            return layer.mlp(h)
        gate, up = self.mlp_in[i](h)
        mid = layer.mlp.act_fn(gate) * up
        if hasattr(layer.mlp, "ffn_sub_norm"):
            mid = layer.mlp.ffn_sub_norm(mid)
        return self.down[i](mid)[0]

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        if self.int8_head is not None:
            return self.int8_head(h).to(self.dtype)
        return self.model.lm_head(h)

    def _check(self, ids: torch.Tensor, pos: int) -> None:
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise UserError(f"input_ids must be [batch, tokens], got {tuple(ids.shape)}")
        if ids.shape[0] > self.max_batch:
            raise UserError(f"batch {ids.shape[0]} exceeds this decoder's max_batch {self.max_batch}; build it with "
                             f"max_batch={ids.shape[0]}")
        if pos < 0 or pos + ids.shape[1] > self.max_length:
            raise UserError(f"{ids.shape[1]} tokens at position {pos} exceed this decoder's max_length "
                             f"{self.max_length}; build it with a larger max_length")

    def _run(self, ids: torch.Tensor, pos: int, all_positions: bool) -> torch.Tensor:
        self._check(ids, pos)
        if self.native is not None:
            hidden, logits = self.native.forward(self.inner.embed_tokens(ids), pos, all_positions=all_positions)
            return self.model.lm_head(hidden) if logits is None else logits.to(self.dtype)
        h = self.inner.embed_tokens(ids)
        cos, sin = self.cos[:, :, pos:pos + ids.shape[1]], self.sin[:, :, pos:pos + ids.shape[1]]
        for i, layer in enumerate(self.layers):
            h = h + self._attention(layer, i, layer.input_layernorm(h), pos, cos, sin)
            h = h + self._mlp(layer, i, layer.post_attention_layernorm(h))
        return self._head(self.inner.norm(h if all_positions else h[:, -1]))

    @torch.no_grad()
    def step(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        """Run ``ids [B, T]`` (B sequences, in cache slots ``0..B-1``) at positions ``pos..pos+T-1``; returns the
        last position's logits ``[B, vocab]``."""
        return self._run(ids, pos, False)

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits of every position of ``ids [B, T]`` from position 0 (a prompt through the stack as GEMMs):
        ``[B, T, vocab]``, e.g. for perplexity. Overwrites the cache."""
        return self._run(ids, 0, True)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, eos_token_id: int | None = None) -> torch.Tensor:
        """Greedy continuation of ``input_ids [B, T]`` (B <= ``max_batch`` prompts of one length); returns
        ``[B, T + n]`` (``n <= max_new_tokens``). Generation stops once every sequence has produced
        ``eos_token_id``; a sequence that has is continued with it. On the native backend with the int8 head, every
        step runs inside one native call (:meth:`bitdistill.cpu_ext.NativeDecoderStack.generate`: the same tokens,
        without Python's per-token work); otherwise one :meth:`step` a token."""
        if input_ids.dim() != 2:
            raise UserError(f"input_ids must be [batch, tokens], got {tuple(input_ids.shape)}")
        t = input_ids.shape[1]
        if t + max_new_tokens > self.max_length:
            raise UserError(f"prompt {t} + max_new_tokens {max_new_tokens} exceeds this decoder's max_length "
                             f"{self.max_length}")
        if max_new_tokens < 0:
            raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        ids = input_ids.to(self.device)
        if self.native is not None and self.native.head is not None and type(self.inner.embed_tokens) is nn.Embedding:
            self._check(ids, 0)
            n_embed = self.inner.embed_tokens.num_embeddings
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n_embed):
                raise UserError(f"input_ids hold token ids outside the embedding's 0..{n_embed - 1}")
            new = self.native.generate(self.inner.embed_tokens.weight, ids, max_new_tokens, eos_token_id)
            return torch.cat([ids, new], dim=1)
        return self._generate_steps(ids, max_new_tokens, eos_token_id)

    def _generate_steps(self, ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None) -> torch.Tensor:
        """:meth:`generate` one :meth:`step` a token (what the native loop does in one call)."""
        t = ids.shape[1]
        out = [ids]
        logits = self.step(ids, 0)
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=self.device)
        for n in range(max_new_tokens):
            token = greedy_token(logits)
            if eos_token_id is not None:
                token = token.masked_fill(done[:, None], eos_token_id)
                done |= token[:, 0] == eos_token_id
            out.append(token)
            if n + 1 == max_new_tokens or bool(done.all()):
                break
            logits = self.step(token, t + n)
        return torch.cat(out, dim=1)


def generate_fast(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, int8_head: bool | None = None,
                  eos_token_id: int | None = None, backend: str = "auto") -> torch.Tensor:
    """Greedy decoding with a static KV cache (see :class:`FastDecoder`); ``input_ids [B, T]`` -> ``[B, T + n]``.

    Builds a decoder sized for this call; reuse a :class:`FastDecoder` to decode repeatedly without
    rebuilding the cache.
    """
    decoder = FastDecoder(model, input_ids.shape[-1] + max_new_tokens, int8_head=int8_head, backend=backend,
                          max_batch=input_ids.shape[0] if input_ids.dim() == 2 else 1)
    return decoder.generate(input_ids, max_new_tokens, eos_token_id=eos_token_id)
