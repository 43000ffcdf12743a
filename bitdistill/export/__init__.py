"""Export: the Hugging Face ``bitnet`` packed format (``format``), its writer (``writer``) and loader (``loader``)."""

from bitdistill.export.format import DEFAULT_MAX_SHARD_BYTES, is_packed_config, packed_quantization_config
from bitdistill.export.loader import load_packed, unpack_to_student
from bitdistill.export.memory import pack_in_memory
from bitdistill.export.writer import PackReport, pack_model, save_packed

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
