"""Argument dataclasses of ``bitdistill distill`` / ``cache-teacher``, parsed with ``HfArgumentParser``.

Every field is a CLI flag (``--name value``) and a key of a YAML/JSON config file (``--config FILE``);
flags given on the command line override the file. Training options (``--output_dir``,
``--max_steps``, ``--learning_rate``, ``--per_device_train_batch_size``, ``--gradient_accumulation_steps``,
``--save_steps``, ``--eval_steps``, ``--logging_steps``, ``--report_to``, ``--resume_from_checkpoint``,
``--bf16``, ``--gradient_checkpointing``, ``--gradient_checkpointing_kwargs '{"use_reentrant": false}'``, ...)
are those of ``transformers.TrainingArguments``.
"""

from dataclasses import dataclass, field

from bitdistill.data.args import DataArguments
from bitdistill.distill.layer_map import LAYER_MAP_STRATEGIES
from bitdistill.distill.losses import LOGIT_LOSSES
from bitdistill.nn.subln import SUBLN_INITS

__all__ = ["DISTILL_DEFAULTS", "BudgetArguments", "CacheArguments", "DataArguments", "EvalTaskArguments", "LossArguments",
           "ModelArguments"]

# The defaults of ``bitdistill distill`` and of ``bitdistill recover``'s e2e stage, in place of the dataclasses'
# (the Trainer's learning rate 5e-5 and 8 sequences a step, 512-token blocks, no SubLN, logits only): the e2e recipe
# of the budget curve (docs/distill.md), whose learning rate, micro-batch, sequence length and hidden-state loss were
# chosen on held-out blocks. ``--config`` keys override them and flags override both; code that builds the dataclasses itself keeps the
# dataclasses' defaults.
DISTILL_DEFAULTS: dict[str, object] = {
    "max_seq_length": 128, "per_device_train_batch_size": 2, "learning_rate": 1e-3, "lr_scheduler_type": "linear",
    "warmup_steps": 10, "weight_decay": 0.0, "logits_weight": 1.0, "logits_loss": "forward_kl",
    "attention_weight": 1.0, "attention_layers": [-1], "hidden_weight": 5.0, "hidden_loss": "cosine", "subln": True,
}


@dataclass
class ModelArguments:
    """Teacher and student models."""

    teacher_model_name_or_path: str | None = field(default=None, metadata={
        "help": "Teacher: a model folder, a hub id, a folder holding --teacher_gguf_file, or tiny:<arch>."})
    teacher_gguf_file: str | None = field(default=None, metadata={"help": "GGUF file name inside the teacher folder."})
    teacher_load_in_8bit: bool = field(default=False, metadata={"help": "Load the teacher in 8 bit (CUDA, bitsandbytes)."})
    teacher_load_in_4bit: bool = field(default=False, metadata={"help": "Load the teacher in 4 bit (CUDA, bitsandbytes)."})
    student_model_name_or_path: str | None = field(default=None, metadata={
        "help": "Student initialization (folder, hub id, bitdistill student, tiny:<arch>); default: a copy of the teacher."})
    student_gguf_file: str | None = field(default=None, metadata={"help": "GGUF file name inside the student folder."})
    student_config: str | None = field(default=None, metadata={
        "help": "Build a fresh (randomly initialized) student from this config: a config.json file, a folder "
                "holding one, or tiny:<arch>. Excludes --student_model_name_or_path."})
    transfer_embeddings: bool = field(default=False, metadata={
        "help": "With --student_config: copy the teacher's input embedding and output head into the student "
                "(same vocabulary and hidden size required)."})
    freeze_embeddings: bool = field(default=False, metadata={
        "help": "Do not train the student's input embedding (with tied embeddings this freezes the head too)."})
    freeze_lm_head: bool = field(default=False, metadata={
        "help": "Do not train the student's output head (with tied embeddings this freezes the embedding too)."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "Tokenizer folder or hub id; default: the teacher's (or the GGUF's)."})
    model_dtype: str = field(default="float32", metadata={"help": "dtype to load both models in (float32, bfloat16, float16)."})
    modules_to_not_convert: list[str] = field(default_factory=lambda: ["lm_head"], metadata={
        "help": "Module patterns of the student kept full precision."})
    subln: bool = field(default=False, metadata={"help": "Insert SubLN (RMSNorm before o_proj and down_proj)."})
    weight_scale: str = field(default="tensor", metadata={
        "help": "Ternary weight scales of a student converted here: tensor (one absmean scale per weight, BitNet "
                "b1.58) or row (one per output row; packs into bitdistill's extension, not plain transformers)."})
    recipe_defaults: list[str] = field(default_factory=list, metadata={
        "help": "Options left at the command's recipe defaults (set by distill/recover): a default recipe part the "
                "architecture cannot take (SubLN, the attention-relation loss) is skipped with one printed line; "
                "one set explicitly is refused."})
    subln_init: str = field(default="calibrated", metadata={"help": f"SubLN weight init: {', '.join(SUBLN_INITS)}."})
    subln_eps: float | None = field(default=None, metadata={
        "help": "SubLN RMSNorm epsilon; default: the model's rms_norm_eps (1e-6 if it has none)."})
    quant_warmup_steps: int = field(default=0, metadata={
        "help": "Blend each BitLinear from full precision to ternary over this many optimizer steps (0: off)."})


@dataclass
class LossArguments:
    """Loss terms and their weights; the total is the weighted sum."""

    ce_weight: float = field(default=0.0, metadata={"help": "Weight of cross-entropy on the labels."})
    logits_weight: float = field(default=1.0, metadata={"help": "Weight of the logit distillation loss."})
    logits_loss: str = field(default="forward_kl", metadata={"help": f"Logit loss: {', '.join(LOGIT_LOSSES)}."})
    temperature: float = field(default=1.0, metadata={"help": "Distillation temperature (divergences scaled by tau^2)."})
    jsd_beta: float = field(default=0.5, metadata={"help": "beta of the generalized JSD."})
    skew_alpha: float = field(default=0.1, metadata={"help": "alpha of the skew KL."})
    hidden_weight: float = field(default=0.0, metadata={"help": "Weight of the hidden-state loss."})
    hidden_loss: str = field(default="mse", metadata={"help": "Hidden-state loss: mse or cosine."})
    hidden_layer_map: str = field(default="uniform+last", metadata={
        "help": f"Layer map: {', '.join(LAYER_MAP_STRATEGIES)}, or explicit 's:t,s:t1+t2'."})
    hidden_projector: bool = field(default=False, metadata={
        "help": "Learn a linear projector per mapped layer (automatic when widths differ)."})
    attention_weight: float = field(default=0.0, metadata={"help": "Weight of the MiniLMv2 Q/K/V relation loss."})
    attention_layers: list[int] = field(default_factory=lambda: [-1], metadata={
        "help": "Student blocks (0-based, negative from the end) for the relation loss; the teacher block at the "
                "same relative depth is used."})
    attention_relation_heads: int = field(default=8, metadata={"help": "Number of relation heads."})
    teacher_cache: str | None = field(default=None, metadata={
        "help": "Folder written by `bitdistill cache-teacher`: train from cached top-k teacher logits, no teacher."})


@dataclass
class CacheArguments:
    """Options of ``bitdistill cache-teacher``."""

    cache_dir: str | None = field(default=None, metadata={"help": "Output folder of the teacher cache."})
    top_k: int = field(default=64, metadata={"help": "Teacher logits kept per position."})
    cache_temperature: float = field(default=1.0, metadata={"help": "Temperature (must match distill's --temperature)."})
    cache_batch_size: int = field(default=4, metadata={"help": "Blocks per teacher forward."})
    cache_dtype: str = field(default="float32", metadata={"help": "dtype of the stored log-probs."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing cache folder."})


@dataclass
class EvalTaskArguments:
    """Downstream tasks (lm-eval-harness, ``pip install 'bitdistill[eval]'``) run at the end of ``distill``."""

    eval_tasks: list[str] = field(default_factory=list, metadata={
        "help": "lm-eval task names run on the teacher, the student and the packed student at the end "
                "(e.g. wikitext_lastword, hellaswag); `bitdistill eval --list_tasks` lists them."})
    eval_tasks_limit: int | None = field(default=None, metadata={"help": "Score only the first N examples per task."})
    eval_tasks_batch_size: int = field(default=1, metadata={"help": "lm-eval batch size."})
    eval_tasks_data_dir: str | None = field(default=None, metadata={
        "help": "Folder holding wiki.test.raw for the local wikitext_lastword task (default: see docs/eval.md)."})


@dataclass
class BudgetArguments:
    """A CPU-time budget in place of a step count (``bitdistill distill`` and ``self-distill``; ``recover`` has its
    own)."""

    time_budget: str | None = field(default=None, metadata={
        "help": "Train for this much process CPU time (90m, 1.5h, 600s) instead of --max_steps: the learning-rate "
                "schedule is fit to the steps it buys, measured on the first steps and refit as their cost drifts. "
                "Loading and the evaluations before and after training are not counted."})
