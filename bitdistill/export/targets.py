"""Where a student can go: the packed folder, plain transformers, llama.cpp; decided from its config alone.

:func:`export_targets` answers, before any training, what ``bitdistill pack`` will write for a student of a
given architecture (with SubLN or without): every student packs (the ``bitnet`` format, transformers'
``BitNetForCausalLM``, or bitdistill's documented extension of the format), plain transformers loads it where
an exact mapping exists, and GGUF goes where llama.cpp's graph can express it. ``distill`` and ``recover`` print
its line before training; ``docs/pack.md``'s table is checked against it.
"""

from __future__ import annotations

from dataclasses import dataclass

from bitdistill.export.bitnet_arch import bitnet_arch_config, bitnet_unmappable
from bitdistill.export.gguf import bitnet_graph_unsupported, gguf_graph_unsupported
from bitdistill.nn.arch import lookup

__all__ = ["PER_ROW_NOT_TRANSFORMERS", "ExportTargets", "export_targets"]


@dataclass(frozen=True)
class ExportTargets:
    """What a student packs to and who loads it.

    Attributes:
        packed: the packed folder's form: ``"bitnet"`` (the Hugging Face format of the student's own
            architecture), ``"bitnet-arch"`` (transformers' ``BitNetForCausalLM``) or ``"extension"``.
        transformers: ``None`` where plain transformers loads the packed folder exactly, else why not.
        llama_cpp: ``None`` where ``--format gguf`` writes a file llama.cpp runs exactly, else why not.
        gguf_arch: llama.cpp's architecture name when it does.
    """

    packed: str
    transformers: str | None
    llama_cpp: str | None
    gguf_arch: str | None

    def line(self) -> str:
        """One line: the formats this student will export to, and those it will not, with the reason."""
        form = {"bitnet": "bitnet format", "bitnet-arch": "bitnet format as BitNetForCausalLM",
                "extension": "bitdistill's extension of the bitnet format"}[self.packed]
        parts = [f"packed folder ({form}, load_packed)"]
        parts.append("plain transformers" if self.transformers is None else f"not plain transformers ({self.transformers})")
        parts.append(f"llama.cpp GGUF ({self.gguf_arch})" if self.llama_cpp is None else
                     f"not llama.cpp ({self.llama_cpp})")
        return "the student will export to: " + "; ".join(parts)


#: Why plain transformers cannot load a per-row student (``BitNetConfig(weight_scale="row")``).
PER_ROW_NOT_TRANSFORMERS = "per-row weight scales: transformers' bitnet loader holds one weight scale per tensor"


def export_targets(config, *, subln: bool, weight_scale: str = "tensor") -> ExportTargets:
    """The formats a student of ``config`` (a transformers config; SubLN inserted or not) exports to.

    ``bitdistill pack`` and ``--format gguf`` decide from the trained student itself; this is the same decision
    from its config, so runs can print it before training (tests check the two agree on every listed architecture).
    A per-row student (``weight_scale="row"``) always packs into the extension; GGUF is unchanged (each 256-wide
    block of a row stores its row's scale).
    """
    targets = _targets(config, subln=subln)
    if weight_scale == "row":
        return ExportTargets("extension", PER_ROW_NOT_TRANSFORMERS, targets.llama_cpp, targets.gguf_arch)
    return targets


def _targets(config, *, subln: bool) -> ExportTargets:
    spec = lookup(config)
    if subln:
        unmappable = bitnet_unmappable(config)
        if unmappable is None:
            graph = bitnet_graph_unsupported(bitnet_arch_config(config))
            return ExportTargets("bitnet-arch", None, graph, None if graph else "bitnet")
        return ExportTargets("extension", f"no transformers architecture has its SubLN layout: {unmappable}",
                             f"llama.cpp's only graph with SubLN is bitnet (a Llama block), and {unmappable}", None)
    why = gguf_graph_unsupported(config)
    gguf_arch = None if why else spec.gguf
    if spec is not None and spec.conv1d:
        transformers = "its Conv1D projections are not nn.Linear, which transformers' bitnet loader converts"
        return ExportTargets("extension", transformers, why, gguf_arch)
    return ExportTargets("bitnet", None, why, gguf_arch)
