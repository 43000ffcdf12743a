"""2-bit packing of ternary weights in the Hugging Face ``bitnet`` layout (``linear_class: "bitlinear"``).

Ternary codes ``T`` in {-1, 0, 1} are stored as ``c = T + 1`` in {0, 1, 2}, four per byte, along
``out_features`` in four blocks of ``P = out_features / 4`` rows::

    packed[r, k] = c[r, k] | c[P + r, k] << 2 | c[2P + r, k] << 4 | c[3P + r, k] << 6

so ``packed`` is ``uint8 [out_features / 4, in_features]`` and block ``i`` of the unpacked weight
is ``(packed >> 2i) & 3`` minus one. ``out_features % 4 != 0`` cannot be expressed in this format.
"""

from __future__ import annotations

import torch

from bitdistill.quant.reference import activation_quant, int_matmul

__all__ = ["pack_ternary", "packed_linear_reference", "unpack_ternary"]


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Pack ternary codes four per byte.

    Args:
        codes: integer tensor ``[N, K]`` with values in {-1, 0, 1}; ``N % 4 == 0``. Not modified.

    Returns:
        ``uint8 [N // 4, K]``.

    Raises:
        ValueError: wrong rank, ``N % 4 != 0``, a non-integer dtype or a value outside {-1, 0, 1}.
    """
    if codes.dim() != 2:
        raise ValueError(f"pack_ternary expects a 2-D [out_features, in_features] tensor, got shape {tuple(codes.shape)}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"pack_ternary expects integer codes in {{-1, 0, 1}}, got dtype {codes.dtype}; "
                         "ternarize the weight first with bitdistill.quant.weight_quant")
    n = codes.shape[0]
    if n % 4 != 0:
        raise ValueError(f"out_features={n} is not a multiple of 4: the packed bitnet format stores 4 rows per byte; "
                         "keep this layer in full precision (add it to modules_to_not_convert)")
    if codes.numel() and (codes.min() < -1 or codes.max() > 1):
        raise ValueError(f"pack_ternary: codes must be in {{-1, 0, 1}}, found values in [{int(codes.min())}, {int(codes.max())}]")
    c = (codes.to(torch.int16) + 1).to(torch.uint8).reshape(4, n // 4, codes.shape[1])
    return c[0] | (c[1] << 2) | (c[2] << 4) | (c[3] << 6)


def unpack_ternary(packed: torch.Tensor, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`.

    Args:
        packed: ``uint8 [N // 4, K]``. Not modified.
        dtype: dtype of the result (int8 by default; a float dtype gives the codes as floats).

    Returns:
        ``[N, K]`` with values in {-1, 0, 1}.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"unpack_ternary expects a 2-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device).view(4, 1, 1)
    c = (packed.unsqueeze(0) >> shifts) & 3
    if (c == 3).any():
        raise ValueError("unpack_ternary: found the 2-bit code 3, which no ternary value maps to: the packed tensor is corrupt")
    return (c.to(torch.int8) - 1).reshape(-1, packed.shape[1]).to(dtype)


def packed_linear_reference(
    x: torch.Tensor,
    packed: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward of a packed BitLinear: ``(X_q @ T^T) / (s_x * weight_scale) + bias``.

    Args:
        x: ``[..., K]`` activations.
        packed: ``uint8 [N // 4, K]`` packed ternary weight.
        weight_scale: ``[1]`` (or 0-dim), the inverse weight scale ``1 / gamma`` as stored on disk, or ``[N]``,
            one per output row (bitdistill's extension of the format, ``docs/pack.md``).
        bias: ``[N]`` or ``None``.

    Returns:
        ``[..., N]`` in ``x``'s dtype.
    """
    w_codes = unpack_ternary(packed)
    x_codes, x_scale = activation_quant(x)
    acc = int_matmul(x_codes.reshape(-1, x.shape[-1]), w_codes)
    y = acc / (x_scale.reshape(-1, 1) * weight_scale.float().reshape(-1))
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], w_codes.shape[0])
