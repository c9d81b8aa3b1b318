"""Optimizers and learning-rate schedules for LoRA training.

Schedules are pure functions of the step (`lr_factor`), so a resumed run needs no scheduler state beyond the step.
"""
from __future__ import annotations

import importlib
import math
from typing import Any, Iterable

import torch

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def build_optimizer(params: Iterable[torch.nn.Parameter], optimizer_type: str, lr: float,
                    optimizer_args: dict[str, Any] | None = None) -> torch.optim.Optimizer:
    """AdamW, AdamW8bit (bitsandbytes), Adafactor (transformers) or any `module.Class` with keyword args."""
    args = dict(optimizer_args or {})
    params = list(params)
    name = optimizer_type.lower()
    if name == "adamw":
        if "foreach" not in args:
            # Fused: one kernel for all tensors, and it can skip a non-finite step on the device (train.py).
            args.setdefault("fused", True)
        return torch.optim.AdamW(params, lr=lr, **args)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, **args)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed learning rate unless asked otherwise: relative_step would ignore train.learning_rate.
        args.setdefault("relative_step", False)
        args.setdefault("scale_parameter", False)
        args.setdefault("warmup_init", False)
        return Adafactor(params, lr=lr, **args)
    module_name, _, class_name = optimizer_type.rpartition(".")
    if not module_name:
        raise ValueError(f"train.optimizer_type {optimizer_type!r}: use adamw, adamw8bit, adafactor or "
                         f"a full class path such as torch.optim.SGD")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"train.optimizer_type {optimizer_type!r}: cannot import it ({e})") from None
    return cls(params, lr=lr, **args)


def lr_factor(step: int, scheduler: str, total_steps: int, warmup_steps: int = 0, num_cycles: int = 1,
              power: float = 1.0) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based)."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"train.lr_scheduler {scheduler!r}: use one of {', '.join(SCHEDULERS)}")
    if step < warmup_steps and scheduler != "constant":
        return (step + 1) / (warmup_steps + 1)
    if scheduler in ("constant", "constant_with_warmup"):
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if scheduler == "linear":
        return max(0.0, 1.0 - progress)
    if scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if scheduler == "cosine_with_restarts":
        if progress >= 1.0:
            return 0.0
        return 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0)))
    return (1.0 - progress) ** power  # polynomial
