"""4-bit (NF4) and 8-bit (int8) frozen Linear weights in bitsandbytes' formats, for QLoRA training and low-memory
inference: the LoRA (flux2.lora's forward hooks) trains on top of them.

- `Nf4Linear` (a bitsandbytes `Linear4bit`): NF4 values, two per byte; each block of 64 weights has an absmax,
  and the absmaxes are themselves 8-bit quantised in blocks of 256 (bitsandbytes' double quantisation,
  `compress_statistics`): 0.516 bytes per weight.
- `Int8Linear` (a bitsandbytes `Linear8bitLt`): the LLM.int8 storage, one int8 per weight with a float32
  absmax per output row (`SCB`): 1 byte per weight. Weight-only: the forward pass dequantises the weight to the
  activation dtype. bitsandbytes' own int8 product would also round the activations to int8 after casting them
  to float16, whose range FLUX's activations exceed.

Both compute with `flux2.fp8.frozen_linear` (the dequantised weight is rebuilt in backward, not kept) and are
built from row chunks (`Nf4Builder`, `Int8Builder`), so quantising a weight holds one chunk of it in float32 at a
time; the result equals bitsandbytes quantising the whole weight at once (tests/test_quantize.py). bitsandbytes
runs these formats on the CPU as well as on CUDA. Importing this module imports bitsandbytes (seconds): other
modules import it only when a 4/8-bit mode is asked for.
"""
from __future__ import annotations

import math

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
from torch import Tensor, nn

from flux2.fp8 import frozen_linear, rows_per_chunk

NF4_BLOCK = 64  # weights per absmax
NF4_NESTED_BLOCK = 256  # absmaxes per nested (second-level) scale


class Nf4Linear(bnb.nn.Linear4bit):
    """A frozen Linear stored in bitsandbytes' NF4 format with double quantisation."""

    def __init__(self, packed: Tensor, quant_state: bnbf.QuantState, bias: Tensor | None = None):
        out_features, in_features = quant_state.shape
        super().__init__(in_features, out_features, bias=False, compute_dtype=quant_state.dtype,
                         compress_statistics=True, quant_type="nf4", device="meta")
        self.support_avx512bf16_for_cpu = False  # bitsandbytes would repack the weight in place for CPU inference
        self._store(packed, quant_state, bias)

    def _store(self, packed: Tensor, quant_state: bnbf.QuantState, bias: Tensor | None) -> None:
        self.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=quant_state, blocksize=NF4_BLOCK,
                                        compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8,
                                        module=self, bnb_quantized=True)
        self.quant_state = quant_state
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        return bnbf.dequantize_4bit(self.weight.data, self.weight.quant_state).to(dtype)

    @torch.no_grad()
    def set_weight(self, weight: Tensor) -> None:
        """Store `weight` (out, in) quantised again (a LoRA merge)."""
        builder = Nf4Builder(self.out_features, self.in_features, self.quant_state.dtype, self.weight.device)
        _add_in_chunks(builder, weight)
        fresh = builder.finish()
        self._store(fresh.weight.data, fresh.quant_state, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return frozen_linear(x, self.dequantized_weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4"


class Int8Linear(bnb.nn.Linear8bitLt):
    """A frozen Linear stored in bitsandbytes' LLM.int8 format (row-wise absmax), used weight-only."""

    def __init__(self, cb: Tensor, scb: Tensor, bias: Tensor | None = None):
        out_features, in_features = cb.shape
        super().__init__(in_features, out_features, bias=False, has_fp16_weights=False, threshold=0.0,
                         device="meta")
        self._store(cb, scb, bias)

    def _store(self, cb: Tensor, scb: Tensor, bias: Tensor | None) -> None:
        self.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        # int8 values are exact in bf16; one rounding of the product, and no float32 copy of the whole weight.
        return self.weight.data.to(dtype) * (self.weight.SCB / 127.0).to(dtype).unsqueeze(1)

    @torch.no_grad()
    def set_weight(self, weight: Tensor) -> None:
        """Store `weight` (out, in) quantised again (a LoRA merge)."""
        builder = Int8Builder(self.out_features, self.in_features, self.weight.device)
        _add_in_chunks(builder, weight)
        fresh = builder.finish()
        self._store(fresh.weight.data, fresh.weight.SCB, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return frozen_linear(x, self.dequantized_weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 (weight-only)"


def _add_in_chunks(builder, weight: Tensor) -> None:
    step = rows_per_chunk(weight.shape[1])
    for start in range(0, weight.shape[0], step):
        builder.add(start, weight[start:start + step])


class Nf4Builder:
    """An Nf4Linear from row chunks of its weight. Chunks must start on a multiple of 64 rows (flux2.fp8's
    rows_per_chunk gives such chunks), so every 64-weight block lies inside one chunk; the absmaxes are double-
    quantised once all chunks are in (their mean is the offset), exactly as bitsandbytes does for a whole weight."""

    def __init__(self, out_features: int, in_features: int, dtype: torch.dtype, device: torch.device | str):
        n = out_features * in_features
        self.shape, self.dtype, self.in_features = torch.Size([out_features, in_features]), dtype, in_features
        self.packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=device)
        self.absmax = torch.empty(math.ceil(n / NF4_BLOCK), dtype=torch.float32, device=device)

    def add(self, start: int, rows: Tensor, work: Tensor | None = None) -> None:
        """Quantise rows [start, start + len(rows)) (`work`, the fp8 builder's float32 buffer, is not needed)."""
        first = start * self.in_features
        if first % NF4_BLOCK:
            raise ValueError(f"NF4 chunks must start on a {NF4_BLOCK}-weight boundary (row {start} of "
                             f"{self.in_features}-wide rows does not)")
        packed, state = bnbf.quantize_4bit(rows.contiguous(), blocksize=NF4_BLOCK, compress_statistics=False,
                                           quant_type="nf4")
        self.packed[first // 2:first // 2 + packed.shape[0]] = packed
        self.absmax[first // NF4_BLOCK:first // NF4_BLOCK + state.absmax.numel()] = state.absmax

    def quant_state(self) -> bnbf.QuantState:
        """The double-quantised state of the absmaxes added so far (all chunks must be in)."""
        offset = self.absmax.mean()
        nested, nested_state = bnbf.quantize_blockwise(self.absmax - offset, blocksize=NF4_NESTED_BLOCK)
        return bnbf.QuantState(absmax=nested, shape=self.shape, dtype=self.dtype, blocksize=NF4_BLOCK,
                               code=bnbf.get_4bit_type("nf4", device=self.packed.device), quant_type="nf4",
                               offset=offset, state2=nested_state)

    def finish(self, bias: Tensor | None = None) -> Nf4Linear:
        return Nf4Linear(self.packed, self.quant_state(), bias)


class Int8Builder:
    """An Int8Linear from row chunks of its weight (rows are quantised independently)."""

    def __init__(self, out_features: int, in_features: int, device: torch.device | str):
        self.cb = torch.empty((out_features, in_features), dtype=torch.int8, device=device)
        self.scb = torch.empty(out_features, dtype=torch.float32, device=device)

    def add(self, start: int, rows: Tensor, work: Tensor | None = None) -> None:
        """Quantise rows [start, start + len(rows)) (`work` is not needed, as for Nf4Builder)."""
        cb, scb, _ = bnbf.int8_vectorwise_quant(rows.contiguous())
        cb[scb == 0] = 0  # an all-zero row: 0 / 0 in bitsandbytes' scaling
        self.cb[start:start + rows.shape[0]] = cb
        self.scb[start:start + rows.shape[0]] = scb

    def finish(self, bias: Tensor | None = None) -> Int8Linear:
        return Int8Linear(self.cb, self.scb, bias)


def nf4_bytes(out_features: int, in_features: int) -> int:
    """Resident bytes of an Nf4Linear's weight and quantisation state (no bias)."""
    n = out_features * in_features
    blocks = math.ceil(n / NF4_BLOCK)
    # packed values + uint8 absmaxes + float32 nested absmaxes + float32 offset + the 16-entry float32 NF4 code
    # + the 256-entry float32 code of the nested absmaxes (bitsandbytes gives every layer its own copy)
    return (n + 1) // 2 + blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK) + 4 + 16 * 4 + 256 * 4


def int8_bytes(out_features: int, in_features: int) -> int:
    """Resident bytes of an Int8Linear's weight and row scales (no bias)."""
    return out_features * in_features + 4 * out_features
