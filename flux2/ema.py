"""Exponential moving average (EMA) of a network's trainable parameters (`train.ema_decay`).

After every optimizer step each average moves toward its parameter:
    average <- d * average + (1 - d) * parameter,   d = min(decay, (1 + n) / (10 + n))
where n counts the updates so far. The warm-up term (as in diffusers' EMAModel) keeps the first averages from
clinging to the initial weights: a LoRA starts as the identity (up = 0), and with d = 0.999 from the first step
the average of a 1000-step run would still be a third of the way back there. The averages are float32 copies
on the parameters' device, so the EMA costs 4 bytes per trainable parameter (`nbytes`).

Works on any nn.Module (LoRA, LoKr, LoHa networks alike): it tracks `named_parameters()` with requires_grad,
and `applied(module)` swaps the averages in (to save or evaluate them with the module's own code) and back.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor, nn

UPDATES_KEY = "ema.num_updates"  # the update count in `state_dict()`, beside the averages


def ema_path(path: str | Path) -> Path:
    """Where the EMA weights of a network saved at `path` go: beside it, `<stem>_ema<suffix>`."""
    path = Path(path)
    return path.with_name(f"{path.stem}_ema{path.suffix}")


class EMA:
    """The running averages of `module`'s trainable parameters."""

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.averages: dict[str, Tensor] = {name: p.detach().float().clone()
                                            for name, p in module.named_parameters() if p.requires_grad}
        if not self.averages:
            raise ValueError(f"EMA: the {type(module).__name__} has no trainable parameters")

    @property
    def nbytes(self) -> int:
        """Memory held by the averages (counted, not sampled)."""
        return sum(t.numel() * t.element_size() for t in self.averages.values())

    def current_decay(self) -> float:
        """The decay the next update uses (the warm-up term caps it early on)."""
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Move every average toward its parameter's current value (call once per optimizer step)."""
        d = self.current_decay()
        params = dict(module.named_parameters())
        for name, average in self.averages.items():
            average.mul_(d).add_(params[name].detach().float(), alpha=1.0 - d)
        self.num_updates += 1

    @contextmanager
    def applied(self, module: nn.Module) -> Iterator[nn.Module]:
        """`module` with the averages in place of its trainable parameters; the trained values come back on exit."""
        params = dict(module.named_parameters())
        saved = {name: params[name].detach().clone() for name in self.averages}
        try:
            with torch.no_grad():
                for name, average in self.averages.items():
                    params[name].copy_(average)
            yield module
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)

    def state_dict(self) -> dict[str, Tensor]:
        """The averages (CPU tensors, named as the module's parameters) and the update count, for checkpoints."""
        out = {name: t.detach().cpu().clone() for name, t in self.averages.items()}
        out[UPDATES_KEY] = torch.tensor(self.num_updates, dtype=torch.int64)
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what `state_dict` returned; a ValueError names the parameters that do not fit."""
        names = set(state) - {UPDATES_KEY}
        missing, unexpected = sorted(set(self.averages) - names), sorted(names - set(self.averages))
        wrong = [n for n in sorted(names & set(self.averages)) if state[n].shape != self.averages[n].shape]
        if missing or unexpected or wrong or UPDATES_KEY not in state:
            raise ValueError(f"the EMA state does not fit this network: missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}, other shapes {wrong[:3]}"
                             + ("" if UPDATES_KEY in state else f", no {UPDATES_KEY}"))
        for name, average in self.averages.items():
            average.copy_(state[name])
        self.num_updates = int(state[UPDATES_KEY])
