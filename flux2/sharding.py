"""`train.fsdp`: shard the frozen DiT over the processes of a distributed run (FSDP2), for models that do not fit
one GPU (dev in bf16 is 64 GB).

Each double and single block, and the rest of the model, become FSDP units: a process keeps 1/N of every weight
and gathers a block's full weights only while that block runs (forward, and the recompute of gradient
checkpointing). The LoRA weights are not sharded (they are small); their gradients are averaged as without FSDP.
"""
from __future__ import annotations

import torch
from torch import nn


def shard_dit(dit: nn.Module, device: torch.device) -> None:
    """Shard `dit` (on the CPU) in place over the default process group, then move the local shards to `device`."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        raise ValueError("train.fsdp needs several processes: launch with `accelerate launch --num_processes N "
                         "-m stages.train` (or set train.fsdp: false)")
    for block in list(dit.double_blocks) + list(dit.single_blocks):
        fully_shard(block)
    fully_shard(dit)
    dit.to(device)
