"""Export: the Hugging Face ``bitnet`` packed safetensors writer/reader."""

from bitdistill.export.memory import pack_in_memory
from bitdistill.export.packed import (
    DEFAULT_MAX_SHARD_BYTES,
    PackReport,
    is_packed_config,
    load_packed,
    pack_model,
    packed_quantization_config,
    save_packed,
    unpack_to_student,
)

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "PackReport",
    "is_packed_config",
    "load_packed",
    "pack_in_memory",
    "pack_model",
    "packed_quantization_config",
    "save_packed",
    "unpack_to_student",
]
