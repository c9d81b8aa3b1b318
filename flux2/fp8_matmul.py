"""`model.fp8_matmul`: the frozen block Linears multiply in float8 (e4m3) with `torch._scaled_mm`.

The weight-only fp8 of flux2/fp8.py saves memory but dequantises every weight to bf16 on every call, so it is
slower than bf16. Here the weight is stored as fp8 values with one float32 scale per output row (flux2.fp8's
quantize_blockwise with a block as wide as the row) and the product itself runs on the fp8 tensor cores:

- forward: each token's activations are scaled by their own max (row-wise) and rounded to e4m3, then
  `_scaled_mm(x_q, W_q^T, scale_x, scale_W)`. The quantisation is plain torch code inside the block, so under
  `train.compile` the compiler fuses it into the kernel that produces the activations.
- backward (input gradient only: the base is frozen): dx = g W = (g * scale_W) W_q, so the weight's row scales
  are folded into the gradient, which is then quantised per token like the activations, and multiplied with the
  same fp8 values. No weight gradient, no dequantised copy of the weight.

The LoRA update is added by its hook beside the product, from the unquantised input, in the LoRA's dtype.
e4m3 keeps 3 mantissa bits: a single product has a relative error of about 3.6% on Gaussian data; a block's output
(residual included) about 1% (tests/test_fp8_matmul.py states and asserts both). fp8 products need a GPU with fp8
tensor cores (compute capability 8.9: L4, L40S, H100, H200, B200); on a CPU they run (slowly) for tests.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from flux2.fp8 import FP8_DTYPE, FP8_MAX, Fp8Linear, dit_block_linear, replace_linears

MIN_CAPABILITY = (8, 9)


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """(M, K) -> e4m3 values (M, K) and float32 scales (M, 1), one per row: x ~ values * scale."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


class _Fp8Product(torch.autograd.Function):
    """y = x W^T with W = values * scale^T (scale: (1, N), one per output row); gradient for x only."""

    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, scale: Tensor, out_dtype: torch.dtype) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        xq, x_scale = quantize_rows(x2)
        out = torch._scaled_mm(xq, values.t(), scale_a=x_scale, scale_b=scale, out_dtype=out_dtype)
        ctx.save_for_backward(values, scale)
        ctx.x_dtype = x.dtype
        return out.reshape(*x.shape[:-1], values.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor):
        values, scale = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1]).float() * scale  # (M, N) * (1, N): W's row scales into g
        gq, g_scale = quantize_rows(g2)
        ones = torch.ones(1, values.shape[1], device=values.device, dtype=torch.float32)
        # _scaled_mm wants its second operand column-major: a transposed copy of the fp8 values (1 byte/weight).
        dx = torch._scaled_mm(gq, values.t().contiguous().t(), scale_a=g_scale, scale_b=ones, out_dtype=grad.dtype)
        return dx.reshape(*grad.shape[:-1], values.shape[1]).to(ctx.x_dtype), None, None, None


def product_dtype(x: Tensor) -> torch.dtype:
    """The output dtype of a product: the autocast dtype when autocast is on; on CUDA row-wise scaled products
    write bfloat16 only."""
    if x.is_cuda:
        return torch.bfloat16
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class Fp8MatmulLinear(Fp8Linear):
    """A frozen Linear stored as e4m3 values with float32 row-wise scales, multiplied in fp8 (`_scaled_mm`).

    An Fp8Linear (block size = the row), so LoRA attaches to it and merges into it as into any fp8 Linear."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__(weight, bias, block_size=weight.shape[1], scale_dtype=torch.float32)

    def forward(self, x: Tensor) -> Tensor:
        out = _Fp8Product.apply(x, self.weight, self.scale_weight.view(1, -1), product_dtype(x))
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 row-wise, fp8 products"


def use_fp8_matmuls(model: nn.Module, predicate: Callable[[str, nn.Linear], bool]) -> int:
    """Replace, in place, every plain nn.Linear of `model` for which predicate(dotted_name, module) holds by an
    Fp8MatmulLinear, on the Linear's device (quantised a chunk of rows at a time: no float32 copy of a layer).
    Returns how many were replaced."""
    return replace_linears(model, predicate, lambda linear: Fp8MatmulLinear(linear.weight, linear.bias))


def check_device(device: torch.device) -> None:
    """ValueError unless `device` multiplies in fp8 (a CPU does, slowly: for tests)."""
    if device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise ValueError(f"model.fp8_matmul: {torch.cuda.get_device_name(device)} (compute capability "
                         f"{capability[0]}.{capability[1]}) has no fp8 tensor cores (8.9 or newer: L4, L40S, H100, "
                         "H200, B200); use model.fp8_scaled for fp8 weights without fp8 products")


def apply_fp8_matmul(dit: nn.Module, device: torch.device) -> None:
    """`model.fp8_matmul` / `--fp8_matmul` on a loaded DiT: every block Linear multiplies in fp8 (before any LoRA
    hook is attached: the hooks live on the Linears this replaces)."""
    check_device(device)
    use_fp8_matmuls(dit, dit_block_linear)
