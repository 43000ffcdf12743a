"""Recovering a ternary student's quality: calibrated ternary initialization, block-wise reconstruction, and the
staged recipe that runs them before end-to-end KD within a CPU-time budget (see docs/distill.md)."""

from bitdistill.nn.arch import decoder_layers
from bitdistill.recover.blockwise import (
    BlockwiseConfig,
    BlockwiseReport,
    block_loss,
    reconstruct_blocks_in_place,
)
from bitdistill.recover.joint import JointConfig, JointReport, reconstruct_jointly_in_place
from bitdistill.recover.layers import capture_layer_call, layer_output
from bitdistill.recover.ternary import (
    TernaryFit,
    calibrated_ternary,
    encode_ternary,
    gptq_ternary,
    output_error,
)

__all__ = [
    "BlockwiseConfig",
    "BlockwiseReport",
    "JointConfig",
    "JointReport",
    "TernaryFit",
    "block_loss",
    "calibrated_ternary",
    "capture_layer_call",
    "decoder_layers",
    "encode_ternary",
    "gptq_ternary",
    "layer_output",
    "output_error",
    "reconstruct_blocks_in_place",
    "reconstruct_jointly_in_place",
]
