"""LyCORIS adapters for the FLUX.2 DiT: LoKr (Kronecker product) and LoHa (Hadamard product).

They train, attach, merge and save like LoRA (flux2.lora.AdapterModule holds the hook and merge mechanics); their
parameters carry LyCORIS' tensor names, so a network's state_dict is the file layout ComfyUI, musubi-tuner and
LyCORIS read (`lora_unet_double_blocks_0_img_attn_qkv.lokr_w1`, `.lokr_w2_a`, `.hada_w1_a`, `.alpha`). Each adapts
one whole BFL module: a fused qkv or linear1 is one LoKr / LoHa of its full (out, in) shape, as in ComfyUI.

- LoKr: delta W = scale * kron(w1, w2). The weight's sides are factorised, out = out_l * out_k and
  in = in_m * in_n (`factorization`: LyCORIS' rule, the divisor pair nearest a square whose smaller side is at
  most `factor`); w1 (out_l, in_m) is whole, or w1_a @ w1_b with decompose_both; w2 (out_k, in_n) is w2_a @ w2_b
  of the given rank unless that rank is at least half its larger side or full_matrix is set. scale =
  alpha / rank, and 1 without a low-rank factor (alpha is then stored as the rank, as LyCORIS does). Initialised
  as LyCORIS does: w1 (or w1_a, w1_b) and w2_a Kaiming-uniform, w2 / w2_b zero, so the update starts at zero.
  The forward pass never builds delta W: y = w1 . X . w2^T with the input reshaped to X (in_m, in_n).
- LoHa: delta W = (alpha / rank) * (w1_a @ w1_b) * (w2_a @ w2_b), elementwise. Initialised as LyCORIS does:
  w1_a normal(0.1), w1_b and w2_b normal(1), w2_a zero. The forward pass builds delta W (out x in): the product
  has no factored form, so LoHa costs a weight-sized tensor per module and step.
Dropouts in training: module_dropout skips the whole update for a step; rank_dropout drops output channels of the
update per sample and rescales the rest. LoRA's neuron dropout has nothing to act on (LyCORIS ignores it too).
Imports only torch and our modules.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flux2.lora import AdapterModule, adapter_input
from flux2.lora_formats import LoHaWeights, LoKrWeights


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m <= n and m * n = dimension: `factor` and its cofactor when factor divides dimension;
    otherwise the largest divisor m <= sqrt(dimension) that is at most `factor` (any, for -1)."""
    if factor > 0 and dimension % factor == 0:
        return tuple(sorted((factor, dimension // factor)))
    limit = dimension if factor < 0 else factor
    m = max(d for d in range(1, math.isqrt(dimension) + 1) if dimension % d == 0 and d <= limit)
    return m, dimension // m


def lokr_layout(out_features: int, in_features: int, rank: int, factor: int = -1, decompose_both: bool = False,
                full_matrix: bool = False) -> dict[str, tuple[int, int]]:
    """The LoKr parameters of one Linear by their LyCORIS name -> shape (the rule in the module docstring)."""
    out_l, out_k = factorization(out_features, factor)
    in_m, in_n = factorization(in_features, factor)
    layout = {}
    if decompose_both and not full_matrix and rank < max(out_l, in_m) / 2:
        layout.update(lokr_w1_a=(out_l, rank), lokr_w1_b=(rank, in_m))
    else:
        layout["lokr_w1"] = (out_l, in_m)
    if not full_matrix and rank < max(out_k, in_n) / 2:
        layout.update(lokr_w2_a=(out_k, rank), lokr_w2_b=(rank, in_n))
    else:
        layout["lokr_w2"] = (out_k, in_n)
    return layout


def _factor_shape(layout: dict[str, tuple[int, int]], name: str) -> tuple[int, int]:
    """The whole shape of LoKr factor `name` (lokr_w1 / lokr_w2) in a layout."""
    return layout[name] if name in layout else (layout[f"{name}_a"][0], layout[f"{name}_b"][1])


def _dropped(update: Tensor, scale: float, p: float, training: bool) -> Tensor:
    """update * scale, with (in training) output channels dropped per sample and the rest rescaled."""
    if training and p:
        keep = torch.rand((update.shape[0],) + (1,) * (update.ndim - 2) + (update.shape[-1],), device=update.device)
        update = update * (keep > p).to(update.dtype)
        scale = scale / (1.0 - p)
    return update * scale


class LoKrModule(AdapterModule):
    """The LoKr update of one Linear: out += multiplier * scale * x @ kron(w1, w2)^T."""

    kind, label = "lokr", "LoKr"

    def __init__(self, path: str, in_features: int, out_features: int, rank: int, alpha: float, factor: int = -1,
                 decompose_both: bool = False, full_matrix: bool = False, multiplier: float = 1.0,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, layout: dict[str, tuple[int, int]] | None = None):
        """`layout` (parameter name -> shape) overrides the one rank/factor/decompose_both/full_matrix give: a
        module read from a file takes the file's shapes."""
        if rank < 1:
            raise ValueError(f"LoKr rank must be at least 1, got {rank}")
        from_file = layout is not None
        layout = layout or lokr_layout(out_features, in_features, rank, factor, decompose_both, full_matrix)
        low_rank = layout.get("lokr_w2_b", layout.get("lokr_w1_b"))
        # Without a low-rank factor the scale is 1 whatever alpha says; LyCORIS then stores alpha = rank.
        stored_alpha = alpha if low_rank is not None or from_file else float(rank)
        super().__init__(path, in_features, out_features, stored_alpha, multiplier, rank_dropout, module_dropout,
                         device)
        self.rank = rank
        self.scale = 1.0 if low_rank is None else self.alpha_value / low_rank[0]
        for name, shape in layout.items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=dtype, device=device)))
        for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a"):
            if name in layout:
                nn.init.kaiming_uniform_(getattr(self, name), a=math.sqrt(5))
        nn.init.zeros_(self.up_parameters()[0])
        (a, c), (b, d) = (_factor_shape(layout, "lokr_w1"), _factor_shape(layout, "lokr_w2"))
        if (a * b, c * d) != (out_features, in_features):
            raise ValueError(f"LoKr for {path}: factors {layout} make a {a * b}x{c * d} weight, not "
                             f"{out_features}x{in_features}")

    @classmethod
    def from_weights(cls, path: str, w: LoKrWeights, multiplier: float = 1.0,
                     device: torch.device | str | None = None) -> LoKrModule:
        """A module holding the weights of a file (float32 copies, on `device`)."""
        tensors = {k: t for k, t in w.tensors().items() if k != "alpha"}
        out_features, in_features = w.shape
        module = cls(path, in_features, out_features, w.rank or 1, w.alpha, multiplier=multiplier, device=device,
                     layout={k: tuple(t.shape) for k, t in tensors.items()})
        with torch.no_grad():
            for name, t in tensors.items():
                getattr(module, name).copy_(t)
        return module

    def _w1(self) -> Tensor:
        return self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b

    def forward(self, x: Tensor) -> Tensor:
        """The update multiplier * scale * kron(w1, w2) x, computed factor by factor in the module's dtype."""
        w1 = self._w1()
        x = adapter_input(x, w1.dtype)
        h = x.reshape(*x.shape[:-1], w1.shape[1], -1)  # (..., in_m, in_n)
        if hasattr(self, "lokr_w2"):
            h = h @ self.lokr_w2.T
        else:
            h = (h @ self.lokr_w2_b.T) @ self.lokr_w2_a.T  # (..., in_m, out_k)
        y = (w1 @ h).reshape(*x.shape[:-1], self.out_features)  # (..., out_l, out_k) -> out
        return _dropped(y, self.multiplier * self.scale, self.rank_dropout, self.training)

    def weights(self) -> LoKrWeights:
        names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
        tensors = {n.removeprefix("lokr_"): getattr(self, n).detach() for n in names if hasattr(self, n)}
        return LoKrWeights(**tensors, alpha=self.alpha_value, source=self.path)

    def up_parameters(self) -> list[nn.Parameter]:
        """The factor that starts at zero: w2, or w2_b."""
        return [self.lokr_w2 if hasattr(self, "lokr_w2") else self.lokr_w2_b]


class LoHaModule(AdapterModule):
    """The LoHa update of one Linear: out += multiplier * (alpha / rank) * x @ ((w1_a @ w1_b) * (w2_a @ w2_b))^T."""

    kind, label = "loha", "LoHa"

    def __init__(self, path: str, in_features: int, out_features: int, rank: int, alpha: float,
                 multiplier: float = 1.0, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        if rank < 1:
            raise ValueError(f"LoHa rank must be at least 1, got {rank}")
        super().__init__(path, in_features, out_features, alpha, multiplier, rank_dropout, module_dropout, device)
        self.rank = rank
        self.scale = self.alpha_value / rank
        shapes = {"hada_w1_a": (out_features, rank), "hada_w1_b": (rank, in_features),
                  "hada_w2_a": (out_features, rank), "hada_w2_b": (rank, in_features)}
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=dtype, device=device)))
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.normal_(self.hada_w2_b, std=1.0)
        nn.init.zeros_(self.hada_w2_a)  # the update starts at zero

    @classmethod
    def from_weights(cls, path: str, w: LoHaWeights, multiplier: float = 1.0,
                     device: torch.device | str | None = None) -> LoHaModule:
        if w.w2_b.shape[0] != w.rank:
            raise ValueError(f"LoHa for {path}: ranks {w.rank} and {w.w2_b.shape[0]} of its two products differ; "
                             "flux2 applies LoHa files whose two products share one rank (as LyCORIS writes them)")
        out_features, in_features = w.shape
        module = cls(path, in_features, out_features, w.rank, w.alpha, multiplier=multiplier, device=device)
        with torch.no_grad():
            for name, t in w.tensors().items():
                if name != "alpha":
                    getattr(module, name).copy_(t)
        return module

    def forward(self, x: Tensor) -> Tensor:
        """The update, through the delta weight built in the module's dtype."""
        delta = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)
        y = F.linear(adapter_input(x, delta.dtype), delta)
        return _dropped(y, self.multiplier * self.scale, self.rank_dropout, self.training)

    def weights(self) -> LoHaWeights:
        return LoHaWeights(self.hada_w1_a.detach(), self.hada_w1_b.detach(), self.hada_w2_a.detach(),
                           self.hada_w2_b.detach(), self.alpha_value, self.path)

    def up_parameters(self) -> list[nn.Parameter]:
        """The factor that starts at zero: w2_a."""
        return [self.hada_w2_a]
