"""LoRA for the FLUX.2 DiT: the trainable network, its kohya-form file, and applying LoRA files at inference.

A `LoRAModule` adds `multiplier * (alpha / rank) * up(down(x))` to the output of one Linear (nn.Linear, or a
frozen quantised one: fp8.Fp8Linear, bnb_linear.Nf4Linear / Int8Linear, which are QLoRA's bases) through a
forward hook, so the DiT's modules and state_dict keys never change and the update
can be detached again (`remove()`) or folded into the weights (`merge_into`). `AdapterModule` holds that
mechanism for every adapter kind; LoKr and LoHa (flux2.lycoris) build on it, and a network, its files and
`apply_loras` take all three alike. `param_groups` gives the optimizer per-block learning rates and LoRA+.

Which modules `create_network` targets (patterns are `re.fullmatch`ed against dotted module paths such as
`double_blocks.0.img_attn.qkv`, `single_blocks.3.linear1`, `img_in`, `final_layer.linear`):
- by default every Linear inside `double_blocks` and `single_blocks` (klein-4b 80, klein-9b 112, dev 160);
- minus those matching an `exclude_patterns` entry, unless they also match an `include_patterns` entry;
- plus any other Linear matching an `include_patterns` entry (e.g. `img_in`, `txt_in`, `final_layer.linear`).
  To train only some modules, exclude everything and include those: exclude `.*`, include `single_blocks.*`.
Norms are never targeted (they are not Linear layers). Imports only torch and our modules.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flux2.fp8 import Fp8Linear
from flux2.loading import expected_dit_shapes
from flux2.lora_formats import (LoRA, LoRAWeights, ModuleWeights, check_finite, detect_format, kohya_name,
                                read_lora)
from flux2.network_config import NetworkOptions
from flux2.safetensors_io import load_file, save_file_atomic
from flux2.variants import VARIANTS, Variant

# bitsandbytes' Linear4bit / Linear8bitLt (our Nf4Linear / Int8Linear) are nn.Linear subclasses: covered, without
# importing bitsandbytes here.
LINEAR_TYPES = (nn.Linear, Fp8Linear)
BLOCK_PREFIXES = ("double_blocks.", "single_blocks.")
NETWORK_MODULE = "flux2.lora"
IMPLEMENTATION = "https://github.com/black-forest-labs/flux2"
# Variant.arch -> the modelspec architecture name (`<name>/lora` in a LoRA file).
MODELSPEC_ARCHITECTURES = {"flux_2_dev": "Flux.2-dev", "flux_2_klein_4b": "Flux.2-klein-4b",
                           "flux_2_klein_9b": "Flux.2-klein-9b", "flux_2_tiny": "Flux.2-tiny"}


def _listing(items: list[str], n: int = 10) -> str:
    shown = ", ".join(items[:n])
    return shown if len(items) <= n else f"{shown} (and {len(items) - n} more)"


class AdapterModule(nn.Module):
    """What every adapter kind shares (LoRA here; LoKr and LoHa in flux2.lycoris): the update of one Linear, added
    to its output by a forward hook (`attach` / `remove`), so the DiT's modules and keys never change; the
    `multiplier`; module dropout (the whole update skipped for a step in training); the `alpha` buffer (the kohya
    key); and merging through `weight_delta`. A subclass holds the parameters and implements `forward(x)` (the
    update, multiplier included, in its own dtype), `weights()` (its canonical file form) and `up_parameters()`
    (the factor that starts at zero, which LoRA+ trains faster)."""

    kind, label = "lora", "LoRA"

    def __init__(self, path: str, in_features: int, out_features: int, alpha: float, multiplier: float = 1.0,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0,
                 device: torch.device | str | None = None):
        super().__init__()
        for name, p in (("rank_dropout", rank_dropout), ("module_dropout", module_dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{self.label} {name} must be in [0, 1), got {p}")
        self.path = path
        self.in_features, self.out_features = in_features, out_features
        # The buffer puts `.alpha` into the state_dict (the kohya key); the float is for arithmetic.
        self.register_buffer("alpha", torch.tensor(float(alpha), dtype=torch.float32, device=device))
        self.alpha_value = float(alpha)
        self.multiplier = multiplier
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self._hook = None

    def weights(self) -> ModuleWeights:
        """This module's weights in canonical form (detached; flux2.lora_formats)."""
        raise NotImplementedError

    def up_parameters(self) -> list[nn.Parameter]:
        """The parameters LoRA+ gives the higher learning rate."""
        raise NotImplementedError

    def _add_update(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        if self.training and self.module_dropout and torch.rand(()).item() < self.module_dropout:
            return output
        update = self(inputs[0])
        return (output.to(update.dtype) + update).to(output.dtype)

    def attach(self, target: nn.Module) -> None:
        """Add this update to `target`'s output (a forward hook; the target is not changed)."""
        if not isinstance(target, LINEAR_TYPES):
            raise ValueError(f"{self.label} for {self.path}: the DiT module there is a {type(target).__name__}, not a "
                             "Linear")
        shape, ours = (target.out_features, target.in_features), (self.out_features, self.in_features)
        if shape != ours:
            raise ValueError(f"{self.label} for {self.path} changes a {ours[0]}x{ours[1]} weight but the DiT's is "
                             f"{shape[0]}x{shape[1]}: the {self.label} is for another variant")
        self.remove()
        self._hook = target.register_forward_hook(self._add_update)

    def remove(self) -> None:
        """Detach from the Linear (no-op when not attached)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @property
    def attached(self) -> bool:
        return self._hook is not None

    def weight_delta(self) -> Tensor:
        """The change to the Linear's weight in float32, scale applied, multiplier not."""
        return self.weights().delta()


class LoRAModule(AdapterModule):
    """The low-rank update of one Linear: out += multiplier * (alpha / rank) * lora_up(lora_down(x)).

    Computed in the LoRA's dtype (often float32 beside a bf16 DiT), or in autocast's under autocast
    (adapter_input); the sum is cast back to the output dtype.
    In training mode: `dropout` on the down output, `rank_dropout` drops whole rank channels per sample (the
    rest rescaled), `module_dropout` skips the whole update for a step."""

    def __init__(self, path: str, in_features: int, out_features: int, rank: int, alpha: float,
                 multiplier: float = 1.0, dropout: float = 0.0, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        super().__init__(path, in_features, out_features, alpha, multiplier, rank_dropout, module_dropout, device)
        self.rank = rank
        self.lora_down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.lora_up = nn.Linear(rank, out_features, bias=False, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)  # the network starts as the identity
        self.scale = float(alpha) / rank
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        """The update multiplier * scale * up(down(x)), in the LoRA's dtype (autocast's under autocast)."""
        h = self.lora_down(adapter_input(x, self.lora_down.weight.dtype))
        scale = self.multiplier * self.scale
        if self.training and self.dropout:
            h = F.dropout(h, p=self.dropout)
        if self.training and self.rank_dropout:
            keep = torch.rand((h.shape[0],) + (1,) * (h.ndim - 2) + (self.rank,), device=h.device)
            h = h * (keep > self.rank_dropout).to(h.dtype)
            scale = scale / (1.0 - self.rank_dropout)
        return self.lora_up(h) * scale

    def weights(self) -> LoRAWeights:
        return LoRAWeights(self.lora_down.weight.detach(), self.lora_up.weight.detach(), self.alpha_value, self.path)

    def up_parameters(self) -> list[nn.Parameter]:
        return [self.lora_up.weight]


def adapter_input(x: Tensor, dtype: torch.dtype) -> Tensor:
    """`x` for an adapter's products in `dtype`: as it is under autocast, whose products cast it themselves (a
    float32 copy of a bf16 activation first, cast back by autocast, would give the same result and cost a float32
    copy of every adapted Linear's input: the largest transient of a checkpointed block), else in `dtype`."""
    return x if torch.is_autocast_enabled(x.device.type) else x.to(dtype)


def linear_modules(dit: nn.Module) -> dict[str, nn.Module]:
    """Dotted path -> module for every Linear (nn.Linear or a quantised one) of the DiT."""
    return {name: m for name, m in dit.named_modules() if isinstance(m, LINEAR_TYPES)}


def compile_patterns(patterns: Iterable[str], option: str) -> list[re.Pattern]:
    """The regexes of the option `option` (e.g. train.include_patterns), compiled; ValueError naming the option and
    the pattern when one is not a valid regular expression."""
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"{option} {p!r} is not a valid regular expression ({e})") from None
    return compiled


def target_modules(dit: nn.Module, include_patterns: Iterable[str] = (), exclude_patterns: Iterable[str] = (),
                   ) -> dict[str, nn.Module]:
    """The Linears a LoRA network trains (the rule is in the module docstring), in model order.

    Every pattern must match at least one Linear, so a typo fails loudly instead of training the wrong set."""
    linears = linear_modules(dit)
    include = compile_patterns(include_patterns, "train.include_patterns")
    exclude = compile_patterns(exclude_patterns, "train.exclude_patterns")
    for p in include + exclude:
        if not any(p.fullmatch(path) for path in linears):
            raise ValueError(f"LoRA pattern {p.pattern!r} matches no Linear of the DiT; patterns are fully matched "
                             "against module paths such as double_blocks.0.img_attn.qkv, single_blocks.3.linear1, "
                             "img_in, txt_in, final_layer.linear (use .* for 'anything')")

    def selected(path: str) -> bool:
        if any(p.fullmatch(path) for p in include):
            return True
        return path.startswith(BLOCK_PREFIXES) and not any(p.fullmatch(path) for p in exclude)

    targets = {path: m for path, m in linears.items() if selected(path)}
    if not targets:
        raise ValueError("the LoRA include/exclude patterns leave no module to train")
    return targets


class LoRANetwork(nn.Module):
    """A set of adapter modules (LoRA, LoKr, LoHa) for one DiT. Its state_dict is the kohya form
    (`lora_unet_<path>.lora_down.weight`, `.lora_up.weight`, `.alpha`; LyCORIS' `.lokr_w1`, `.hada_w1_a`, ...), as
    ComfyUI, musubi-tuner and LyCORIS read it (diffusers too for LoRA)."""

    def __init__(self, variant: Variant, modules: Iterable[AdapterModule], origin: str = "",
                 network_args: dict[str, str] | None = None):
        super().__init__()
        self.variant = variant
        self.origin = origin  # the file it was loaded from, if any
        self.network_args = dict(network_args or {})  # as LyCORIS records them (ss_network_args)
        for m in modules:
            self.add_module(kohya_name(m.path), m)

    @property
    def lora_modules(self) -> list[AdapterModule]:
        """The adapter modules, of any kind."""
        return [m for m in self.children() if isinstance(m, AdapterModule)]

    @property
    def network_type(self) -> str:
        """lora, lokr or loha ("mixed" for a file that mixes them)."""
        kinds = {m.kind for m in self.lora_modules}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def apply_to(self, dit: nn.Module) -> None:
        """Attach every module to its Linear of `dit` (forward hooks; `dit` and its keys do not change)."""
        for m in self.lora_modules:
            m.attach(dit.get_submodule(m.path))

    def remove(self) -> None:
        """Detach from the DiT: its outputs are the base model's again."""
        for m in self.lora_modules:
            m.remove()

    def set_multiplier(self, multiplier: float) -> None:
        for m in self.lora_modules:
            m.multiplier = multiplier

    @torch.no_grad()
    def merge_into(self, dit: nn.Module, multiplier: float = 1.0) -> None:
        """W += multiplier * scale * up @ down for every module (float32, cast back; a quantised Linear is
        dequantised, updated and quantised again). Detaches the hooks first: the update now lives in W."""
        self.remove()
        for m in self.lora_modules:
            add_to_weight(dit.get_submodule(m.path), multiplier * m.weight_delta())

    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """The kohya-form tensors on the CPU; matrices in `dtype` if given, alphas always float32 scalars."""
        out = {}
        for key, value in self.state_dict().items():
            value = value.detach().to("cpu")
            if key.endswith(".alpha"):
                value = value.float()
            elif dtype is not None:
                value = value.to(dtype)
            out[key] = value.contiguous()
        return out

    def file_metadata(self) -> dict[str, str]:
        """The metadata that describes this network in a saved file (kohya `ss_*` and modelspec keys)."""
        arch = self.variant.arch
        kind = self.network_type
        meta = {"ss_network_module": NETWORK_MODULE if kind == "lora" else "lycoris.kohya",
                "ss_base_model_version": arch, "flux2.network_type": kind,
                "modelspec.sai_model_spec": "1.0.0",
                "modelspec.architecture": MODELSPEC_ARCHITECTURES.get(arch, f"Flux.2-{self.variant.name}") + "/lora",
                "modelspec.implementation": IMPLEMENTATION}
        if kind != "lora":
            meta["ss_network_args"] = json.dumps(self.network_args or {"algo": kind})
        ranks = {m.rank for m in self.lora_modules}
        alphas = {m.alpha_value for m in self.lora_modules}
        if len(ranks) == 1:
            meta["ss_network_dim"] = str(ranks.pop())
        if len(alphas) == 1:
            meta["ss_network_alpha"] = str(alphas.pop())
        return meta

    def save(self, path: str | os.PathLike, metadata: dict[str, str] | None = None,
             dtype: torch.dtype | None = None) -> None:
        """Write the kohya-form file atomically. `metadata` (training parameters, data hash, commit, ...) is
        stored too; the keys of `file_metadata()` always describe the network itself. Non-finite values are
        refused and leave no file."""
        metadata = dict(metadata or {})
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ValueError(f"LoRA metadata must map strings to strings; convert these entries with str(): "
                             f"{_listing([repr(k) for k in bad])}")
        tensors = self.kohya_state_dict(dtype)
        check_finite(tensors, path)
        save_file_atomic(tensors, path, {**metadata, **self.file_metadata()})

    def load_weights(self, source: str | os.PathLike | dict[str, Tensor]) -> None:
        """Load weights saved by `save` into this network (to resume training). Strict: the same modules,
        shapes and alphas, else a ValueError saying what differs."""
        origin = "<state dict>" if isinstance(source, dict) else str(source)
        sd = source if isinstance(source, dict) else load_file(source)
        expected = self.state_dict()
        missing = sorted(set(expected) - set(sd))
        unexpected = sorted(set(sd) - set(expected))
        if missing or unexpected:
            hint = ""
            if unexpected and not any(k.startswith("lora_unet_") for k in sd):
                hint = (f" The file is in the {detect_format(sd, origin)} layout; resuming needs the kohya layout "
                        "that training saves (flux2 convert-lora --target kohya).")
            problems = [f"{what} {len(keys)} tensors ({_listing(keys)})"
                        for what, keys in (("it lacks", missing), ("it has unexpected", unexpected)) if keys]
            raise ValueError(f"{origin} does not fit this LoRA network: {'; '.join(problems)}. Resume with the "
                             f"same variant, rank and include/exclude patterns it was trained with.{hint}")
        shapes = [f"{k}: file {tuple(sd[k].shape)}, network {tuple(v.shape)}" for k, v in expected.items()
                  if tuple(sd[k].shape) != tuple(v.shape)]
        if shapes:
            raise ValueError(f"{origin} does not fit this LoRA network (another rank or variant?): {_listing(shapes)}")
        alphas = [f"{m.path}: file {float(sd[k]):g}, network {m.alpha_value:g}"
                  for k in expected if k.endswith(".alpha")
                  for m in [self.get_submodule(k.removesuffix(".alpha"))] if float(sd[k]) != m.alpha_value]
        if alphas:
            raise ValueError(f"{origin} was trained with another network_alpha: {_listing(alphas)}; resume with "
                             "the alpha it was trained with")
        self.load_state_dict({k: sd[k] for k in expected}, strict=True)


def create_network(dit: nn.Module, rank: int, alpha: float | None = 1.0, include_patterns: Iterable[str] = (),
                   exclude_patterns: Iterable[str] = (), dropout: float = 0.0, rank_dropout: float = 0.0,
                   module_dropout: float = 0.0, dtype: torch.dtype = torch.float32,
                   options: NetworkOptions | None = None) -> LoRANetwork:
    """A new network for `dit` (not attached yet: call `apply_to`): LoRA, or LoKr / LoHa as `options.network_type`
    says, with `options`' per-block ranks (0: no module there) and alphas. scale = alpha / rank; alpha None or 0
    means alpha = rank (scale 1), as in kohya's trainers. The modules live on the device of their Linear."""
    options = options or NetworkOptions()
    modules = []
    for path, m in target_modules(dit, include_patterns, exclude_patterns).items():
        module_rank = options.rank_for(path, rank)
        if module_rank == 0:
            continue
        module_alpha = options.alpha_for(path, alpha)
        if module_alpha is None or module_alpha == 0:
            module_alpha = float(module_rank)
        if module_alpha < 0:
            raise ValueError(f"LoRA alpha must be positive, got {module_alpha}")
        modules.append(_new_module(options, path, m, module_rank, module_alpha, dropout, rank_dropout,
                                   module_dropout, dtype))
    if not modules:
        raise ValueError("train.network_args: the per-block ranks of 0 leave no module to train")
    return LoRANetwork(dit.variant, modules,
                       network_args=options.lycoris_args() if options.network_type != "lora" else None)


def _new_module(options: NetworkOptions, path: str, linear: nn.Module, rank: int, alpha: float, dropout: float,
                rank_dropout: float, module_dropout: float, dtype: torch.dtype) -> AdapterModule:
    shape = dict(in_features=linear.in_features, out_features=linear.out_features, rank=rank, alpha=alpha,
                 rank_dropout=rank_dropout, module_dropout=module_dropout, dtype=dtype, device=linear.weight.device)
    if options.network_type == "lora":
        return LoRAModule(path, dropout=dropout, **shape)
    from flux2.lycoris import LoHaModule, LoKrModule  # they build on this module

    if options.network_type == "lokr":
        return LoKrModule(path, factor=options.factor, decompose_both=options.decompose_both,
                          full_matrix=options.full_matrix, **shape)
    return LoHaModule(path, **shape)


def param_groups(network: LoRANetwork, learning_rate: float, options: NetworkOptions | None = None) -> list[dict]:
    """The optimizer's parameter groups: one per learning rate (the per-block rates of `options`, LoRA+'s ratio on
    each module's up factor), each {"params", "lr", "lr_scale"} with lr = learning_rate * lr_scale; training
    multiplies lr_scale by the schedule's rate. Groups and their parameters follow the module order, so a rebuilt
    optimizer lines up with a checkpoint's state. One group when every rate is learning_rate."""
    options = options or NetworkOptions()
    ratio = options.loraplus_lr_ratio or 1.0
    groups: dict[float, list[nn.Parameter]] = {}
    for m in network.lora_modules:
        block = options.lr_for(m.path, learning_rate) / learning_rate if learning_rate else 1.0
        up = {id(q) for q in m.up_parameters()}
        for q in m.parameters():
            if q.requires_grad:
                groups.setdefault(block * ratio if id(q) in up else block, []).append(q)
    return [{"params": params, "lr": learning_rate * scale, "lr_scale": scale} for scale, params in groups.items()]


# ---------------------------------------------------------------------------------------------- weights

@torch.no_grad()
def add_to_weight(target: nn.Module, delta: Tensor) -> None:
    """W += delta, computed in float32 and stored back in W's format (a quantised Linear - fp8, NF4, int8 - is
    dequantised and quantised again in its own format)."""
    from flux2.quantize import is_quantized_linear

    if is_quantized_linear(target):
        target.set_weight(target.dequantized_weight(torch.float32) + delta.to(target.weight.device, torch.float32))
    elif isinstance(target, nn.Linear):
        target.weight.copy_(target.weight.float() + delta.to(target.weight.device, torch.float32))
    else:
        raise ValueError(f"cannot merge a LoRA into a {type(target).__name__}; only Linear layers take LoRAs")


# ---------------------------------------------------------------------------------------------- inference

def _fitting_variants(lora: LoRA) -> str:
    """Which variants every module of `lora` fits by shape, e.g. 'flux_2_klein_4b (klein-4b, klein-base-4b)'."""
    by_arch: dict[str, list[str]] = {}
    for name, variant in VARIANTS.items():
        shapes = expected_dit_shapes(variant)
        if all(shapes.get(f"{path}.weight") == w.shape for path, w in lora.modules.items()):
            by_arch.setdefault(variant.arch, []).append(name)
    return "; ".join(f"{arch} ({', '.join(names)})" for arch, names in by_arch.items())


def _made_for(lora: LoRA) -> str:
    """A sentence saying which model the LoRA looks made for, from its shapes and its metadata."""
    fits = _fitting_variants(lora)
    text = (f" By its shapes it looks made for {fits}." if fits
            else " Its shapes fit no FLUX.2 variant (a LoRA for FLUX.1 or another model?).")
    base = lora.metadata.get("ss_base_model_version") or lora.metadata.get("modelspec.architecture")
    if base:
        text += f" Its metadata says it was trained on {base}."
    return text


def network_from_lora(dit: nn.Module, lora: LoRA, multiplier: float = 1.0) -> LoRANetwork:
    """A (frozen) LoRANetwork holding `lora`'s weights, sized for `dit`; errors name the file, the modules
    that do not fit and the variant the LoRA looks made for."""
    variant = dit.variant
    linears = linear_modules(dit)
    unmatched = [f"{w.source or path}" for path, w in lora.modules.items() if path not in linears]
    if unmatched:
        raise ValueError(f"{lora.origin}: {len(unmatched)} of its {len(lora.modules)} LoRA modules match no module "
                         f"of the {variant.name} DiT: {_listing(unmatched)}.{_made_for(lora)} Use the LoRA with the "
                         "model it was trained for.")
    wrong = []
    for path, w in lora.modules.items():
        model = (linears[path].out_features, linears[path].in_features)
        theirs = w.shape
        if model != theirs:
            wrong.append(f"{path} (model {model[0]}x{model[1]}, LoRA {theirs[0]}x{theirs[1]})")
    if wrong:
        raise ValueError(f"{lora.origin} does not fit the {variant.name} DiT ({variant.arch}): {len(wrong)} of its "
                         f"{len(lora.modules)} modules have other shapes: {_listing(wrong, 3)}.{_made_for(lora)} Use "
                         "the LoRA with the model it was trained for.")
    modules = []
    for path, w in lora.modules.items():
        device = linears[path].weight.device
        if w.kind == "lora":
            m = LoRAModule(path, w.down.shape[1], w.up.shape[0], w.rank, w.alpha, multiplier=multiplier,
                           device=device)
            with torch.no_grad():
                m.lora_down.weight.copy_(w.down)
                m.lora_up.weight.copy_(w.up)
        else:
            from flux2.lycoris import LoHaModule, LoKrModule  # they build on this module

            m = (LoKrModule if w.kind == "lokr" else LoHaModule).from_weights(path, w, multiplier, device)
        modules.append(m)
    network = LoRANetwork(variant, modules, origin=lora.origin)
    return network.requires_grad_(False).eval()


def filter_lora(lora: LoRA, include: str | None = None, exclude: str | None = None) -> LoRA:
    """Keep the modules whose BFL path or name in the file `re.search`es `include` (all when None), then drop
    those that match `exclude`."""
    def hit(pattern: str, path: str) -> bool:
        return bool(re.search(pattern, path) or re.search(pattern, lora.modules[path].source))

    kept = {p: w for p, w in lora.modules.items()
            if (include is None or hit(include, p)) and not (exclude is not None and hit(exclude, p))}
    if not kept:
        raise ValueError(f"{lora.origin}: the include/exclude patterns ({include!r}, {exclude!r}) leave none of its "
                         f"{len(lora.modules)} modules (e.g. {next(iter(lora.modules), '')})")
    return LoRA(kept, lora.metadata, lora.format, lora.origin)


def _per_file(value, n: int, what: str) -> list:
    """One entry per LoRA file: None -> all None, a single value -> repeated, a list -> checked length."""
    if value is None or isinstance(value, (str, int, float)):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"got {len(value)} {what} for {n} LoRA files; give one per file (or a single one for all)")
    return value


def apply_loras(dit: nn.Module, lora_paths: Sequence[str | os.PathLike], multipliers: Sequence[float] | float = 1.0,
                include_patterns: Sequence[str | None] | str | None = None,
                exclude_patterns: Sequence[str | None] | str | None = None,
                merge: bool = True) -> list[LoRANetwork]:
    """Apply LoRA files (kohya, ComfyUI/BFL or diffusers layout, detected per file) to `dit`.

    `multipliers`, `include_patterns` and `exclude_patterns` give one entry per file (or one for all); the
    patterns filter each file's modules with `re.search` on the BFL module path or the module's name in the file.
    Every file is read and checked before `dit` changes. merge=True adds the updates into the weights (summed
    per module, so an fp8 weight is re-quantised once); merge=False attaches them as hooks (the returned
    networks' `remove()` undoes it). Both give the same output."""
    paths = list(lora_paths)
    multipliers = [float(m) for m in _per_file(multipliers, len(paths), "multipliers")]
    includes = _per_file(include_patterns, len(paths), "include patterns")
    excludes = _per_file(exclude_patterns, len(paths), "exclude patterns")
    networks = []
    for path, multiplier, include, exclude in zip(paths, multipliers, includes, excludes):
        lora = filter_lora(read_lora(path), include, exclude)
        networks.append(network_from_lora(dit, lora, multiplier))
    if not merge:
        for network in networks:
            network.apply_to(dit)
        return networks
    with torch.no_grad():
        for path in dict.fromkeys(m.path for net in networks for m in net.lora_modules):
            delta = sum(mult * m.weight_delta() for net, mult in zip(networks, multipliers)
                        for m in net.lora_modules if m.path == path)
            add_to_weight(dit.get_submodule(path), delta)
    return networks
