"""Block-wise scaled float8 (e4m3) weights: half the memory of bf16 for frozen Linear layers.

Each output row is cut into blocks of `block_size` input features; a block stores its fp8 values and one scale
(max |w| / 448). The forward pass dequantises to the activation dtype and calls F.linear, so it runs anywhere
torch has float8 dtypes (CPU included). Imports only torch.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448


def quantize_blockwise(weight: Tensor, block_size: int = 64) -> tuple[Tensor, Tensor]:
    """(out, in) weight -> fp8 values (out, in) and scales (out, in / block, 1) in the weight's dtype.

    When `in` is not a multiple of `block_size`, one scale per row is used instead.
    """
    out_features, in_features = weight.shape
    if in_features % block_size:
        block_size = in_features
    blocks = weight.float().reshape(out_features, in_features // block_size, block_size)
    scale = blocks.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / FP8_MAX
    values = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).reshape(out_features, in_features)
    return values, scale.to(weight.dtype if weight.is_floating_point() else torch.float32)


def dequantize_blockwise(values: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """The inverse of quantize_blockwise, in `dtype`."""
    out_features, in_features = values.shape
    blocks = values.to(dtype).reshape(out_features, scale.shape[1], -1)
    return (blocks * scale.to(dtype)).reshape(out_features, in_features)


class Fp8Linear(nn.Module):
    """A frozen Linear whose weight is stored block-wise in fp8 (`weight`) with `scale_weight`."""

    def __init__(self, weight: Tensor, bias: Tensor | None, block_size: int = 64):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        values, scale = quantize_blockwise(weight.detach(), block_size)
        self.weight = nn.Parameter(values, requires_grad=False)
        self.register_buffer("scale_weight", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        return dequantize_blockwise(self.weight, self.scale_weight, dtype)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 block-wise"


def quantize_linears(model: nn.Module, predicate: Callable[[str, nn.Linear], bool], block_size: int = 64) -> int:
    """Replace, in place, every nn.Linear of `model` for which predicate(dotted_name, module) holds by an
    Fp8Linear. Returns how many were replaced."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and predicate(name, m)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Fp8Linear(linear.weight, linear.bias, block_size))
    return len(targets)


def dit_block_linear(name: str, module: nn.Linear) -> bool:
    """The DiT linears that fp8_scaled quantises: every Linear inside a double or single block."""
    return name.startswith(("double_blocks.", "single_blocks."))
