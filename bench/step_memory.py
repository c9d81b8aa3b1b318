"""Benchmark: the GPU memory of one LoRA training step, counted on the CPU without a GPU and without weights.

The step is bench/memory.py --gpu's (rank-32 LoRA on every block Linear, batch 1, 512 text tokens, gradient
checkpointing, bf16 autocast, AdamW), run on fake tensors (torch's FakeTensorMode: shapes and dtypes, no memory,
no arithmetic) through our own model, LoRA and quantised Linears. `LiveBytes` adds up the bytes of every tensor
storage alive at each operation and keeps the peak: what torch.cuda.max_memory_allocated reports for the same
sequence of allocations. The weights, LoRA and AdamW state are counted exactly; the activations are counted as
this code allocates them, with two adjustments that make the CPU follow the CUDA path:

- attention: fake CPU tensors take torch's CPU flash-attention kernel, which, like CUDA's flash and cuDNN
  kernels, keeps only its output and a float32 log-sum-exp per query for backward (never the L x L scores);
- autocast: CUDA's runs layer_norm in float32, the CPU's in bf16; `cuda_autocast_layer_norm` gives the CPU
  CUDA's rule.

Not counted, so a real card needs some headroom above the figure: the CUDA context (outside torch's allocator),
the caching allocator's fragmentation (reserved above allocated, typically a few percent), cuBLAS workspaces and
the kernels' own scratch (FlashAttention-2's float32 dq accumulator in backward: L x heads x 128 x 4 bytes,
0.11 GB for dev at 1024^2). bench/memory.py --gpu measures the same step on a GPU, so the two can be compared
when a session has one.

    python bench/step_memory.py                                 # dev and klein-base-9b nf4 at 1024^2
    python bench/step_memory.py --variants klein-base-4b --switches bf16 fp8 nf4 --res 512 1024
    python bench/step_memory.py --variants klein-base-4b --switches bf16 --reference   # beside diffusers + PEFT
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import weakref
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from memory import (GIB, GPU_TARGETS, block_linears, meta_dit, optimizer_bytes, step_inputs,  # noqa: E402
                    step_loss)  # (bench/memory.py)

SWITCHES = ("bf16", "fp8", "nf4")  # int8's bitsandbytes Int8Params cannot hold a fake tensor: not counted here


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensor storages alive (each storage once, however many views it has), from those
    given to `hold` and every one an operation creates while the mode is on; `peak` is the most at any time."""

    def __init__(self):
        super().__init__()
        self._seen = WeakIdKeyDictionary()
        self.live = 0
        self.peak = 0

    def hold(self, tensors) -> None:
        """Count these tensors (made before the mode was entered, e.g. the weights) as alive."""
        for t in tensors:
            self._add(t)
        self.peak = max(self.peak, self.live)

    def reserve(self, nbytes: int) -> None:
        """Count `nbytes` as alive from now on (state counted by formula, e.g. the optimizer's)."""
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def _add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage in self._seen:
            return
        n = storage.nbytes()
        self._seen[storage] = n
        self.live += n
        weakref.finalize(storage, self._free, n)

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        self.peak = max(self.peak, self.live)
        return out


@contextmanager
def cuda_autocast_layer_norm():
    """While on: CPU autocast runs layer_norm in float32, as CUDA autocast does (its float32 list)."""
    guard = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def layer_norm(x, shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
        with torch._C._ExcludeDispatchKeyGuard(guard):
            return torch.ops.aten.layer_norm.default(x.float(), shape, weight, bias, eps, cudnn_enable)

    lib = torch.library.Library("aten", "IMPL")
    lib.impl("layer_norm", layer_norm, "AutocastCPU")
    try:
        yield
    finally:
        lib._destroy()  # the registration goes with it: CPU autocast is itself again


class CountedNf4Linear(nn.Linear):
    """flux2.bnb_linear.Nf4Linear's tensors and forward, without the bitsandbytes Params4bit wrapper (which cannot
    hold a fake tensor): the packed NF4 values as `weight`, the double-quantised state beside them, and the same
    forward (bitsandbytes dequantises the weight to the compute dtype; flux2.fp8.frozen_linear rebuilds it in
    backward)."""

    def __init__(self, packed: torch.Tensor, quant_state, bias: torch.Tensor | None = None):
        out_features, in_features = quant_state.shape
        super().__init__(in_features, out_features, bias=False, device="meta")
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.quant_state = quant_state
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(self.weight, self.quant_state).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from flux2.fp8 import frozen_linear

        return frozen_linear(x, self.dequantized_weight, self.bias)


def quant_state_tensors(state) -> list[torch.Tensor]:
    """The tensors of a bitsandbytes QuantState (nested absmaxes, offset, code tables)."""
    tensors = [state.absmax, state.code, state.offset]
    if state.state2 is not None:
        tensors += [state.state2.absmax, state.state2.code]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def build_dit(variant, switch: str) -> nn.Module:
    """The DiT with random (fake, under FakeTensorMode) bf16 weights, its block Linears in `switch`, built the way
    flux2.quantize builds them."""
    from flux2.quantize import assign_tensor, builder, set_module

    model = meta_dit(variant)
    quantized = block_linears(model) if switch != "bf16" else set()
    for name, tensor in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if module in quantized:
            if leaf == "weight":
                build = builder(switch, *tensor.shape, torch.bfloat16, "cpu")
                build.add(0, torch.randn(tensor.shape, dtype=torch.bfloat16))
                if switch == "nf4":
                    set_module(model, module, CountedNf4Linear(build.packed, build.quant_state()))
                else:
                    set_module(model, module, build.finish())
            continue
        assign_tensor(model, name, torch.randn(tensor.shape, dtype=torch.bfloat16))
    return model


def model_tensors(model: nn.Module) -> list[torch.Tensor]:
    tensors = [*model.parameters(), *model.buffers()]
    for m in model.modules():
        if getattr(m, "quant_state", None) is not None:  # Nf4Linear, CountedNf4Linear
            tensors += quant_state_tensors(m.quant_state)
    return tensors


def flux2_step(variant, switch: str, rank: int, grad_ckpt: bool):
    """Our DiT with `switch`'s block Linears and a rank-`rank` LoRA: (weights, trainable tensors, LoRA state
    tensors, step(x, x_ids, t, ctx, ctx_ids, guidance) -> prediction)."""
    from flux2.lora import create_network

    model = build_dit(variant, switch)
    model.requires_grad_(False).gradient_checkpointing = grad_ckpt
    network = create_network(model, rank, rank)
    network.apply_to(model)
    params = [p for p in network.parameters() if p.requires_grad]
    return model_tensors(model), params, list(network.state_dict().values()), model


def diffusers_step(variant, switch: str, rank: int, grad_ckpt: bool):
    """The reference: diffusers' Flux2Transformer2DModel + PEFT, as bench/train_step.py builds it and
    ../shared/reference/anchors.md measured it on an H200 (bf16 weights, float32 LoRA)."""
    from peft import LoraConfig

    sys.path.insert(0, str(ROOT / "tests"))
    from oracles.dit import diffusers_transformer
    from train_step import DIFFUSERS_TARGETS

    if switch != "bf16":
        raise SystemExit("the diffusers reference is counted with bf16 weights only")
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    # Built on the meta device outside fake mode (module moves, PEFT's too, cannot swap fake parameters), then
    # given tensors.
    with unset_fake_temporarily(), torch.device("meta"):
        model = diffusers_transformer(variant)
        model.requires_grad_(False)
        if grad_ckpt:
            model.enable_gradient_checkpointing()
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                     target_modules=DIFFUSERS_TARGETS))
    for module in model.modules():
        for key, p in list(module._parameters.items()):
            if p is not None:
                dtype = torch.float32 if p.requires_grad else torch.bfloat16
                module._parameters[key] = nn.Parameter(torch.randn(p.shape, dtype=dtype) * 0.02,
                                                       requires_grad=p.requires_grad)
        for key, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[key] = torch.zeros(b.shape, dtype=b.dtype)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())

    def step(x, x_ids, t, ctx, ctx_ids, g):
        return model(hidden_states=x.to(torch.bfloat16), encoder_hidden_states=ctx, timestep=t, img_ids=x_ids[0],
                     txt_ids=ctx_ids[0], guidance=g, return_dict=False)[0]

    return frozen, params, params, step


IMPLEMENTATIONS = {"flux2": flux2_step, "diffusers": diffusers_step}


def count_step(variant_name: str, switch: str, res: int, rank: int = 32, grad_ckpt: bool = True,
               optimizer: str = "adamw", fake: bool = True, impl: str = "flux2", text_tokens: int | None = None,
               ) -> dict:
    """Peak bytes alive during the forward and backward of a step after the first (the optimizer's state exists
    from the first on), and its parts. `impl`: flux2 (ours) or diffusers (the reference, bf16 only).
    `fake=False` runs the same on real tensors (tests compare the two at tiny sizes); `text_tokens`: default the
    variant's 512."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from flux2.variants import VARIANTS

    variant = VARIANTS[variant_name]
    if switch == "nf4":  # bitsandbytes builds its quantisation maps from Python lists: do it on real tensors
        from flux2.bnb_linear import Nf4Builder

        warm = Nf4Builder(64, 64, torch.bfloat16, "cpu")
        warm.add(0, torch.zeros(64, 64))
        warm.finish()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # fake tensors are not shared across threads
    try:
        with ExitStack() as stack:
            stack.enter_context(cuda_autocast_layer_norm())
            if fake:
                stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
            torch.manual_seed(0)
            frozen, params, adapter, step = IMPLEMENTATIONS[impl](variant, switch, rank, grad_ckpt)
            counter = LiveBytes()
            counter.hold(frozen)
            weights = counter.live
            counter.hold(adapter)
            lora = counter.live - weights
            state = optimizer_bytes([p.numel() for p in params], optimizer)
            counter.reserve(state)  # the optimizer's state, made by the first step, alive in every later one
            before = counter.live
            with counter:
                inputs = step_inputs(variant, res, text_tokens or variant.max_text_tokens)  # alive through backward
                step_loss(step, inputs).backward()
                grads = sum(p.grad.untyped_storage().nbytes() for p in params)
    finally:
        torch.set_num_threads(threads)
    return {"impl": impl, "variant": variant_name, "switch": switch, "res": res, "rank": rank,
            "grad_ckpt": grad_ckpt, "optimizer": optimizer, "weights": weights, "lora": lora,
            "optimizer_state": state, "grads": grads, "resident": before, "peak": counter.peak,
            "activations_peak": counter.peak - before,
            "target": GPU_TARGETS.get(variant_name) if switch == "nf4" else None}


def line(row: dict) -> str:
    target, verdict = row["target"], ""
    if target is not None:
        margin = (target - row["peak"]) / GIB
        verdict = f" (<= {target / GIB:.0f} GiB: " + (f"{margin:.2f} GiB under)" if margin >= 0
                                                       else f"OVER by {-margin:.2f} GiB)")
    return (f"| {row['impl']} | {row['variant']} | {row['switch']} | {row['res']}^2 | "
            f"{'yes' if row['grad_ckpt'] else 'no'} | "
            f"{row['optimizer']} | "
            f"{row['weights'] / GIB:.2f} | {(row['lora'] + row['optimizer_state'] + row['grads']) / GIB:.2f} | "
            f"{row['activations_peak'] / GIB:.2f} | **{row['peak'] / GIB:.2f}**{verdict} |")


HEADER = ("| implementation | variant | DiT | resolution | grad. ckpt | optimizer | weights GiB "
          "| LoRA + optimizer + grads GiB | activations peak GiB | step peak GiB |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="*", default=list(GPU_TARGETS))
    p.add_argument("--switches", nargs="*", default=["nf4"], choices=SWITCHES)
    p.add_argument("--res", nargs="*", type=int, default=[1024])
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--optimizer", nargs="*", default=["adamw"], choices=["adamw", "adamw8bit"])
    p.add_argument("--no_grad_ckpt", action="store_true", help="count the step without gradient checkpointing")
    p.add_argument("--reference", action="store_true",
                   help="also count diffusers + PEFT (the reference; bf16 rows only) beside each bf16 row")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    rows = []
    print(HEADER, flush=True)
    for variant in args.variants:
        for switch in args.switches:
            for res in args.res:
                for optimizer in args.optimizer:
                    for impl in ("flux2", "diffusers") if args.reference and switch == "bf16" else ("flux2",):
                        start = time.perf_counter()
                        row = count_step(variant, switch, res, args.rank, not args.no_grad_ckpt, optimizer,
                                         impl=impl)
                        row["count_s"] = round(time.perf_counter() - start, 1)
                        rows.append(row)
                        print(line(row), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
