"""Convert a pretrained causal LM into a BitNet student folder (latent weights + the student marker).

The student folder is an ordinary ``save_pretrained`` folder whose ``config.json`` carries the
``bitdistill`` marker; :func:`bitdistill.load_student` loads it back as BitLinear layers, and
``bitdistill pack`` / ``bitdistill distill`` take it as input.
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from bitdistill.errors import UserError
from bitdistill.io import atomic_output_dir, check_output_location
from bitdistill.nn.config import check_weight_scale
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

__all__ = ["TOKENIZER_FILES", "check_model_source", "convert_pretrained", "load_causal_lm", "load_model",
           "parse_dtype"]

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


def check_model_source(src: str | Path, gguf_file: str | None, flag: str = "--gguf_file") -> None:
    """Fail early, in one line, on a local ``src`` that cannot be loaded as given (hub ids pass through).

    A folder without ``config.json`` that holds GGUF files names them and ``flag`` (the option that selects
    one); a ``gguf_file`` missing from ``src`` is named too, and so is a missing ``gguf`` package.
    """
    if gguf_file is not None and importlib.util.find_spec("gguf") is None:
        raise UserError(f"reading {flag} {gguf_file} needs the gguf package: pip install 'bitdistill[gguf]'")
    path = Path(str(src))
    if str(src).startswith("tiny:") or not path.exists():
        return
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            raise FileNotFoundError(f"GGUF file {gguf_file} not found in {path}; {flag} names a file inside the folder")
        return
    if path.is_file():
        hint = f"pass its folder {path.parent} and {flag} {path.name}" if path.suffix == ".gguf" else \
            "pass a model folder or a hub id"
        raise FileNotFoundError(f"{path} is a file, not a model folder; {hint}")
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if ggufs:
            raise FileNotFoundError(f"{path} has no config.json but holds the GGUF file{'s' * (len(ggufs) > 1)} "
                                    f"{', '.join(ggufs)}; pass {flag} {ggufs[0]}")
        raise FileNotFoundError(f"{path} is not a model folder (no config.json); pass a folder written by "
                                f"save_pretrained, a hub id, or a GGUF file with {flag}")


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
    check_model_source(src, gguf_file)  # first: it names the GGUF flag where a folder only holds GGUF files
    check_source(src)
    local = is_local_source(src)
    if local and gguf_file is None:
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
        config = copy.deepcopy(model.config)
        if getattr(config, "quantization_config", None) is not None:
            # the weights are dequantized: a saved {"quant_method": "gguf"} would make every later load of the
            # folder a "GGUF-quantized" model that transformers refuses to save again
            del config.quantization_config
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
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
    weight_scale: str = "tensor",
) -> ConversionReport:
    """Load ``src``, convert its linear layers to BitLinear and save the student folder ``out``.

    ``out`` is written atomically (temporary folder, then rename) and never overwritten unless
    ``overwrite``. Tokenizer and generation-config files next to ``src`` are copied; a GGUF source's
    tokenizer is read from the GGUF and saved, a ``tiny:<arch>`` source gets the byte-level
    :func:`bitdistill.models.tiny_tokenizer`, so the folder works with ``eval``, ``distill`` and ``pack``.
    ``weight_scale`` is :attr:`BitNetConfig.weight_scale` (``"tensor"`` or ``"row"``).
    """
    check_weight_scale(weight_scale)
    out = Path(out)
    sources = [src] if not str(src).startswith("tiny:") and is_local_source(src) else []
    check_output_location(out, sources)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    model = load_causal_lm(src, gguf_file=gguf_file, dtype=dtype)
    tokenizer = _tokenizer(str(src), gguf_file)
    report = replace_linear_with_bitlinear(model, modules_to_not_convert=modules_to_not_convert,
                                           use_rms_norm=use_rms_norm, weight_scale=weight_scale)
    if not report.converted and not report.already_converted:
        raise UserError(f"{src} has no linear layer to convert outside the skip list")
    with atomic_output_dir(out, overwrite=overwrite, sources=sources) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        src_dir = Path(str(src))
        if src_dir.is_dir():
            for name in TOKENIZER_FILES:
                if (src_dir / name).is_file() and not (tmp / name).exists():
                    shutil.copy2(src_dir / name, tmp / name)
    return report


def _tokenizer(src: str, gguf_file: str | None):
    """The tokenizer to save with a converted student: a GGUF's own, tiny models' byte-level one, else ``None``
    (folder sources have their tokenizer files copied)."""
    if src.startswith("tiny:"):
        from bitdistill.models import tiny_tokenizer

        return tiny_tokenizer()
    if gguf_file is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
