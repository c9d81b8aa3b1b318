"""Which adapter a training run builds: `train.network_type`, the musubi-tuner / LyCORIS names for it
(`train.network_module`, `network_args.algo`) and the `train.network_args` it takes, resolved into one checked
`NetworkOptions`. Imports neither torch nor params.py: lora.py builds networks from it, and params validation runs
it before anything loads.

The type: `network_type` (lora | lokr | loha), `network_module` (musubi-tuner's `networks.lora_flux_2`,
`networks.lokr`, `networks.loha`, or `lycoris.kohya` with `network_args.algo`) and `algo` must agree; where one
says lora (every default) the others decide.

`network_args` (a mapping in params.yaml; `--network_args key=value ...` on the command line):

| key | for | meaning | default |
|---|---|---|---|
| algo | all | lora, locon (= lora on Linear layers), lokr or loha: LyCORIS' name for the type | (network_type) |
| factor | lokr | the Kronecker factor: w1 is about factor x factor; -1 = as square as the shape allows | -1 |
| decompose_both | lokr | also make w1 a low-rank product | false |
| full_matrix | lokr | no low-rank factor at all (scale 1, alpha unused) | false |
| loraplus_lr_ratio | all | the same as train.loraplus_lr_ratio (musubi-tuner's spelling) | (off) |
| double_dim, single_dim | all | rank in the double / single blocks: one number or one per block; 0 leaves a block out | network_dim |
| double_alpha, single_alpha | all | alpha there: one number or one per block | network_alpha |
| double_lr, single_lr | all | learning rate of those adapters: one number or one per block (follows the schedule) | learning_rate |
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flux2.variants import Variant

if TYPE_CHECKING:
    from flux2.params import TrainParams

NETWORK_TYPES = ("lora", "lokr", "loha")
# musubi-tuner's --network_module names -> the type; None: LyCORIS' kohya module, the type is network_args.algo.
NETWORK_MODULES: dict[str, str | None] = {"networks.lora_flux_2": "lora", "networks.lora": "lora",
                                          "flux2.lora": "lora", "networks.lokr": "lokr", "networks.loha": "loha",
                                          "lycoris.kohya": None}
LYCORIS_ALGOS = {"lora": "lora", "locon": "lora", "lokr": "lokr", "loha": "loha"}
NETWORK_ARGS = ("algo", "factor", "decompose_both", "full_matrix", "loraplus_lr_ratio", "double_dim", "single_dim",
                "double_alpha", "single_alpha", "double_lr", "single_lr")
LOKR_ARGS = ("factor", "decompose_both", "full_matrix")
_BLOCK = re.compile(r"(double|single)_blocks\.(\d+)\.")


class NetworkConfigError(ValueError):
    """A network setting that does not hold, one line naming the train.* key (params turns it into ParamsError)."""


@dataclass(frozen=True)
class NetworkOptions:
    """A run's adapter, resolved: its type, the LoKr shape options, LoRA+ and the per-block values (a tuple with
    one entry per block, or None for the train.* default)."""

    network_type: str = "lora"
    factor: int = -1
    decompose_both: bool = False
    full_matrix: bool = False
    loraplus_lr_ratio: float | None = None
    double_dim: tuple[int, ...] | None = None
    single_dim: tuple[int, ...] | None = None
    double_alpha: tuple[float, ...] | None = None
    single_alpha: tuple[float, ...] | None = None
    double_lr: tuple[float, ...] | None = None
    single_lr: tuple[float, ...] | None = None

    def _per_block(self, what: str, path: str, default):
        m = _BLOCK.match(path)
        values = getattr(self, f"{m.group(1)}_{what}") if m else None
        return default if values is None else values[int(m.group(2))]

    def rank_for(self, path: str, default: int) -> int:
        """The rank of the adapter on module `path` (0: none there)."""
        return self._per_block("dim", path, default)

    def alpha_for(self, path: str, default: float) -> float:
        return self._per_block("alpha", path, default)

    def lr_for(self, path: str, default: float) -> float:
        return self._per_block("lr", path, default)

    def lycoris_args(self) -> dict[str, str]:
        """network_args as LyCORIS' kohya module records them in `ss_network_args` (strings)."""
        args = {"algo": self.network_type}
        if self.network_type == "lokr":
            args.update(factor=str(self.factor), decompose_both=str(self.decompose_both),
                        full_matrix=str(self.full_matrix))
        return args


def network_options(t: TrainParams, variant: Variant) -> NetworkOptions:
    """train.network_type / network_module / network_args resolved and checked for `variant` (whose block counts
    the per-block lists must match); NetworkConfigError naming the key otherwise."""
    args = dict(t.network_args)
    for key in args:
        if key not in NETWORK_ARGS:
            near = difflib.get_close_matches(str(key), NETWORK_ARGS, n=1)
            hint = f"did you mean {near[0]}?" if near else f"valid keys: {', '.join(NETWORK_ARGS)}"
            if key in ("include_patterns", "exclude_patterns"):
                hint = f"set train.{key} (--{key}), which every network type uses"
            raise NetworkConfigError(f"train.network_args.{key}: unknown; {hint} (see docs/adapters.md)")
    network_type = _network_type(t, args.get("algo"))
    if network_type != "lokr":
        given = [k for k in LOKR_ARGS if k in args]
        if given:
            raise NetworkConfigError(f"train.network_args.{given[0]}: applies to LoKr only; this run trains "
                              f"{network_type} (set train.network_type: lokr)")
    if network_type != "lora" and t.network_dropout:
        raise NetworkConfigError(f"train.network_dropout: LoKr and LoHa have no rank activations to drop (LyCORIS ignores "
                          f"it too); use train.rank_dropout or train.module_dropout with {network_type}")
    factor = args.get("factor", -1)
    if type(factor) is not int or not (factor == -1 or factor >= 1):
        raise NetworkConfigError(f"train.network_args.factor: an integer, -1 (as square as possible) or at least 1, got "
                          f"{factor!r}")
    flags = {}
    for key in ("decompose_both", "full_matrix"):
        flags[key] = args.get(key, False)
        if not isinstance(flags[key], bool):
            raise NetworkConfigError(f"train.network_args.{key}: true or false, got {flags[key]!r}")
    ratio = t.loraplus_lr_ratio
    if "loraplus_lr_ratio" in args:
        if ratio is not None and args["loraplus_lr_ratio"] != ratio:
            raise NetworkConfigError(f"train.network_args.loraplus_lr_ratio: {args['loraplus_lr_ratio']!r} differs from "
                              f"train.loraplus_lr_ratio {ratio!r}; set one of them")
        ratio = _number(args["loraplus_lr_ratio"], "train.network_args.loraplus_lr_ratio")
    if ratio is not None and not ratio > 0:
        raise NetworkConfigError(f"train.loraplus_lr_ratio: must be positive (the up weights' learning rate is ratio x "
                          f"learning_rate), got {ratio}")
    blocks = {"double": variant.depth, "single": variant.depth_single_blocks}
    per_block = {f"{group}_{what}": _per_block_values(args, f"{group}_{what}", n, what)
                 for group, n in blocks.items() for what in ("dim", "alpha", "lr")}
    return NetworkOptions(network_type, factor, flags["decompose_both"], flags["full_matrix"], ratio, **per_block)


def _network_type(t: TrainParams, algo: Any) -> str:
    """The type the three settings agree on; lora where none says otherwise."""
    if t.network_type not in NETWORK_TYPES:
        raise NetworkConfigError(f"train.network_type: {t.network_type!r} is not one of {', '.join(NETWORK_TYPES)}")
    module = t.network_module
    if module not in NETWORK_MODULES:
        raise NetworkConfigError(f"train.network_module: {module!r} is not one of {', '.join(NETWORK_MODULES)} "
                          "(musubi-tuner's names; or set train.network_type)")
    if algo is not None and algo not in LYCORIS_ALGOS:
        raise NetworkConfigError(f"train.network_args.algo: {algo!r} is not one flux2 trains; choose one of "
                          f"{', '.join(LYCORIS_ALGOS)}")
    said = {"train.network_type": t.network_type, "train.network_module": NETWORK_MODULES[module],
            "train.network_args.algo": LYCORIS_ALGOS.get(algo)}
    named = {key: kind for key, kind in said.items() if kind not in (None, "lora")}
    if len(set(named.values())) > 1:
        shown = ", ".join(f"{key} says {kind}" for key, kind in named.items())
        raise NetworkConfigError(f"{next(iter(named))}: the adapter type is given twice and differs ({shown}); keep one")
    return next(iter(named.values()), "lora")


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise NetworkConfigError(f"{key}: expected a number, got {value!r}")
    return float(value)


def _per_block_values(args: dict, key: str, n: int, what: str) -> tuple | None:
    """One value per block from a number or a list of n; ranks are integers >= 0, alphas and rates positive."""
    if key not in args:
        return None
    value = args[key]
    values = value if isinstance(value, list) else [value] * n
    if len(values) != n:
        raise NetworkConfigError(f"train.network_args.{key}: one value for all {n} blocks or a list of {n} (one per "
                          f"block), got {len(values)}")
    full = f"train.network_args.{key}"
    if what == "dim":
        if any(type(v) is not int or v < 0 for v in values):
            raise NetworkConfigError(f"{full}: ranks are integers, 0 (no adapter in that block) or more; got {value!r}")
        return tuple(values)
    values = [_number(v, full) for v in values]
    if any(not v > 0 for v in values):
        raise NetworkConfigError(f"{full}: every value must be positive, got {value!r}")
    return tuple(values)
