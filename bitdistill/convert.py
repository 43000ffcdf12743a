"""Convert a pretrained causal LM into a BitNet student folder (latent weights + the student marker).

The student folder is an ordinary ``save_pretrained`` folder whose ``config.json`` carries the
``bitdistill`` marker; :func:`bitdistill.load_student` loads it back as BitLinear layers, and
``bitdistill pack`` / ``bitdistill distill`` take it as input.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from bitdistill.errors import UserError
from bitdistill.io import atomic_output_dir, check_output_location
from bitdistill.nn.replace import (
    ConversionReport,
    is_student_folder,
    load_student,
    replace_linear_with_bitlinear,
)
from bitdistill.weights import (
    check_shapes,
    check_source,
    from_local_folder,
    is_local_source,
    read_config,
    tensor_index,
    validate_loaded,
    weight_files,
)

__all__ = ["TOKENIZER_FILES", "convert_pretrained", "load_causal_lm", "load_model", "parse_dtype"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bf16"``/``"bfloat16"``/``"fp16"``/``"float32"``... -> ``torch.dtype``."""
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[name]


def load_causal_lm(src: str | Path, *, gguf_file: str | None = None, dtype: str | torch.dtype = "float32",
                   trust_remote_code: bool = False):
    """Load a causal LM from a folder, a hub id, a GGUF file, or ``tiny:<arch>`` (a random tiny model).

    GGUF-loaded models are copied into a fresh model of the same config, because transformers
    refuses to ``save_pretrained`` a GGUF-loaded model.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = parse_dtype(dtype)
    src = str(src)
    if src.startswith("tiny:"):
        from bitdistill.models import tiny_model

        return tiny_model(src.split(":", 1)[1], dtype=torch_dtype)
    check_source(src)
    local = is_local_source(src)
    if local and gguf_file is not None:
        if not (Path(src) / gguf_file).is_file():
            raise FileNotFoundError(f"{Path(src) / gguf_file} does not exist; --gguf_file names a file inside {src}")
    elif local:
        read_config(src)
        tensor_index(src)
    kwargs = {"gguf_file": gguf_file, "dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if local:
        if gguf_file is None:
            check_shapes(src, from_local_folder(AutoConfig.from_pretrained, src))
        model = from_local_folder(AutoModelForCausalLM.from_pretrained, src, model=True, **kwargs)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
        except OSError as exc:
            raise UserError(f"cannot load {src!r} from the Hugging Face hub ({str(exc).strip().splitlines()[0]}); "
                            "pass a local model folder or check the id and your connection") from exc
    if local and gguf_file is None:
        validate_loaded(model, src, check_files=bool(weight_files(src)))
    if gguf_file is not None:
        fresh = AutoModelForCausalLM.from_config(model.config, dtype=torch_dtype)
        fresh.load_state_dict(model.state_dict())
        fresh.generation_config = model.generation_config
        model = fresh
    return model.eval()


def load_model(src: str | Path, *, gguf_file: str | None = None, dtype: str | torch.dtype = "float32"):
    """A bitdistill student folder as BitLinear layers (:func:`load_student`); anything else via :func:`load_causal_lm`."""
    if gguf_file is None and is_student_folder(src):
        return load_student(src, dtype=parse_dtype(dtype))
    return load_causal_lm(src, gguf_file=gguf_file, dtype=dtype)


def convert_pretrained(
    src: str | Path,
    out: str | Path,
    *,
    modules_to_not_convert: Iterable[str] = ("lm_head",),
    use_rms_norm: bool = False,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "float32",
    overwrite: bool = False,
) -> ConversionReport:
    """Load ``src``, convert its linear layers to BitLinear and save the student folder ``out``.

    ``out`` is written atomically (temporary folder, then rename) and never overwritten unless
    ``overwrite``. Tokenizer and generation-config files next to ``src`` are copied.
    """
    out = Path(out)
    sources = [src] if not str(src).startswith("tiny:") and is_local_source(src) else []
    check_output_location(out, sources)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    model = load_causal_lm(src, gguf_file=gguf_file, dtype=dtype)
    report = replace_linear_with_bitlinear(model, modules_to_not_convert=modules_to_not_convert,
                                           use_rms_norm=use_rms_norm)
    if not report.converted and not report.already_converted:
        raise UserError(f"{src} has no linear layer to convert outside the skip list")
    with atomic_output_dir(out, overwrite=overwrite, sources=sources) as tmp:
        model.save_pretrained(tmp)
        src_dir = Path(str(src))
        if src_dir.is_dir():
            for name in TOKENIZER_FILES:
                if (src_dir / name).is_file() and not (tmp / name).exists():
                    shutil.copy2(src_dir / name, tmp / name)
    return report
