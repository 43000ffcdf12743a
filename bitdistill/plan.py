"""``bitdistill plan``: can TEACHER be distilled into a ternary student on N GPUs of M GB, and how?

Reads the teacher's config only (a folder, a ``config.json``, a hub id when online) and builds the model on the
meta device to count its parameters (no weights are read). Per rank it estimates:

* **teacher**: its weights (float32, what ``bitdistill distill`` loads by default: 4 bytes a parameter; bfloat16: 2;
  8-bit: 1 byte a linear weight, the embeddings and head in bfloat16; none with a teacher-logit cache). Every rank
  holds a whole teacher (it is kept out of FSDP).
* **latent weights**: the student's float32 latent weights, divided over the ranks with FSDP; with FSDP each rank
  also holds the gathered bfloat16 weights of two blocks (the one computing, the one prefetched) and of the root
  (embeddings, head).
* **gradients**: float32, sharded like the weights.
* **optimizer**: AdamW's two float32 moments (8 bytes a parameter), or 2 with 8-bit Adam.
* **activations** of one micro-batch of ``T = micro_batch * seq_len`` tokens, and the step's peak:
  ``max(K_V T V + T L (K_H H + K_I I) * a, K_STEP * gradients)``: the logits and loss temporaries over the
  vocabulary ``V`` plus ``L`` blocks of width ``H`` and MLP width ``I`` in the activation dtype (``a`` = 1 for
  float32, 1/2 for bfloat16), or the optimizer step over the gradients, whichever is larger.

The constants are fitted to the peak of live tensor bytes (:class:`bitdistill.live_memory.LiveTensorBytes`) of real
float32 distillation steps of small Llama students on CPU, and checked on shapes they were not fitted to
(``benchmarks/bench_plan_memory.py``, ``benchmarks/results/plan_memory.md``). The bfloat16, 8-bit, cache,
checkpointing and FSDP terms are arithmetic on those, not measured on a GPU here.

A plan fits when the total is at most ``USABLE_FRACTION`` of the GPU's memory less ``CUDA_RESERVE_GB`` (the CUDA
context, kernels' workspaces, fragmentation). The recommendation is the fitting option set with the smallest cost
(:data:`OPTION_COST`: FSDP, a smaller micro-batch and a bfloat16 teacher first, then the teacher-logit cache and
checkpointing, then the 8-bit teacher and 8-bit Adam). When nothing fits, :func:`plan` says which part does not and by how much, and the
CLI exits with status 2.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bitdistill.errors import UserError

__all__ = [
    "CUDA_RESERVE_GB",
    "K_H",
    "K_I",
    "K_STEP",
    "K_V",
    "OPTION_COST",
    "USABLE_FRACTION",
    "MemoryEstimate",
    "ModelShape",
    "Options",
    "Plan",
    "estimate_memory",
    "model_shape",
    "plan",
    "read_teacher_config",
]

GB = 1e9
# Fitted (bytes, float32) on benchmarks/results/plan_memory.jsonl's "fit" rows: logits and loss temporaries per
# token and vocabulary entry (about 8 float32 vocabulary vectors), per block per token and unit of H or I, and the
# optimizer step's peak as a multiple of the float32 gradients (gradients plus foreach AdamW temporaries).
K_V = 32.7
K_H = 54.3
K_I = 17.9
K_STEP = 1.45
# With a teacher-logit cache the teacher's logits and their log-softmax (2 of the ~8 vocabulary vectors) are gone.
K_V_CACHE = K_V * 6 / 8
USABLE_FRACTION = 0.9
CUDA_RESERVE_GB = 1.0
TEACHER_DTYPES = ("bfloat16", "int8", "cache", "float32")
OPTIMIZERS = ("adamw", "adamw_8bit")
OPTION_COST = {"fsdp": 0.5, "halve_micro_batch": 1.0, "teacher_bf16": 1.0, "teacher_cache": 2.0,
               "gradient_checkpointing": 2.0, "teacher_int8": 3.0, "adamw_8bit": 3.0}


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a config: parameter counts by role and the widths."""

    model_type: str
    params: int
    linear_params: int  # the weights that become BitLinear (every nn.Linear but the output head)
    embed_head_params: int  # embeddings and the output head (once if tied)
    block_params: int  # one decoder block
    hidden: int
    intermediate: int
    layers: int
    vocab: int


@dataclass(frozen=True)
class Options:
    """One way to run: ``gpus`` ranks, FSDP or not, the teacher's form, the optimizer, checkpointing, micro-batch."""

    gpus: int = 1
    fsdp: bool = False
    teacher: str = "float32"
    optimizer: str = "adamw"
    gradient_checkpointing: bool = False
    micro_batch: int = 8
    seq_len: int = 2048
    activation_dtype: str = "bfloat16"

    def cost(self, asked: Options) -> float:
        c = OPTION_COST["fsdp"] * self.fsdp
        c += OPTION_COST["halve_micro_batch"] * max(0, (asked.micro_batch // self.micro_batch).bit_length() - 1)
        c += OPTION_COST["gradient_checkpointing"] * (self.gradient_checkpointing and not asked.gradient_checkpointing)
        c += OPTION_COST["teacher_bf16"] * (self.teacher == "bfloat16" and asked.teacher != "bfloat16")
        c += OPTION_COST["teacher_cache"] * (self.teacher == "cache" and asked.teacher != "cache")
        c += OPTION_COST["teacher_int8"] * (self.teacher == "int8" and asked.teacher != "int8")
        c += OPTION_COST["adamw_8bit"] * (self.optimizer == "adamw_8bit" and asked.optimizer != "adamw_8bit")
        return c

    def flags(self) -> str:
        """The launcher and ``bitdistill distill`` flags these options mean."""
        out = [f"torchrun --nproc_per_node {self.gpus} -m bitdistill.cli.main distill" if self.gpus > 1
               else "bitdistill distill"]
        if self.fsdp:
            out.append("--fsdp full_shard --fsdp_config '{\"version\": 2}'")
        out.append(f"--per_device_train_batch_size {self.micro_batch}")
        if self.gradient_checkpointing:
            out.append("--activation_checkpointing true")
        if self.teacher == "cache":
            out.append("--teacher_cache DIR (from bitdistill cache-teacher; logits only: --attention_weight 0 "
                       "--hidden_weight 0)")
        elif self.teacher == "int8":
            out.append("--teacher_load_in_8bit true")
        elif self.teacher == "bfloat16":
            out.append("[teacher in bfloat16, student float32: not a distill flag yet, see docs/fsdp.md]")
        if self.optimizer == "adamw_8bit":
            out.append("--optim adamw_bnb_8bit")
        if self.activation_dtype == "bfloat16":
            out.append("--bf16 true")
        return " ".join(out)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank, by part."""

    teacher: float
    latent_weights: float
    gathered_weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return (self.teacher + self.latent_weights + self.gathered_weights + self.gradients + self.optimizer
                + self.activations)

    def parts(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items()}


@dataclass
class Plan:
    """The estimate for the options asked and the recommendation (``None`` when nothing fits)."""

    teacher: str
    shape: ModelShape
    gpu_gb: float
    asked: Options
    asked_estimate: MemoryEstimate
    recommended: Options | None
    recommended_estimate: MemoryEstimate | None
    smallest: Options = field(repr=False, default=None)
    smallest_estimate: MemoryEstimate | None = field(repr=False, default=None)

    @property
    def usable_bytes(self) -> float:
        return usable_bytes(self.gpu_gb)

    @property
    def fits(self) -> bool:
        return self.recommended is not None

    def shortfall(self) -> str:
        """One line: which part does not fit and by how much (for a plan where nothing fits)."""
        est = self.smallest_estimate
        parts = est.parts()
        student = parts["latent_weights"] + parts["gradients"] + parts["optimizer"]
        over = est.total - self.usable_bytes
        biggest = max(parts, key=parts.get)
        what = (f"the student's latent weights, gradients and optimizer state alone take {student / GB:.1f} GB"
                if student > self.usable_bytes else f"the largest part is {biggest.replace('_', ' ')} "
                f"({parts[biggest] / GB:.1f} GB)")
        return (f"{self.teacher} does not fit on {self.asked.gpus} x {self.gpu_gb:g} GB even with every option "
                f"({self.smallest.flags()}): it needs {est.total / GB:.1f} GB per rank, {over / GB:.1f} GB more than "
                f"the {self.usable_bytes / GB:.1f} GB usable; {what}; use more or larger GPUs")

    def render(self) -> str:
        s = self.shape
        lines = [f"teacher {self.teacher} ({s.model_type}): {s.params / 1e9:.2f} B parameters, "
                 f"{s.linear_params / 1e9:.2f} B of them in linear layers that become ternary",
                 f"hardware: {self.asked.gpus} x {self.gpu_gb:g} GB ({self.usable_bytes / GB:.1f} GB usable per GPU); "
                 f"sequence length {self.asked.seq_len}, micro-batch {self.asked.micro_batch}",
                 "", "per-rank memory (GB)        as asked   recommended"]
        rec = self.recommended_estimate
        for name, value in self.asked_estimate.parts().items():
            other = f"{rec.parts()[name] / GB:>12.2f}" if rec else f"{'-':>12}"
            lines.append(f"  {name.replace('_', ' '):<24}{value / GB:>10.2f}{other}")
        other = f"{rec.total / GB:>12.2f}" if rec else f"{'-':>12}"
        lines.append(f"  {'total':<24}{self.asked_estimate.total / GB:>10.2f}{other}")
        lines.append("")
        lines.append("as asked: " + describe(self.asked))
        if self.recommended is None:
            lines.append("recommended: nothing fits")
        else:
            lines.append("recommended: " + describe(self.recommended))
            lines.append("run with: " + self.recommended.flags())
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"teacher": self.teacher, "shape": asdict(self.shape), "gpu_gb": self.gpu_gb,
                           "usable_bytes": self.usable_bytes, "asked": asdict(self.asked),
                           "asked_estimate": self.asked_estimate.parts() | {"total": self.asked_estimate.total},
                           "recommended": asdict(self.recommended) if self.recommended else None,
                           "recommended_estimate": (self.recommended_estimate.parts()
                                                    | {"total": self.recommended_estimate.total})
                           if self.recommended_estimate else None,
                           "shortfall": None if self.fits else self.shortfall()}, indent=2)


def describe(o: Options) -> str:
    return (f"{'FSDP over ' + str(o.gpus) + ' ranks' if o.fsdp else ('DDP over ' + str(o.gpus) + ' ranks' if o.gpus > 1 else '1 GPU')}, "
            f"teacher {'logit cache' if o.teacher == 'cache' else o.teacher}, {o.optimizer}, "
            f"{'gradient checkpointing, ' if o.gradient_checkpointing else ''}micro-batch {o.micro_batch}, "
            f"{o.activation_dtype} activations")


def usable_bytes(gpu_gb: float) -> float:
    return gpu_gb * GB * USABLE_FRACTION - CUDA_RESERVE_GB * GB


def read_teacher_config(source: str | Path):
    """The teacher's ``PretrainedConfig`` from a folder, a ``config.json`` file or a hub id (online)."""
    from transformers import AutoConfig, PretrainedConfig

    path = Path(str(source))
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read the teacher config {path}: {exc}; pass a config.json, a model folder or a "
                            "hub id") from None
        if "model_type" not in data:
            raise UserError(f"{path} has no 'model_type'; pass the model's own config.json")
        from transformers import CONFIG_MAPPING

        if data["model_type"] not in CONFIG_MAPPING:
            raise UserError(f"{path}: transformers does not know model_type {data['model_type']!r}")
        return CONFIG_MAPPING[data["model_type"]].from_dict(data)
    try:
        config = AutoConfig.from_pretrained(str(source))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read a config for TEACHER {source!r} ({str(exc).splitlines()[0]}); pass a model "
                        "folder, its config.json, or a hub id while online") from None
    if not isinstance(config, PretrainedConfig):
        raise UserError(f"{source!r} is not a model config")
    return config


def model_shape(config) -> ModelShape:
    """Parameter counts by role from ``config``, with the model built on the meta device (no memory, no weights)."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    from bitdistill.nn.arch import decoder_layers

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings()
    head_weight = head.weight if head is not None else None
    linear = sum(m.weight.numel() for m in model.modules()
                 if isinstance(m, nn.Linear) and m.weight is not head_weight)
    embed = model.get_input_embeddings().weight
    embed_head = embed.numel() + (head_weight.numel() if head_weight is not None and head_weight is not embed else 0)
    _, blocks = decoder_layers(model, "bitdistill plan reads the decoder blocks of the teacher")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelShape(model_type=config.model_type, params=params, linear_params=linear,
                      embed_head_params=embed_head, block_params=sum(p.numel() for p in blocks[0].parameters()),
                      hidden=text.hidden_size, intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
                      layers=len(blocks), vocab=text.vocab_size)


def estimate_memory(shape: ModelShape, o: Options) -> MemoryEstimate:
    """Bytes per rank for ``shape`` run with options ``o`` (see the module docstring for each term)."""
    shards = o.gpus if o.fsdp else 1
    p = shape.params
    if o.teacher == "cache":
        teacher = 0.0
    elif o.teacher == "int8":
        teacher = shape.linear_params * 1.0 + (p - shape.linear_params) * 2.0
    else:
        teacher = p * (4.0 if o.teacher == "float32" else 2.0)
    latent = 4.0 * p / shards
    a = 1.0 if o.activation_dtype == "float32" else 0.5  # bytes relative to float32
    gathered = 4.0 * a * (2 * shape.block_params + shape.embed_head_params) if o.fsdp else 0.0
    grads = 4.0 * p / shards
    optimizer = (8.0 if o.optimizer == "adamw" else 2.0) * p / shards
    tokens = o.micro_batch * o.seq_len
    per_block = tokens * (K_H * shape.hidden + K_I * shape.intermediate) * a
    blocks = (shape.layers * tokens * shape.hidden * 4.0 * a + per_block if o.gradient_checkpointing
              else shape.layers * per_block)
    logits = (K_V_CACHE if o.teacher == "cache" else K_V) * tokens * shape.vocab
    step_peak = max(logits + blocks, K_STEP * grads) - grads
    return MemoryEstimate(teacher=teacher, latent_weights=latent, gathered_weights=gathered, gradients=grads,
                          optimizer=optimizer, activations=max(step_peak, 0.0))


def _candidates(asked: Options) -> list[Options]:
    sizes = sorted({asked.micro_batch // 2**k for k in range(asked.micro_batch.bit_length()) if asked.micro_batch // 2**k},
                   reverse=True)
    fsdp = [False, True] if asked.gpus > 1 else [False]
    teachers = list(dict.fromkeys([asked.teacher, "bfloat16", "cache", "int8"]))
    optims = list(dict.fromkeys([asked.optimizer, "adamw_8bit"]))
    ckpt = list(dict.fromkeys([asked.gradient_checkpointing, True]))
    return [replace(asked, fsdp=f or asked.fsdp, teacher=t, optimizer=op, gradient_checkpointing=g, micro_batch=b)
            for f, t, op, g, b in itertools.product(fsdp, teachers, optims, ckpt, sizes)]


def plan(teacher: str | Path, *, gpus: int, gpu_gb: float, seq_len: int = 2048, micro_batch: int = 8,
         teacher_dtype: str = "float32", optimizer: str = "adamw", gradient_checkpointing: bool = False,
         fsdp: bool = False, activation_dtype: str = "bfloat16", config=None) -> Plan:
    """Estimate per-rank memory of distilling ``teacher`` as asked and recommend the cheapest option set that fits.

    Args:
        teacher: a model folder, its ``config.json`` or a hub id (only the config is read).
        gpus, gpu_gb: the ranks and each one's memory in GB (1e9 bytes).
        seq_len, micro_batch: tokens per sequence and sequences per rank and micro-step.
        teacher_dtype: ``bfloat16``, ``int8``, ``float32`` or ``cache`` (a teacher-logit cache, no teacher).
        optimizer: ``adamw`` or ``adamw_8bit``.
        gradient_checkpointing, fsdp: as asked (the recommendation may add them).
        activation_dtype: ``bfloat16`` (``--bf16``) or ``float32``.
        config: a ``PretrainedConfig`` to use instead of reading ``teacher``.
    """
    for name, value, lo in (("--gpus", gpus, 1), ("--max_seq_length", seq_len, 1), ("--micro_batch", micro_batch, 1)):
        if not isinstance(value, int) or value < lo:
            raise UserError(f"{name} must be an integer >= {lo}, got {value!r}")
    if not gpu_gb > 0:
        raise UserError(f"--gpu_memory_gb must be > 0, got {gpu_gb!r}")
    if usable_bytes(gpu_gb) <= 0:
        raise UserError(f"--gpu_memory_gb {gpu_gb:g} leaves nothing after the {CUDA_RESERVE_GB:g} GB CUDA reserve")
    if teacher_dtype not in TEACHER_DTYPES:
        raise UserError(f"--teacher_dtype {teacher_dtype!r} is not one of {', '.join(TEACHER_DTYPES)}")
    if optimizer not in OPTIMIZERS:
        raise UserError(f"--optimizer {optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if activation_dtype not in ("bfloat16", "float32"):
        raise UserError(f"--activation_dtype {activation_dtype!r} is not bfloat16 or float32")
    if fsdp and gpus < 2:
        raise UserError("--fsdp needs --gpus 2 or more (one rank has nothing to shard over)")
    shape = model_shape(config if config is not None else read_teacher_config(teacher))
    asked = Options(gpus=gpus, fsdp=fsdp, teacher=teacher_dtype, optimizer=optimizer,
                    gradient_checkpointing=gradient_checkpointing, micro_batch=micro_batch, seq_len=seq_len,
                    activation_dtype=activation_dtype)
    limit = usable_bytes(gpu_gb)
    scored = [(o.cost(asked), estimate_memory(shape, o).total, o) for o in _candidates(asked)]
    fitting = sorted((c, t, i, o) for i, (c, t, o) in enumerate(scored) if t <= limit)
    smallest = min(scored, key=lambda s: s[1])[2]
    best = fitting[0][3] if fitting else None
    return Plan(teacher=str(teacher), shape=shape, gpu_gb=gpu_gb, asked=asked,
                asked_estimate=estimate_memory(shape, asked), recommended=best,
                recommended_estimate=estimate_memory(shape, best) if best else None,
                smallest=smallest, smallest_estimate=estimate_memory(shape, smallest))
