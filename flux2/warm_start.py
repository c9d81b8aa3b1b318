"""Warm start (`train.network_weights`): a new training run that begins from an existing LoRA file.

The file may be in any layout flux2.lora_formats reads (kohya / musubi-tuner, ComfyUI-BFL, diffusers-PEFT; told
apart by its keys), of the run's adapter type (LoRA, or a LyCORIS LoKr / LoHa file for train.network_type lokr /
loha). Each of its modules replaces the network's module for the same Linear with the file's rank,
alpha and weights, so the run starts from exactly the update the file makes (a diffusers file's fused qkv, three
separate pieces in the file, may come out with three times the rank). The network's other modules start as
usual (up = 0: no change). A module of the file that train.include_patterns / exclude_patterns leave out is an
error, never silently dropped. The run is a new one: its MLflow run and its LoRA file name the file and its
sha256 (`tags()`), and its fingerprint holds the sha256, so a changed file is never resumed as the same run.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from flux2.atomic import sha256_file
from flux2.lora import LoRANetwork, network_from_lora
from flux2.lora_formats import LoRA, kohya_name, read_lora

KEY = "train.network_weights"


@dataclass
class WarmStart:
    """The LoRA file a run starts from, read and checked."""

    path: Path
    sha256: str
    lora: LoRA

    def describe(self) -> str:
        ranks = "/".join(str(r) for r in sorted({w.rank for w in self.lora.modules.values() if w.rank})) or "full"
        return f"{self.path} ({self.lora.format} layout, {len(self.lora.modules)} modules, rank {ranks})"

    def tags(self) -> dict[str, str]:
        """Where the run started, for its MLflow tags and its LoRA file's metadata."""
        return {"flux2.warm_start": str(self.path), "flux2.warm_start_sha256": self.sha256}


def read_network_weights(path: Path) -> WarmStart:
    """Read the file before any model loads: a LoRA in a known layout, with finite weights (read_lora refuses
    NaN / inf). Errors name the key."""
    try:
        lora = read_lora(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{KEY}: {e}") from None
    return WarmStart(path, sha256_file(path), lora)


def load_network_weights(network: LoRANetwork, dit: torch.nn.Module, warm: WarmStart) -> int:
    """Put the file's modules into `network` (before it is attached to `dit` and before its optimizer is built);
    returns how many of the network's modules the file lacks (those start fresh)."""
    try:
        loaded = network_from_lora(dit, warm.lora)  # checks every module against the DiT's Linears
    except ValueError as e:
        raise ValueError(f"{KEY}: {e}") from None
    kinds = {w.kind for w in warm.lora.modules.values()}
    if kinds != {network.network_type}:
        raise ValueError(f"{KEY}: {warm.path} holds {'/'.join(sorted(kinds))} modules but this run trains "
                         f"{network.network_type}: set train.network_type to the file's type to continue it")
    current = {m.path: m for m in network.lora_modules}
    outside = [m.path for m in loaded.lora_modules if m.path not in current]
    if outside:
        shown = ", ".join(outside[:5]) + (f" (and {len(outside) - 5} more)" if len(outside) > 5 else "")
        raise ValueError(f"{KEY}: {warm.path} has {len(outside)} modules that train.include_patterns / "
                         f"exclude_patterns leave out: {shown}; include them (they would be lost otherwise) or "
                         "start from a file without them")
    for m in loaded.lora_modules:
        old = current[m.path]
        m.rank_dropout, m.module_dropout = old.rank_dropout, old.module_dropout
        if m.kind == "lora":
            m.dropout = old.dropout
        m.requires_grad_(True).train(old.training)
        network.add_module(kohya_name(m.path), m)  # same name: it takes the old module's place and order
    network.origin = str(warm.path)
    return len(current) - len(loaded.lora_modules)
