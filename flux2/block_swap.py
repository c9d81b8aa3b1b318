"""`--blocks_to_swap N`: run a DiT bigger than the GPU by streaming its last blocks from CPU memory.

The last blocks of `double_blocks` and of `single_blocks` keep their frozen weights in pinned CPU memory. Just
before such a block runs, its weights are copied to the GPU on a side CUDA stream (started while the previous
block computes), the block computes with the copies, and afterwards the CPU tensors are put back so the copies
are freed once nothing uses them. Trainable parameters (LoRA) stay on the GPU.

How N splits into double and single blocks is musubi-tuner's rule, so a given N means the same in both tools:
with r = single / double blocks, double = round(N / (1 + r/2)), single = round(double * r); when a variant has
more than twice as many single as double blocks, each double above depth - 2 becomes two singles; at least two
blocks of each list must stay on the GPU. That gives maxima of 29 (dev: 6 of 8 double + 44 of 48 single),
13 (klein 4B: 3 + 18) and 16 (klein 9B: 6 + 18). A unit is roughly one double or two single blocks (they hold
26 H^2 and 13 H^2 weights), but the rounding is coarse: on dev, N = 1 or 2 swaps nothing and 3-5 all swap one
double and six single blocks.

Training: the copies a block computes with are kept alive by autograd until its backward, so without gradient
checkpointing nothing is saved. With it, the block's forward is re-run in the backward pass and the hooks
fetch the weights again (prefetching in the backward direction), so block swap and checkpointing combine.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from flux2.variants import Variant

NO_CUDA = "--blocks_to_swap needs a CUDA GPU; on CPU the whole model is already in RAM, drop the option"


def _split(n: int, depth: int, depth_single: int) -> tuple[int, int]:
    ratio = depth_single / depth
    double = round(n / (1 + ratio / 2))
    single = round(double * ratio)
    if 2 * depth < depth_single and double > depth - 2:
        excess = double - (depth - 2)
        double, single = double - excess, single + 2 * excess
    return double, single


def _fits(split: tuple[int, int], depth: int, depth_single: int) -> bool:
    return split[0] <= depth - 2 and split[1] <= depth_single - 2


def max_blocks_to_swap(depth: int, depth_single: int) -> int:
    """The largest N for which every N' in 1..N splits into a valid (double, single) pair."""
    n = 0
    while depth > 0 and _fits(_split(n + 1, depth, depth_single), depth, depth_single):
        n += 1
    return n


def split_blocks_to_swap(n: int, variant: Variant) -> tuple[int, int]:
    """--blocks_to_swap N -> (double, single) blocks to stream; (0, 0) for N <= 0. ValueError above the maximum."""
    if n <= 0:
        return 0, 0
    maximum = max_blocks_to_swap(variant.depth, variant.depth_single_blocks)
    if n > maximum:
        raise ValueError(f"--blocks_to_swap {n} is too many for {variant.name}: at most {maximum} (at least 2 of its "
                         f"{variant.depth} double and 2 of its {variant.depth_single_blocks} single blocks stay on "
                         "the GPU)")
    return _split(n, variant.depth, variant.depth_single_blocks)


def enable_block_swap(model: nn.Module, blocks_to_swap: int, device: str | torch.device | None = None
                      ) -> BlockSwap | None:
    """Stream the last blocks of `model` (a Flux2Transformer, on any device) during forward on CUDA `device`
    (default: where the model is). Moves the rest of the model to `device`. Returns the BlockSwap (call
    `.remove()` to stop), or None when N splits into nothing (N <= 0, or too small for this variant).

    Call it after adding LoRA layers, and do not move the model with `.to()` afterwards.
    """
    double, single = split_blocks_to_swap(blocks_to_swap, model.variant)
    if double == single == 0:
        return None
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(NO_CUDA)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return BlockSwap(model, double, single, device)


@dataclass
class _Copy:
    """Device copies of one block's frozen tensors, and the event marking the end of their transfer."""

    entries: list[tuple[dict, str, Tensor, Tensor]]  # (owner's _parameters or _buffers, key, original, copy)
    event: torch.cuda.Event | None


class BlockSwap:
    """Hooks that stream the last `double` double blocks and `single` single blocks of a Flux2Transformer.

    On a CUDA device the copies run on a side stream, overlapping with compute. Any other device (used by the
    tests to check the hook logic on CPU) copies synchronously.
    """

    def __init__(self, model: nn.Module, double: int, single: int, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        doubles, singles = list(model.double_blocks), list(model.single_blocks)
        self.blocks = doubles + singles  # execution order
        self.names = [f"double_blocks.{i}" for i in range(len(doubles))] + [
            f"single_blocks.{i}" for i in range(len(singles))]
        self.swapped = sorted({*range(len(doubles) - double, len(doubles)),
                               *range(len(self.blocks) - single, len(self.blocks))})
        self.pending: dict[int, _Copy] = {}  # the one prefetched block, if any
        self.installed: dict[int, _Copy] = {}
        self.last_pos = -1
        self._place(model)
        self.handles = []
        for pos, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_pre_hook(partial(self._before, pos)))
            if pos in self.swapped:
                self.handles.append(block.register_forward_hook(partial(self._after, pos), always_call=True))

    def remove(self) -> None:
        """Remove the hooks; swapped blocks stay in CPU memory (move the model to use it without swapping)."""
        for handle in self.handles:
            handle.remove()
        self.handles, self.pending = [], {}

    def _place(self, model: nn.Module) -> None:
        """Swapped blocks' frozen tensors to (pinned) CPU memory; everything else to the device."""
        in_swapped = {id(m) for pos in self.swapped for m in self.blocks[pos].modules()}
        for module in model.modules():
            offload = id(module) in in_swapped
            for table in (module._parameters, module._buffers):
                for key, t in table.items():
                    if t is None:
                        continue
                    if offload and not t.requires_grad:
                        moved = self._to_cpu(t)
                    else:
                        moved = t.to(self.device)
                    if isinstance(t, nn.Parameter):
                        t.data = moved  # keep the Parameter object: optimisers and LoRA may hold it
                    else:
                        table[key] = moved

    def _to_cpu(self, t: Tensor) -> Tensor:
        if not self.cuda:
            return t.to("cpu")
        if t.device.type == "cpu" and t.is_pinned():
            return t
        # Pinned memory makes the host-to-device copies asynchronous.
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)

    def _start_copy(self, pos: int) -> _Copy:
        """Copy block `pos`'s frozen tensors to the device (on the side stream when on CUDA)."""
        entries = []
        with torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext():
            for module_name, module in self.blocks[pos].named_modules(prefix=self.names[pos]):
                for table in (module._parameters, module._buffers):
                    for key, t in table.items():
                        if t is None:
                            continue
                        if t.requires_grad:  # trainable: must already live on the device
                            if t.device != self.device:
                                raise RuntimeError(
                                    f"block swap: trainable parameter {module_name}.{key} is on {t.device}, not "
                                    f"{self.device}; enable block swap after adding LoRA layers")
                            continue
                        entries.append((table, key, t, t.detach().to(self.device, non_blocking=True, copy=True)))
            event = self.stream.record_event() if self.cuda else None
        return _Copy(entries, event)

    def _before(self, pos: int, block: nn.Module, args: tuple) -> None:
        # Blocks run in increasing order in a forward pass; a gradient-checkpointing recompute in the backward pass
        # re-runs them in decreasing order. Prefetch the next swapped block in the current direction.
        backward = pos <= self.last_pos
        self.last_pos = pos
        if pos in self.swapped:
            copy = self.pending.pop(pos, None)  # prefetched while the previous block ran, or fetched now
            if copy is None:
                copy = self._start_copy(pos)
            if self.cuda:
                compute = torch.cuda.current_stream(self.device)
                compute.wait_event(copy.event)
                for _, _, _, gpu in copy.entries:
                    gpu.record_stream(compute)  # the allocator must not reuse it before compute is done with it
            for table, key, _, gpu in copy.entries:
                table[key] = gpu  # a plain tensor, as torch.func.functional_call does: autograd keeps it alive
            self.installed[pos] = copy
        following = [p for p in self.swapped if (p < pos if backward else p > pos)]
        if following:
            nxt = following[-1] if backward else following[0]
            if nxt not in self.pending and nxt not in self.installed:
                self.pending = {nxt: self._start_copy(nxt)}  # at most one prefetch held

    def _after(self, pos: int, block: nn.Module, args: tuple, output: object) -> None:
        copy = self.installed.pop(pos, None)
        if copy is not None:
            for table, key, original, _ in copy.entries:
                table[key] = original
