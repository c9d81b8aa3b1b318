"""`train.compile` / `flux2 generate --compile`: regional compilation of the DiT's repeated blocks.

One `torch.compile`d function per block class (`DoubleStreamBlock.forward`, `SingleStreamBlock.forward`) is bound
to every block of that kind, so dynamo traces each kind once and every block reuses its code (all blocks of a kind
share one cache of compiled graphs; a new graph appears only where inputs differ in kind: in training the first
double block's inputs need no gradient, the others' do, so double blocks hold two graphs and single blocks one).
The LoRA forward hooks on the Linears inside a block are traced into the block's graph; hooks on the block itself
(block swap, FSDP) stay outside, in eager code. Gradient checkpointing runs inside the graph (the compiler plans
the recompute) unless the block has such hooks: then the checkpoint wraps the compiled forward from outside, so
the hooks run again for the recompute. A new bucket shape compiles once more (dynamo then marks the changed sizes dynamic); steps of one shape
never recompile (tests/test_compile.py counts it).

`compile_blocks` first compiles and runs a tiny function with the same backend: when the compiler is missing or
broken (no C++ compiler on a CPU, no Triton on a GPU) it prints why and leaves the model eager. A block whose
tracing fails later goes back to eager the same way. FLUX2_COMPILE_BACKEND picks another torch.compile backend
(`aot_eager` traces without generating code: quick, to tell a compiler problem from a model problem).
"""
from __future__ import annotations

import logging
import os
import types
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

log = logging.getLogger("flux2.compile")
RECOMPILE_LIMIT = 32

def resolve(setting: bool | str, device: torch.device) -> bool:
    """Whether to compile: `auto` means on CUDA, off elsewhere (on a CPU the first compile costs more than it saves
    over a run of the demo's length: docs/performance.md); True / False as given (params.parse_auto_bool reads
    the words)."""
    if setting == "auto":
        return device.type == "cuda"
    if isinstance(setting, bool):
        return setting
    raise ValueError(f"compile: {setting!r} is not one of auto, true, false")


def backend() -> str:
    return os.environ.get("FLUX2_COMPILE_BACKEND", "inductor")


def compiler_problem(backend_name: str | Callable) -> str | None:
    """None when `backend_name` compiles and runs a forward and backward here; else the reason, one line."""
    def probe(x: torch.Tensor) -> torch.Tensor:
        return (x * 2).sin()

    try:
        x = torch.ones(8, requires_grad=True)
        torch.compile(probe, backend=backend_name, fullgraph=True)(x).sum().backward()
    except Exception as e:  # any failure means: do not compile; the reason is reported, not swallowed
        return reason(e)
    return None


def reason(e: BaseException) -> str:
    """The root cause of a compiler error in one line (dynamo wraps the backend's own exception)."""
    while getattr(e, "inner_exception", None) is not None or e.__cause__ is not None:
        e = getattr(e, "inner_exception", None) or e.__cause__
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:300]}"


def _name(backend_name) -> str:
    return backend_name if isinstance(backend_name, str) else getattr(backend_name, "__name__",
                                                                        type(backend_name).__name__)


class CompiledForward:
    """One kind of block's compiled forward, shared by all blocks of that kind; eager again after a failure.

    Two compiled functions: the forward itself, and the forward inside a checkpoint, for the blocks the model
    checkpoints (`in_graph_checkpoint` True, set by Flux2Transformer._run): then the compiler sees the recompute
    and plans it with the backward, which is faster than running the compiled forward again (docs/performance.md)
    and keeps the same memory (only the block's inputs are saved)."""

    def __init__(self, cls: type, backend_name: str | Callable):
        self.cls = cls
        self.eager = cls.forward
        # Every block of the kind shares these codes' caches; room for train, eval and a few bucket shapes.
        self.compiled = torch.compile(cls.forward, backend=backend_name, recompile_limit=RECOMPILE_LIMIT)
        self.compiled_checkpointed = torch.compile(self.checkpointed, backend=backend_name,
                                                   recompile_limit=RECOMPILE_LIMIT)
        self.failed: str | None = None

    def checkpointed(self, block: nn.Module, *args):
        return checkpoint(self.eager, block, *args, use_reentrant=False)

    def __call__(self, block: nn.Module, *args):
        recompute = getattr(block, "in_graph_checkpoint", False) and torch.is_grad_enabled()
        if self.failed is None:
            try:
                return (self.compiled_checkpointed if recompute else self.compiled)(block, *args)
            except (torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.InductorError) as e:
                self.failed = reason(e)
                message = f"compiling {self.cls.__name__} failed ({self.failed}); running it eager"
                log.warning(message)
                print(f"warning: {message}")
        return self.checkpointed(block, *args) if recompute else self.eager(block, *args)


def compile_blocks(dit: nn.Module, backend_name: str | Callable | None = None) -> bool:
    """Compile the double and single blocks of a Flux2Transformer in place (one compiled forward per kind).
    Returns False, after printing why, when the compiler does not work here (the model stays eager).

    Call it after block swap or FSDP are set up: a block with forward hooks of its own is checkpointed outside
    its graph, so that its hooks run again for the recompute (block swap fetches the weights again, FSDP gathers
    them); the others checkpoint inside it."""
    backend_name = backend_name or backend()
    problem = compiler_problem(backend_name)
    if problem is not None:
        message = (f"torch.compile (backend {_name(backend_name)}) does not work here, training and sampling eager "
                   f"instead: {problem}. Install a C++ compiler (CPU) or Triton (GPU), or set compile to false")
        log.warning(message)
        print(f"warning: {message}")
        return False
    for blocks in (dit.double_blocks, dit.single_blocks):
        if len(blocks):
            forward = CompiledForward(type(blocks[0]), backend_name)
            for block in blocks:
                block.forward = types.MethodType(forward, block)
                if not (block._forward_pre_hooks or block._forward_hooks):
                    block.in_graph_checkpoint = False  # may checkpoint in its graph; _run says when
    return True


def uncompile_blocks(dit: nn.Module) -> None:
    """Undo compile_blocks: every block runs its class's eager forward again."""
    for block in [*dit.double_blocks, *dit.single_blocks]:
        block.__dict__.pop("forward", None)
        block.__dict__.pop("in_graph_checkpoint", None)


def is_compiled(dit: nn.Module) -> bool:
    return any("forward" in block.__dict__ for block in [*dit.double_blocks, *dit.single_blocks])
