"""``DataArguments``: the training and evaluation text of ``distill``, ``cache-teacher`` and ``self-distill``.

Parsed with ``HfArgumentParser``: every field is a CLI flag and a key of a ``--config`` file.
"""

from dataclasses import dataclass, field

__all__ = ["DataArguments"]


@dataclass
class DataArguments:
    """Training text and evaluation text."""

    train_files: list[str] = field(default_factory=list, metadata={"help": "Local training text files (concatenated)."})
    dataset_name: str | None = field(default=None, metadata={"help": "A `datasets` dataset name (instead of files)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The `datasets` config name."})
    dataset_split: str = field(default="train", metadata={"help": "The `datasets` split for training."})
    text_column: str = field(default="text", metadata={"help": "The `datasets` text column."})
    max_seq_length: int = field(default=512, metadata={"help": "Block length in tokens."})
    max_train_blocks: int | None = field(default=None, metadata={"help": "Use only the first N training blocks."})
    validation_blocks: int = field(default=0, metadata={
        "help": "Hold out the last N training blocks for the trainer's eval loss (0: none)."})
    eval_files: list[str] = field(default_factory=list, metadata={
        "help": "Text files for strided perplexity (e.g. wiki.test.raw), at start, eval steps and end."})
    eval_stride: int | None = field(default=None, metadata={"help": "Perplexity stride (default: max_seq_length)."})
    eval_max_windows: int | None = field(default=None, metadata={"help": "Evaluate only the first N perplexity windows."})
    data_cache_dir: str | None = field(default=None, metadata={
        "help": "Cache of tokenized blocks (default: ~/.cache/bitdistill/data; 'none' disables)."})
