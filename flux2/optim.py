"""Optimizers and learning-rate schedules for LoRA training.

Schedules are pure functions of the step (`lr_factor`), so a resumed run needs no scheduler state beyond the step.

`train.optimizer_type` is a known name or `module.Class` from one of the packages in
`flux2.params.OPTIMIZER_PACKAGES`, nothing else (params.py refuses the rest without importing anything): naming a
class imports its module and runs that module's top-level code, so only packages that exist to provide
optimizers are ever imported (`os.system` or a user's script is refused). The class must be a
torch.optim.Optimizer, and `train.optimizer_args` must be keywords it takes, of the types of its defaults; all of
this is checked (`check_optimizer`) before the model loads.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import math
from typing import TYPE_CHECKING, Any, Iterable

from flux2.params import optimizer_type_problem

if TYPE_CHECKING:
    import torch

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def optimizer_class(optimizer_type: str) -> type:
    """The optimizer class `optimizer_type` names; ValueError naming train.optimizer_type otherwise."""
    import torch

    problem = optimizer_type_problem(optimizer_type)
    if problem:
        raise ValueError(f"train.optimizer_type: {problem}")
    name = optimizer_type.lower()
    if name == "adamw":
        return torch.optim.AdamW
    if name == "adamw8bit":
        optimizer_type = "bitsandbytes.optim.AdamW8bit"
    elif name == "adafactor":
        optimizer_type = "transformers.optimization.Adafactor"
    module_name, _, class_name = optimizer_type.rpartition(".")
    if importlib.util.find_spec(module_name.split(".")[0]) is None:
        raise ValueError(f"train.optimizer_type: {optimizer_type!r} needs {module_name.split('.')[0]}, which is not "
                         "installed; pip install it, or use adamw")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"train.optimizer_type: {optimizer_type!r} cannot be imported ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"train.optimizer_type: {optimizer_type!r} is not a torch.optim.Optimizer")
    return cls


def optimizer_kwargs(cls: type, optimizer_type: str, args: dict[str, Any]) -> dict[str, Any]:
    """`args` checked against the keywords of `cls` (names, and the types of their defaults: a bool for a bool,
    a number for a number, a list of numbers for a tuple such as betas); tuples made from lists."""
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    names = [n for n, p in params.items() if n not in ("self", "params", "lr")
             and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    out = {}
    for key, value in args.items():
        where = f"train.optimizer_args.{key}"
        if key == "lr":
            raise ValueError(f"{where}: set train.learning_rate instead")
        if key not in names:
            if takes_any:
                out[key] = value
                continue
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {near[0]}?" if near else f"it takes {', '.join(names) or 'none'}"
            raise ValueError(f"{where}: {cls.__name__} ({optimizer_type}) has no argument {key!r}; {hint}")
        default = params[key].default
        out[key] = _typed(value, default, where)
    return out


def _typed(value: Any, default: Any, where: str) -> Any:
    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, (int, float)):
        ok, want = number(value), "a finite number"
    elif isinstance(default, tuple):
        ok = isinstance(value, (list, tuple)) and len(value) == len(default) and all(
            number(v) if number(d) else True for v, d in zip(value, default))
        want = f"a list of {len(default)} numbers like {list(default)}"
        value = tuple(value) if ok else value
    elif isinstance(default, str):
        ok, want = isinstance(value, str), "text"
    else:  # None or an object default: the optimizer itself checks
        ok, want = True, ""
    if not ok:
        raise ValueError(f"{where}: expected {want}, got {value!r}")
    return value


def check_optimizer(optimizer_type: str, lr: float, optimizer_args: dict[str, Any] | None = None) -> None:
    """Build the optimizer once for a dummy parameter, so a wrong name, argument or value fails in a second, before
    the model loads, with an error naming the key."""
    import torch

    build_optimizer([torch.nn.Parameter(torch.zeros(1))], optimizer_type, lr, optimizer_args)


def build_optimizer(params: Iterable[torch.nn.Parameter], optimizer_type: str, lr: float,
                    optimizer_args: dict[str, Any] | None = None) -> torch.optim.Optimizer:
    """AdamW, AdamW8bit (bitsandbytes), Adafactor (transformers) or a `module.Class` of OPTIMIZER_PACKAGES with
    keyword args (`optimizer_args`)."""
    cls = optimizer_class(optimizer_type)
    args = optimizer_kwargs(cls, optimizer_type, dict(optimizer_args or {}))
    if optimizer_type.lower() == "adamw" and "foreach" not in args:
        # Fused: one kernel for all tensors, and it can skip a non-finite step on the device (train.py).
        args.setdefault("fused", True)
    if optimizer_type.lower() == "adafactor":
        # A fixed learning rate unless asked otherwise: relative_step would ignore train.learning_rate.
        args.setdefault("relative_step", False)
        args.setdefault("scale_parameter", False)
        args.setdefault("warmup_init", False)
    try:
        return cls(list(params), lr=lr, **args)
    except (TypeError, ValueError) as e:  # the optimizer's own checks, e.g. "Invalid beta parameter at index 0"
        raise ValueError(f"train.optimizer_args: {cls.__name__} refuses {args or 'its defaults'} with "
                         f"train.learning_rate {lr:g} ({e})") from None


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
