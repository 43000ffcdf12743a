"""Argument dataclasses of ``bitdistill self-distill`` (parsed with ``HfArgumentParser``; also ``--config FILE`` keys).

Data options (``--train_files``, ``--max_seq_length``, ``--eval_files``, ...) are those of
``bitdistill distill`` (:class:`bitdistill.distill.args.DataArguments`); training options are
``transformers.TrainingArguments``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bitdistill.selfdistill.exits import EXIT_VARIANTS

__all__ = ["EXIT_MODES", "SelfDistillArguments", "SelfDistillModelArguments"]

# "none" trains the plain LM loss; evaluation still reads every block through the shared head.
EXIT_MODES = ("none", *EXIT_VARIANTS)


@dataclass
class SelfDistillModelArguments:
    """The model trained: pretrained weights or a fresh one from a config, full precision or BitNet."""

    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Pretrained model: a folder, hub id, a folder holding --gguf_file, a bitdistill student, or tiny:<arch>."})
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file name inside the model folder."})
    model_config: str | None = field(default=None, metadata={
        "help": "Train from scratch: a config.json (or a folder holding one); random init from --seed."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "Tokenizer folder or hub id; default: the model's (required with --model_config)."})
    model_dtype: str = field(default="float32", metadata={"help": "dtype to load the model in (float32, bfloat16, float16)."})
    bitnet: bool = field(default=False, metadata={
        "help": "Convert the model's linear layers to BitLinear (ternary weights, int8 activations) before training."})
    modules_to_not_convert: list[str] = field(default_factory=lambda: ["lm_head"], metadata={
        "help": "With --bitnet: module patterns kept full precision."})


@dataclass
class SelfDistillArguments:
    """Exits and the "Be Your Own Teacher" loss (defaults from the paper's code)."""

    exit_variant: str = field(default="shared", metadata={
        "help": f"Exits: {', '.join(EXIT_MODES)}. shared: the model's norm+head after each block; separate: a copy "
                "per exit; concat: one classifier over all blocks' features; none: plain LM training."})
    exit_layers: list[int] | None = field(default=None, metadata={
        "help": "0-based blocks to put exits after (negative from the end); default: every block but the last."})
    alpha: float = field(default=0.1, metadata={"help": "Per exit: (1 - alpha) CE + alpha tau^2 KL to the deepest exit."})
    temperature: float = field(default=3.0, metadata={"help": "tau, softmax temperature of the KL term."})
    hint_weight: float = field(default=1e-6, metadata={
        "help": "lambda, weight of the L2 hints bottleneck(h_i) -> h_deepest; must be 0 with --exit_variant concat. "
                "With --exit_variant none the loss options are unused."})
    exit_weights: list[float] | None = field(default=None, metadata={"help": "w_i per non-deepest exit (default 1)."})
