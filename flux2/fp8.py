"""Block-wise scaled float8 (e4m3) weights: half the memory of bf16 for frozen Linear layers.

Each output row is cut into blocks of `block_size` input features; a block stores its fp8 values and one scale
(max |w| / 448). The forward pass dequantises to the activation dtype and calls F.linear, so it runs anywhere
torch has float8 dtypes (CPU included). Imports only torch.

Quantising works through a weight a chunk of rows at a time (`CHUNK_ELEMENTS`), so the float32 temporaries are
those of one chunk (16 MB), never of the whole weight (a dev `linear1` is 1.4 GB in float32); the result is the
same as quantising the whole weight at once. `frozen_linear` is the matrix product every quantised frozen Linear
here uses (fp8, and flux2.bnb_linear's NF4 and int8): its backward rebuilds the weight instead of keeping the
dequantised copy alive until backward, so training holds the quantised weights only.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
CHUNK_ELEMENTS = 1 << 22  # weights quantised per step: float32 temporaries of 16 MB


def rows_per_chunk(in_features: int, multiple: int = 64) -> int:
    """How many rows of an (out, in) weight make one quantisation chunk: about CHUNK_ELEMENTS weights, a multiple
    of `multiple` rows (so block boundaries of every format here fall on chunk boundaries)."""
    return max(multiple, CHUNK_ELEMENTS // max(in_features, 1) // multiple * multiple)


def _block_size(in_features: int, block_size: int) -> int:
    return block_size if in_features % block_size == 0 else in_features


def quantize_rows_(rows: Tensor, values: Tensor, scale: Tensor, work: Tensor) -> None:
    """Quantise `rows` (r, in) into `values` (r, in) fp8 and `scale` (r, in / block, 1), both written in place;
    the block size is in / scale.shape[1]. `work` is a float32 buffer of at least r * in elements, reused
    between chunks: the only temporary of the size of the chunk."""
    r, in_features = rows.shape
    blocks = work[:rows.numel()].view(r, scale.shape[1], -1)
    # In float32 throughout, in a reused buffer: mixed bf16 / float32 arithmetic and freshly mapped temporaries
    # were most of a CPU's time here (docs/performance.md). max |w| per block as max(max, -min): no |w|
    # temporary. The quotient never exceeds 448 (scale = max / 448, rounding stays below the midpoint to the next
    # fp8 value), so no clamp is needed before the cast.
    blocks.copy_(rows.reshape(blocks.shape))
    block_scale = torch.maximum(blocks.amax(dim=-1, keepdim=True), blocks.amin(dim=-1, keepdim=True).neg_())
    block_scale.clamp_(min=1e-8).div_(FP8_MAX)
    values.copy_(blocks.div_(block_scale).view(r, in_features))
    scale.copy_(block_scale)


def quantize_blockwise(weight: Tensor, block_size: int = 64,
                       scale_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """(out, in) weight -> fp8 values (out, in) and scales (out, in / block, 1) in `scale_dtype` (default: the
    weight's dtype).

    When `in` is not a multiple of `block_size`, one scale per row is used instead. Works a chunk of rows at a
    time (see the module docstring)."""
    out_features, in_features = weight.shape
    block_size = _block_size(in_features, block_size)
    values = torch.empty((out_features, in_features), dtype=FP8_DTYPE, device=weight.device)
    if scale_dtype is None:
        scale_dtype = weight.dtype if weight.is_floating_point() else torch.float32
    scale = torch.empty((out_features, in_features // block_size, 1), device=weight.device, dtype=scale_dtype)
    step = rows_per_chunk(in_features, 1)
    work = torch.empty(min(step, out_features) * in_features, dtype=torch.float32, device=weight.device)
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        quantize_rows_(weight[start:stop], values[start:stop], scale[start:stop], work)
    return values, scale


def dequantize_blockwise(values: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """The inverse of quantize_blockwise, in `dtype`."""
    out_features, in_features = values.shape
    blocks = values.to(dtype).reshape(out_features, scale.shape[1], -1)
    return (blocks * scale.to(dtype)).reshape(out_features, in_features)


class _FrozenLinear(torch.autograd.Function):
    """y = x W^T + b for a frozen, stored-quantised W: nothing but the shapes is saved for backward, where W is
    rebuilt to compute the input gradient (W and b get no gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, dequantize: Callable[[torch.dtype], Tensor], bias: Tensor | None) -> Tensor:
        ctx.dequantize, ctx.x_dtype = dequantize, x.dtype
        return F.linear(x, dequantize(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (grad @ ctx.dequantize(grad.dtype)).to(ctx.x_dtype), None, None


def frozen_linear(x: Tensor, dequantize: Callable[[torch.dtype], Tensor], bias: Tensor | None = None) -> Tensor:
    """F.linear(x, dequantize(dtype), bias) in the compute dtype (autocast's when it is on, else x's); when x
    needs a gradient the dequantised weight is not kept for backward but rebuilt there."""
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    if not (torch.is_grad_enabled() and x.requires_grad):
        return F.linear(x, dequantize(x.dtype), None if bias is None else bias.to(x.dtype))
    with torch.autocast(x.device.type, enabled=False):
        return _FrozenLinear.apply(x, dequantize, bias)


class Fp8Linear(nn.Module):
    """A frozen Linear whose weight is stored block-wise in fp8 (`weight`) with `scale_weight`."""

    def __init__(self, weight: Tensor, bias: Tensor | None, block_size: int = 64,
                 scale_dtype: torch.dtype | None = None):
        super().__init__()
        values, scale = quantize_blockwise(weight.detach(), block_size, scale_dtype)
        self._store(values, scale, bias)

    @classmethod
    def from_quantized(cls, values: Tensor, scale: Tensor, bias: Tensor | None = None) -> "Fp8Linear":
        """An Fp8Linear holding already-quantised values (out, in) and scales (out or 1, in / block, 1), e.g. the
        weights of a pre-quantised fp8 file, kept exactly."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._store(values, scale, bias)
        return module

    def _store(self, values: Tensor, scale: Tensor, bias: Tensor | None) -> None:
        self.out_features, self.in_features = values.shape
        self.weight = nn.Parameter(values, requires_grad=False)
        self.register_buffer("scale_weight", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @property
    def block_size(self) -> int:
        return self.in_features // self.scale_weight.shape[1]

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        return dequantize_blockwise(self.weight, self.scale_weight, dtype)

    @torch.no_grad()
    def set_weight(self, weight: Tensor) -> None:
        """Store `weight` (out, in, any float dtype) quantised again with this layer's block size."""
        values, scale = quantize_blockwise(weight.to(self.weight.device, torch.float32), self.block_size)
        self.weight = nn.Parameter(values, requires_grad=False)
        self.scale_weight = scale.to(self.scale_weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return frozen_linear(x, self.dequantized_weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 block-wise"


class Fp8Builder:
    """An Fp8Linear built from row chunks of its weight (see flux2.quantize): `add` quantises each as it comes."""

    def __init__(self, out_features: int, in_features: int, dtype: torch.dtype, device: torch.device | str,
                 block_size: int = 64):
        block_size = _block_size(in_features, block_size)
        self.values = torch.empty((out_features, in_features), dtype=FP8_DTYPE, device=device)
        self.scale = torch.empty((out_features, in_features // block_size, 1), dtype=dtype, device=device)
        self.work: Tensor | None = None  # float32 chunk buffer of adds given none, reused by them

    def add(self, start: int, rows: Tensor, work: Tensor | None = None) -> None:
        """Quantise rows [start, start + len(rows)) in the float32 buffer `work` (of at least len(rows) * in
        elements; none: the builder's own). Threads may add disjoint chunks at once, each with its own `work`."""
        stop = start + rows.shape[0]
        if work is None:
            if self.work is None or self.work.numel() < rows.numel():
                self.work = torch.empty(rows.numel(), dtype=torch.float32, device=rows.device)
            work = self.work
        quantize_rows_(rows, self.values[start:stop], self.scale[start:stop], work)

    def finish(self, bias: Tensor | None = None) -> Fp8Linear:
        self.work = None
        return Fp8Linear.from_quantized(self.values, self.scale, bias)


def fp8_bytes(out_features: int, in_features: int, scale_itemsize: int = 2, block_size: int = 64) -> int:
    """Resident bytes of an Fp8Linear's weight and scales (no bias)."""
    return out_features * in_features + out_features * (in_features // _block_size(in_features, block_size)) \
        * scale_itemsize


def replace_linears(model: nn.Module, predicate: Callable[[str, nn.Linear], bool],
                    make: Callable[[nn.Linear], nn.Module]) -> int:
    """Replace, in place, every plain nn.Linear of `model` for which predicate(dotted_name, module) holds by
    make(linear). Returns how many were replaced."""
    # type(), not isinstance: subclasses of nn.Linear here are stored quantised already (flux2.bnb_linear's NF4
    # and int8 layers), and their packed weights quantised again would be garbage.
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear and predicate(name, m)]
    for name, linear in targets:
        model.set_submodule(name, make(linear))
    return len(targets)


def quantize_linears(model: nn.Module, predicate: Callable[[str, nn.Linear], bool], block_size: int = 64) -> int:
    """Replace, in place, every plain nn.Linear of `model` for which predicate(dotted_name, module) holds by an
    Fp8Linear. Returns how many were replaced."""
    return replace_linears(model, predicate, lambda linear: Fp8Linear(linear.weight, linear.bias, block_size))


def dit_block_linear(name: str, module: nn.Linear) -> bool:
    """The DiT linears that fp8_scaled quantises: every Linear inside a double or single block."""
    return name.startswith(("double_blocks.", "single_blocks."))
