"""LoRA files for the FLUX.2 DiT: one canonical in-memory form and the three layouts found on disk.

Canonical form (`LoRA`): BFL module path (`double_blocks.0.img_attn.qkv`, `single_blocks.3.linear1`, `img_in`)
-> the module's update, one of
- `LoRAWeights(down (r, in), up (out, r), alpha)`: the weight changes by (alpha / r) * up @ down;
- `LoKrWeights` (LyCORIS LoKr): scale * kron(w1, w2), each factor whole or a low-rank product;
- `LoHaWeights` (LyCORIS LoHa): (alpha / r) * (w1_a @ w1_b) * (w2_a @ w2_b), elementwise.
LoKr and LoHa use LyCORIS' tensor names (`lokr_w1`, `lokr_w2_a`, `hada_w1_a`, ... and `alpha`) in the kohya
and comfy layouts, as ComfyUI, musubi-tuner and LyCORIS read them; their scale follows ComfyUI and LyCORIS.

Layouts (`detect_format` tells them apart by their keys):
- "kohya" (musubi-tuner, sd-scripts; ComfyUI and diffusers read it too): `lora_unet_<path, '.' -> '_'>`
  + `.lora_down.weight` (r, in), `.lora_up.weight` (out, r), `.alpha` (scalar; missing means alpha = r).
- "comfy" (BFL / ComfyUI / ai-toolkit): `diffusion_model.<path>.lora_A.weight` (down) and `.lora_B.weight`
  (up), also spelt `lora_down` / `lora_up`, with an optional `.alpha` (missing means scale 1). Some files use
  diffusers module names after the prefix; those are read too.
- "diffusers" (PEFT): `transformer.<diffusers module>.lora_A.weight` / `.lora_B.weight` (or the prefix
  `base_model.model.`). A double block's fused qkv is three diffusers modules (to_q / to_k / to_v). The scale
  comes from the PEFT config in the `lora_adapter_metadata` metadata when present, else it is 1.

Kohya names are mapped back to module paths by matching against the DiT's known Linear names (the tables
below), never by replacing every '_' with '.': `img_attn`, `linear1` and `adaLN_modulation` contain '_'.
Imports only torch and our safetensors I/O.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import ClassVar, Iterable

import torch
from torch import Tensor

from flux2.safetensors_io import load_file, read_metadata, save_file_atomic

FORMATS = ("kohya", "comfy", "diffusers")

# The Linear modules of the FLUX.2 DiT (BFL names, see flux2.model) -> their diffusers module name(s).
# Inside double_blocks.{i} -> inside transformer_blocks.{i}; a fused qkv is three diffusers modules.
DOUBLE_BLOCK_LINEARS: dict[str, tuple[str, ...]] = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.linear_in",),
    "img_mlp.2": ("ff.linear_out",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.linear_in",),
    "txt_mlp.2": ("ff_context.linear_out",),
}
# Inside single_blocks.{j} -> inside single_transformer_blocks.{j}.
SINGLE_BLOCK_LINEARS: dict[str, tuple[str, ...]] = {
    "linear1": ("attn.to_qkv_mlp_proj",),
    "linear2": ("attn.to_out",),
}
TOP_LEVEL_LINEARS: dict[str, tuple[str, ...]] = {
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in.in_layer": ("time_guidance_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_guidance_embed.timestep_embedder.linear_2",),
    "guidance_in.in_layer": ("time_guidance_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_guidance_embed.guidance_embedder.linear_2",),
    "double_stream_modulation_img.lin": ("double_stream_modulation_img.linear",),
    "double_stream_modulation_txt.lin": ("double_stream_modulation_txt.linear",),
    "single_stream_modulation.lin": ("single_stream_modulation.linear",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}
# BFL stores this output as [shift; scale], diffusers as [scale; shift]: the up rows swap halves.
SWAPPED_HALVES = frozenset({"final_layer.adaLN_modulation.1"})

_BLOCKS = (("double_blocks", "transformer_blocks", DOUBLE_BLOCK_LINEARS),
           ("single_blocks", "single_transformer_blocks", SINGLE_BLOCK_LINEARS))
_AB_SUFFIXES = {"lora_A.weight": "down", "lora_down.weight": "down", "lora_B.weight": "up", "lora_up.weight": "up"}
_PREFIXES = {"kohya": ("lora_unet_",), "comfy": ("diffusion_model.",),
             "diffusers": ("transformer.", "base_model.model.")}
# Adapter kinds flux2 does not apply; each marker is searched in the keys.
_UNSUPPORTED = {"dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", ".oft_": "OFT",
                **{f".{t}": "Tucker-decomposed (convolution) LyCORIS" for t in ("lokr_t1", "lokr_t2", "hada_t1",
                                                                                "hada_t2")},
                ".lora_mid.": "Tucker-decomposed (convolution) LoCon"}
# The tensors of one module, by adapter kind (`alpha` is shared by all three).
LORA_SUFFIXES = ("lora_down.weight", "lora_up.weight")
LOKR_SUFFIXES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
LOHA_SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_LYCORIS_SUFFIXES = LOKR_SUFFIXES + LOHA_SUFFIXES
# Tensors outside any module that some writers add and that change nothing (musubi-tuner's LoKr factor).
_IGNORED_KEYS = frozenset({"lokr_factor"})


class LoRAFormatError(ValueError):
    """A LoRA file that cannot be read or written; the message names the file, the problem and the fix."""


@dataclass
class LoRAWeights:
    """One module's low-rank update: the weight changes by (alpha / rank) * up @ down."""

    down: Tensor  # (rank, in_features)
    up: Tensor  # (out_features, rank)
    alpha: float
    source: str = ""  # the module's name(s) in the file it came from, for messages
    kind: ClassVar[str] = "lora"

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the weight it changes."""
        return self.up.shape[0], self.down.shape[1]

    def delta(self) -> Tensor:
        """(alpha / rank) * up @ down in float32: what is added to the weight at multiplier 1."""
        return self.scale * (self.up.float() @ self.down.float())

    def tensors(self) -> dict[str, Tensor]:
        """The module's tensors by their kohya suffix."""
        return {"lora_down.weight": self.down, "lora_up.weight": self.up,
                "alpha": torch.tensor(self.alpha, dtype=torch.float32)}


@dataclass
class LoKrWeights:
    """One module's LoKr update (LyCORIS): the weight changes by scale * kron(w1, w2).

    Each factor is stored whole (`w1` (a, c), `w2` (b, d)) or as a low-rank product (`w1_a @ w1_b`,
    `w2_a @ w2_b`); the weight is (a * b, c * d). scale = alpha / rank of the low-rank factor (w2's, else w1's),
    and 1 when both factors are whole - the rule of ComfyUI, LyCORIS and diffusers."""

    w1: Tensor | None = None
    w1_a: Tensor | None = None
    w1_b: Tensor | None = None
    w2: Tensor | None = None
    w2_a: Tensor | None = None
    w2_b: Tensor | None = None
    alpha: float = 1.0
    source: str = ""
    kind: ClassVar[str] = "lokr"

    @property
    def rank(self) -> int | None:
        """The inner dimension of the low-rank factor (None when both factors are whole)."""
        if self.w2_b is not None:
            return self.w2_b.shape[0]
        return self.w1_b.shape[0] if self.w1_b is not None else None

    @property
    def scale(self) -> float:
        return 1.0 if self.rank is None else self.alpha / self.rank

    def factors(self) -> tuple[Tensor, Tensor]:
        """(w1, w2) as whole matrices, in float32 (unscaled)."""
        w1 = self.w1.float() if self.w1 is not None else self.w1_a.float() @ self.w1_b.float()
        w2 = self.w2.float() if self.w2 is not None else self.w2_a.float() @ self.w2_b.float()
        return w1, w2

    @property
    def shape(self) -> tuple[int, int]:
        (a, c), (b, d) = (_factor_shape(self.w1, self.w1_a, self.w1_b), _factor_shape(self.w2, self.w2_a, self.w2_b))
        return a * b, c * d

    def delta(self) -> Tensor:
        """scale * kron(w1, w2) in float32."""
        return self.scale * torch.kron(*self.factors())

    def tensors(self) -> dict[str, Tensor]:
        out = {f"lokr_{name}": t for name in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")
               if (t := getattr(self, name)) is not None}
        return {**out, "alpha": torch.tensor(self.alpha, dtype=torch.float32)}


@dataclass
class LoHaWeights:
    """One module's LoHa update (LyCORIS): the weight changes by (alpha / rank) * (w1_a @ w1_b) * (w2_a @ w2_b),
    the product taken elementwise (Hadamard); rank is w1_b's first dimension."""

    w1_a: Tensor  # (out_features, rank)
    w1_b: Tensor  # (rank, in_features)
    w2_a: Tensor
    w2_b: Tensor
    alpha: float
    source: str = ""
    kind: ClassVar[str] = "loha"

    @property
    def rank(self) -> int:
        return self.w1_b.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def shape(self) -> tuple[int, int]:
        return self.w1_a.shape[0], self.w1_b.shape[1]

    def delta(self) -> Tensor:
        """(alpha / rank) * (w1_a @ w1_b) * (w2_a @ w2_b) in float32."""
        f = [t.float() for t in (self.w1_a, self.w1_b, self.w2_a, self.w2_b)]
        return self.scale * ((f[0] @ f[1]) * (f[2] @ f[3]))

    def tensors(self) -> dict[str, Tensor]:
        return {"hada_w1_a": self.w1_a, "hada_w1_b": self.w1_b, "hada_w2_a": self.w2_a, "hada_w2_b": self.w2_b,
                "alpha": torch.tensor(self.alpha, dtype=torch.float32)}


ModuleWeights = LoRAWeights | LoKrWeights | LoHaWeights


def _factor_shape(whole: Tensor | None, a: Tensor | None, b: Tensor | None) -> tuple[int, int]:
    return tuple(whole.shape) if whole is not None else (a.shape[0], b.shape[1])


@dataclass
class LoRA:
    """A LoRA (or LyCORIS adapter) in canonical form: BFL module path -> weights, plus the file's metadata."""

    modules: dict[str, ModuleWeights]
    metadata: dict[str, str] = field(default_factory=dict)
    format: str = "kohya"  # the layout it was read from
    origin: str = "<state dict>"  # the file it was read from, for messages


# ---------------------------------------------------------------------------------------------- names

def is_module_path(path: str) -> bool:
    """Whether `path` names a Linear of some FLUX.2 DiT (any block index)."""
    return _split_block_path(path) is not None or path in TOP_LEVEL_LINEARS


def _split_block_path(path: str) -> tuple[str, int, str] | None:
    """'double_blocks.3.img_attn.qkv' -> ('double_blocks', 3, 'img_attn.qkv'), or None."""
    for bfl_blocks, _, table in _BLOCKS:
        m = re.fullmatch(rf"{bfl_blocks}\.(\d+)\.(.+)", path)
        if m and m.group(2) in table:
            return bfl_blocks, int(m.group(1)), m.group(2)
    return None


def kohya_name(path: str) -> str:
    """'double_blocks.0.img_attn.qkv' -> 'lora_unet_double_blocks_0_img_attn_qkv'."""
    return "lora_unet_" + path.replace(".", "_")


def module_path_from_kohya(name: str) -> str | None:
    """'lora_unet_double_blocks_0_img_attn_qkv' -> 'double_blocks.0.img_attn.qkv'; None if it names no Linear
    of the FLUX.2 DiT."""
    if not name.startswith("lora_unet_"):
        return None
    rest = name[len("lora_unet_"):]
    for bfl_blocks, _, table in _BLOCKS:
        m = re.fullmatch(rf"{bfl_blocks}_(\d+)_(.+)", rest)
        if m:
            inner = next((k for k in table if k.replace(".", "_") == m.group(2)), None)
            return None if inner is None else f"{bfl_blocks}.{int(m.group(1))}.{inner}"
    return next((k for k in TOP_LEVEL_LINEARS if k.replace(".", "_") == rest), None)


def diffusers_names(path: str) -> tuple[str, ...]:
    """BFL module path -> its diffusers module name(s), three for a double block's fused qkv."""
    split = _split_block_path(path)
    if split:
        bfl_blocks, i, inner = split
        diffusers_blocks, table = next((d, t) for b, d, t in _BLOCKS if b == bfl_blocks)
        return tuple(f"{diffusers_blocks}.{i}.{n}" for n in table[inner])
    if path in TOP_LEVEL_LINEARS:
        return TOP_LEVEL_LINEARS[path]
    raise KeyError(f"{path!r} is not a Linear of the FLUX.2 DiT")


def module_path_from_diffusers(name: str) -> tuple[str, int, int] | None:
    """Diffusers module name -> (BFL module path, piece index, number of pieces); e.g.
    'transformer_blocks.0.attn.to_k' -> ('double_blocks.0.img_attn.qkv', 1, 3). None if unknown."""
    for bfl_blocks, diffusers_blocks, table in _BLOCKS:
        m = re.fullmatch(rf"{diffusers_blocks}\.(\d+)\.(.+)", name)
        if m:
            for inner, names in table.items():
                if m.group(2) in names:
                    return f"{bfl_blocks}.{int(m.group(1))}.{inner}", names.index(m.group(2)), len(names)
            return None
    for path, names in TOP_LEVEL_LINEARS.items():
        if name in names:
            return path, 0, 1
    return None


# ---------------------------------------------------------------------------------------------- detect

def _listing(items: list[str], n: int = 10) -> str:
    shown = ", ".join(items[:n])
    return shown if len(items) <= n else f"{shown} (and {len(items) - n} more)"


def detect_format(keys: Iterable[str], origin: str = "<state dict>") -> str:
    """'kohya', 'comfy' or 'diffusers' from the tensor names; LoRAFormatError for anything else."""
    keys = [k for k in keys if k not in _IGNORED_KEYS]
    if not keys:
        raise LoRAFormatError(f"{origin} holds no tensors: it is not a LoRA; download or export it again")
    for marker, kind in _UNSUPPORTED.items():
        hits = [k for k in keys if marker in k]
        if hits:
            raise LoRAFormatError(
                f"{origin} is a {kind} adapter (keys like {hits[0]!r}), which flux2 does not support: only LoRA "
                "(lora_down/lora_up or lora_A/lora_B pairs), LoKr (lokr_*) and LoHa (hada_*) can be applied or "
                "converted. Use the tool that made it, or extract a plain LoRA from it first")
    found = {fmt: [k for k in keys if k.startswith(prefixes)] for fmt, prefixes in _PREFIXES.items()}
    found = {fmt: ks for fmt, ks in found.items() if ks}
    misfits = [k for k in keys if not any(k.startswith(p) for ps in _PREFIXES.values() for p in ps)]
    if len(found) == 1 and not misfits:
        return next(iter(found))
    layouts = ("kohya `lora_unet_<module>.lora_down.weight`, ComfyUI/BFL `diffusion_model.<module>.lora_A.weight`"
               " or diffusers `transformer.<module>.lora_A.weight`")
    if misfits:
        hint = ""
        if any(k.startswith(("lora_te", "text_encoder", "te_")) for k in misfits):
            hint = " (text-encoder LoRA keys: FLUX.2 LoRAs train only the DiT)"
        elif any(k.startswith("lycoris_") for k in misfits):
            hint = (" (LyCORIS' own wrapper layout with diffusers module names, as SimpleTuner writes it; flux2 "
                    "reads LyCORIS adapters in the kohya layout lora_unet_<module>.lokr_w1 that ComfyUI and "
                    "musubi-tuner use)")
        raise LoRAFormatError(f"{origin} is not a FLUX.2 DiT LoRA in a known layout{hint}: {len(misfits)} of its "
                              f"{len(keys)} keys fit none of {layouts}: {_listing(misfits)}")
    raise LoRAFormatError(f"{origin} mixes LoRA layouts ({', '.join(found)}); a file must use one of {layouts}")


# ---------------------------------------------------------------------------------------------- read

def read_lora(path: str | os.PathLike) -> LoRA:
    """Read a LoRA file in any supported layout into canonical form."""
    return lora_from_state_dict(load_file(path), read_metadata(path), origin=str(path))


def lora_from_state_dict(sd: dict[str, Tensor], metadata: dict[str, str] | None = None,
                         origin: str = "<state dict>") -> LoRA:
    """Canonical form of a LoRA state dict in any supported layout (detected from its keys)."""
    metadata = dict(metadata or {})
    sd = {k: v for k, v in sd.items() if k not in _IGNORED_KEYS}
    fmt = detect_format(sd, origin)
    modules = _read_kohya(sd, origin) if fmt == "kohya" else _read_ab(sd, fmt, metadata, origin)
    return LoRA(modules, metadata, fmt, origin)


def _unmatched_error(origin: str, names: list[str], total: int) -> LoRAFormatError:
    hint = ""
    if any(re.search(r"(img|txt)_mod[._]lin|_mod\.lin", n) for n in names):
        hint = " Per-block modulation layers are FLUX.1's layout: this looks like a FLUX.1 LoRA, not FLUX.2."
    elif any(re.search(r"(input|output|down|up)_blocks|mid_block", n) for n in names):
        hint = " Those are U-Net names: this looks like a Stable Diffusion LoRA, not FLUX.2."
    return LoRAFormatError(f"{origin}: {len(names)} of its {total} LoRA modules name no Linear of the FLUX.2 DiT: "
                           f"{_listing(names)}.{hint}")


def _read_kohya(sd: dict[str, Tensor], origin: str) -> dict[str, ModuleWeights]:
    groups: dict[str, dict[str, Tensor]] = {}
    for key, tensor in sd.items():
        name, _, suffix = key.partition(".")
        if suffix not in (*LORA_SUFFIXES, *_LYCORIS_SUFFIXES, "alpha"):
            raise LoRAFormatError(f"{origin}: key {key!r} has an unknown suffix {suffix!r}; a kohya LoRA has only "
                                  "`.lora_down.weight`, `.lora_up.weight` and `.alpha` per module (LyCORIS LoKr: "
                                  "`.lokr_w1`, `.lokr_w2` or `.lokr_w2_a` / `.lokr_w2_b`; LoHa: `.hada_w1_a` ...)")
        groups.setdefault(name, {})[suffix] = tensor
    unmatched = [name for name in groups if module_path_from_kohya(name) is None]
    if unmatched:
        raise _unmatched_error(origin, unmatched, len(groups))
    return {module_path_from_kohya(name): module_weights(parts, name, origin) for name, parts in groups.items()}


def module_weights(parts: dict[str, Tensor], name: str, origin: str = "<state dict>") -> ModuleWeights:
    """One module's weights from its tensors by kohya suffix (`lora_down.weight`, `lokr_w1`, `hada_w1_a`, `alpha`
    ...): a LoRA, LoKr or LoHa, checked. A missing alpha means scale 1."""
    kinds = [kind for kind, suffixes in (("LoRA", LORA_SUFFIXES), ("LoKr", LOKR_SUFFIXES), ("LoHa", LOHA_SUFFIXES))
             if any(s in parts for s in suffixes)]
    if len(kinds) != 1:
        what = f"mixes {' and '.join(kinds)} tensors" if kinds else "has an alpha but no weights"
        raise LoRAFormatError(f"{origin}: module {name} {what}; the file is damaged, export it again")
    alpha = _alpha(parts["alpha"], name, origin) if "alpha" in parts else None
    if kinds[0] == "LoRA":
        down, up = _pair(parts.get("lora_down.weight"), parts.get("lora_up.weight"), name, origin)
        return LoRAWeights(down, up, float(down.shape[0]) if alpha is None else alpha, name)
    matrices = {s: _matrix(parts[s], name, s, origin) for s in _LYCORIS_SUFFIXES if s in parts}
    if kinds[0] == "LoKr":
        for w in ("lokr_w1", "lokr_w2"):
            pair = [f"{w}_a" in matrices, f"{w}_b" in matrices]
            if (w in matrices) == any(pair) or pair[0] != pair[1]:
                raise LoRAFormatError(f"{origin}: module {name} needs either {w} or both {w}_a and {w}_b (it has "
                                      f"{', '.join(sorted(matrices))}); the file is incomplete, export it again")
            if pair[0] and matrices[f"{w}_a"].shape[1] != matrices[f"{w}_b"].shape[0]:
                raise LoRAFormatError(f"{origin}: module {name} has {w}_a {tuple(matrices[f'{w}_a'].shape)} and "
                                      f"{w}_b {tuple(matrices[f'{w}_b'].shape)} of different ranks")
        weights = LoKrWeights(**{k.removeprefix("lokr_"): v for k, v in matrices.items()}, source=name)
        weights.alpha = float(weights.rank or 1) if alpha is None else alpha
        return weights
    missing = [s for s in LOHA_SUFFIXES if s not in matrices]
    if missing:
        raise LoRAFormatError(f"{origin}: module {name} lacks {', '.join(missing)}; the file is incomplete, "
                              "export it again")
    w1_a, w1_b, w2_a, w2_b = (matrices[s] for s in LOHA_SUFFIXES)
    if not (w1_a.shape[1] == w1_b.shape[0] and w2_a.shape[1] == w2_b.shape[0]
            and w1_a.shape[0] == w2_a.shape[0] and w1_b.shape[1] == w2_b.shape[1]):
        raise LoRAFormatError(f"{origin}: module {name} has LoHa factors of shapes "
                              f"{[tuple(m.shape) for m in (w1_a, w1_b, w2_a, w2_b)]}; expected (out, r) (r, in) "
                              "(out, r') (r', in)")
    return LoHaWeights(w1_a, w1_b, w2_a, w2_b, float(w1_b.shape[0]) if alpha is None else alpha, name)


def _matrix(t: Tensor, name: str, suffix: str, origin: str) -> Tensor:
    """A non-empty floating-point matrix (fp8 widened exactly to bf16)."""
    if t.ndim != 2 or 0 in t.shape:
        raise LoRAFormatError(f"{origin}: module {name} has {suffix} of shape {tuple(t.shape)}; expected a "
                              "non-empty matrix (convolution adapters do not fit the FLUX.2 DiT)")
    if not t.is_floating_point():
        raise LoRAFormatError(f"{origin}: module {name} stores {suffix} as {t.dtype}; an adapter holds "
                              "floating-point weights")
    return t.to(torch.bfloat16) if t.element_size() == 1 else t


def _pair(down: Tensor | None, up: Tensor | None, name: str, origin: str) -> tuple[Tensor, Tensor]:
    """Check one module's down/up matrices: both present, 2-D and of the same rank."""
    if down is None or up is None:
        missing = "down (lora_down / lora_A)" if down is None else "up (lora_up / lora_B)"
        raise LoRAFormatError(f"{origin}: module {name} has no {missing} matrix; the file is incomplete, "
                              "export it again")
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0] or down.shape[0] == 0:
        raise LoRAFormatError(f"{origin}: module {name} has down {tuple(down.shape)} and up {tuple(up.shape)}; "
                              "expected down (rank, in) and up (out, rank) of one rank, at least 1")
    if not (down.is_floating_point() and up.is_floating_point()):
        raise LoRAFormatError(f"{origin}: module {name} stores {down.dtype} / {up.dtype} matrices; a LoRA holds "
                              "floating-point weights")
    # fp8 matrices are widened (exactly) to bf16: fp8 takes part in no arithmetic here.
    return tuple(t.to(torch.bfloat16) if t.element_size() == 1 else t for t in (down, up))


def _alpha(alpha: Tensor, name: str, origin: str) -> float:
    """A module's alpha: one finite number."""
    value = float(alpha.float().item()) if alpha.numel() == 1 else math.nan
    if not math.isfinite(value):
        shown = alpha.tolist() if alpha.numel() < 5 else f"of shape {tuple(alpha.shape)}"
        raise LoRAFormatError(f"{origin}: module {name} has alpha {shown}; expected one finite number")
    return value


def _peft_config(metadata: dict[str, str], origin: str) -> dict | None:
    """The PEFT LoraConfig that diffusers stores in `lora_adapter_metadata` (keys maybe `transformer.`-prefixed)."""
    raw = metadata.get("lora_adapter_metadata")
    if raw is None:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoRAFormatError(f"{origin}: its lora_adapter_metadata is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise LoRAFormatError(f"{origin}: its lora_adapter_metadata is not a JSON object (a PEFT LoraConfig)")
    if any(k.startswith("transformer.") for k in config):
        config = {k[len("transformer."):]: v for k, v in config.items() if k.startswith("transformer.")}
    return config


def _peft_scale(config: dict | None, name: str, rank: int) -> float:
    """PEFT's scale for module `name`: lora_alpha / r (or / sqrt(r) with rsLoRA), with per-module patterns."""
    if config is None:
        return 1.0  # diffusers' convention without a config: alpha = rank

    def lookup(patterns: dict, default):
        # PEFT matches a pattern against the end of the module name.
        key = next((k for k in patterns if re.fullmatch(rf"(.*\.)?{k}", name)), None)
        return default if key is None else patterns[key]

    alpha = float(lookup(config.get("alpha_pattern") or {}, config.get("lora_alpha", rank)))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _read_ab(sd: dict[str, Tensor], fmt: str, metadata: dict[str, str], origin: str) -> dict[str, ModuleWeights]:
    """Read the comfy and diffusers layouts: lora_A / lora_B (or lora_down / lora_up) pairs under a prefix, or
    LyCORIS tensors (lokr_w1, hada_w1_a, ...) of one BFL module each."""
    suffixes = "|".join(re.escape(s) for s in (*_AB_SUFFIXES, *_LYCORIS_SUFFIXES, "alpha"))
    groups: dict[str, dict[str, Tensor]] = {}
    for key, tensor in sd.items():
        prefix = next(p for p in _PREFIXES[fmt] if key.startswith(p))
        rest = key[len(prefix):]
        m = re.fullmatch(rf"(.+)\.({suffixes})", rest)
        if not m:
            raise LoRAFormatError(f"{origin}: key {key!r} is not a LoRA matrix; expected {prefix}<module>.lora_A."
                                  "weight / .lora_B.weight (or lora_down / lora_up, .alpha, LyCORIS lokr_* / hada_*)")
        groups.setdefault(m.group(1), {})[_AB_SUFFIXES.get(m.group(2), m.group(2))] = tensor

    config = _peft_config(metadata, origin) if fmt == "diffusers" else None
    resolved: dict[str, tuple[str, int, int]] = {}
    for name in groups:
        if is_module_path(name):
            resolved[name] = (name, 0, 1)
        elif (hit := module_path_from_diffusers(name)) is not None:
            resolved[name] = hit
    unmatched = [name for name in groups if name not in resolved]
    if unmatched:
        raise _unmatched_error(origin, unmatched, len(groups))

    # Gather the pieces of each BFL module (three for a fused qkv given in diffusers names).
    pieces: dict[str, tuple[int, dict[int, ModuleWeights]]] = {}
    lycoris: dict[str, ModuleWeights] = {}
    for name, parts in groups.items():
        path, index, count = resolved[name]
        if any(s in parts for s in _LYCORIS_SUFFIXES):
            if count != 1 or path in SWAPPED_HALVES and name != path:
                raise LoRAFormatError(f"{origin}: LyCORIS module {name} changes a piece of FLUX.2's {path}; a "
                                      "Kronecker or Hadamard update of separate q/k/v (or swapped halves) cannot be "
                                      "fused exactly: use a file for the BFL modules (lora_unet_* or "
                                      "diffusion_model.<BFL module>)")
            if path in lycoris or path in pieces:
                raise LoRAFormatError(f"{origin} holds module {path} twice; export it again")
            lycoris[path] = module_weights(parts, name, origin)
            continue
        down, up = _pair(parts.get("down"), parts.get("up"), name, origin)
        rank = down.shape[0]
        if "alpha" in parts:
            alpha = _alpha(parts["alpha"], name, origin)
        else:
            try:
                alpha = _peft_scale(config, name, rank) * rank
            except (TypeError, ValueError, re.error) as e:
                raise LoRAFormatError(f"{origin}: its lora_adapter_metadata gives no usable alpha for {name} "
                                      f"({e})") from None
            if not math.isfinite(alpha):
                raise LoRAFormatError(f"{origin}: its lora_adapter_metadata gives alpha {alpha} for {name}")
        if path in SWAPPED_HALVES and name != path:  # diffusers' [scale; shift] back to BFL's [shift; scale]
            up = torch.cat(up.chunk(2, dim=0)[::-1])
        known_count, known = pieces.setdefault(path, (count, {}))
        if index in known or known_count != count or path in lycoris:
            other = ", ".join(w.source for w in known.values())
            raise LoRAFormatError(f"{origin} holds module {path} twice (as {other} and as {name}); export it again")
        known[index] = LoRAWeights(down, up, alpha, name)

    return {**lycoris, **{path: _fuse(path, parts, count, origin) for path, (count, parts) in pieces.items()}}


def _fuse(path: str, parts: dict[int, LoRAWeights], count: int, origin: str) -> LoRAWeights:
    """One LoRA for a fused qkv from its q / k / v pieces, exactly.

    Identical down matrices (and scales): keep one down and stack the ups. Otherwise stack the downs
    (rank r_q + r_k + r_v) and place each up in its own block of a block-diagonal up; a missing piece leaves
    its rows zero."""
    if count == 1:
        return parts[0]
    ordered = [parts[i] for i in sorted(parts)]
    source = ", ".join(p.source for p in ordered)
    rows = {p.up.shape[0] for p in ordered}
    if len(rows) != 1:
        raise LoRAFormatError(f"{origin}: the q/k/v pieces of {path} ({source}) have different output sizes {rows}")
    out = rows.pop()
    first = ordered[0]
    if (len(parts) == count and all(p.down.shape == first.down.shape and torch.equal(p.down, first.down)
                                and p.scale == first.scale for p in ordered)):
        return LoRAWeights(first.down, torch.cat([p.up for p in ordered]), first.alpha, source)
    dtype = torch.promote_types(first.down.dtype, first.up.dtype)
    down = torch.cat([p.down.to(dtype) for p in ordered])
    up = torch.zeros(count * out, down.shape[0], dtype=dtype)
    col = 0
    for i in sorted(parts):
        p = parts[i]
        up[i * out:(i + 1) * out, col:col + p.rank] = (p.up.float() * p.scale).to(dtype)
        col += p.rank
    return LoRAWeights(down, up, float(down.shape[0]), source)  # scales folded into up: alpha = rank


# ---------------------------------------------------------------------------------------------- write

def _folded(w: LoRAWeights) -> tuple[Tensor, Tensor]:
    """down and up each times sqrt(alpha / rank), so that up @ down is the whole update (scale 1)."""
    f = math.sqrt(w.scale)
    return (w.down.float() * f).to(w.down.dtype), (w.up.float() * f).to(w.up.dtype)


def to_kohya(lora: LoRA) -> dict[str, Tensor]:
    """The kohya layout: lora_down / lora_up / alpha (a float32 scalar) per module; LoKr and LoHa modules with
    LyCORIS' tensor names (`lora_unet_<module>.lokr_w1`, ...)."""
    return {f"{kohya_name(path)}.{suffix}": t.contiguous() for path, w in lora.modules.items()
            for suffix, t in w.tensors().items()}


def to_comfy(lora: LoRA) -> dict[str, Tensor]:
    """The BFL / ComfyUI layout: `diffusion_model.<path>.lora_A/B.weight`, alpha folded in, no alpha keys; LoKr
    and LoHa modules as `diffusion_model.<path>.lokr_w1` ... with their alpha (the layout diffusers reads LoKr in)."""
    out = {}
    for path, w in lora.modules.items():
        if w.kind != "lora":
            out.update({f"diffusion_model.{path}.{suffix}": t.contiguous() for suffix, t in w.tensors().items()})
            continue
        down, up = _folded(w)
        out[f"diffusion_model.{path}.lora_A.weight"] = down.contiguous()
        out[f"diffusion_model.{path}.lora_B.weight"] = up.contiguous()
    return out


def to_diffusers(lora: LoRA) -> dict[str, Tensor]:
    """The diffusers / PEFT layout: `transformer.<diffusers module>.lora_A/B.weight`, alpha folded in.

    A fused qkv becomes three modules sharing (a copy of) down, with up cut in three: exact. LoRA only."""
    lycoris = [path for path, w in lora.modules.items() if w.kind != "lora"]
    if lycoris:
        raise LoRAFormatError(f"{lora.origin} is a LyCORIS adapter ({lora.modules[lycoris[0]].kind} modules such "
                              f"as {lycoris[0]}); the diffusers layout here holds LoRA only. diffusers reads FLUX.2 "
                              "LoKr files in the comfy layout (--target comfy) and does not load LoHa")
    out = {}
    for path, w in lora.modules.items():
        down, up = _folded(w)
        if path in SWAPPED_HALVES:
            up = torch.cat(up.chunk(2, dim=0)[::-1])
        names = diffusers_names(path)
        for name, up_piece in zip(names, up.chunk(len(names), dim=0)):
            out[f"transformer.{name}.lora_A.weight"] = down.clone().contiguous()
            out[f"transformer.{name}.lora_B.weight"] = up_piece.clone().contiguous()
    return out


def check_finite(tensors: dict[str, Tensor], path: str | os.PathLike) -> None:
    """Refuse to write NaN or inf: a file with them would silently ruin every image it is applied to."""
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"refusing to write {path}: {len(bad)} LoRA tensors hold NaN or inf values "
                         f"({_listing(bad)}). Training diverged: lower the learning rate or resume from an "
                         "earlier checkpoint")


def _uniform(values: Iterable[float]) -> float | None:
    values = set(values)
    return values.pop() if len(values) == 1 else None


def write_lora(lora: LoRA, path: str | os.PathLike, target: str) -> None:
    """Write `lora` to `path` in layout `target` ('kohya', 'comfy' or 'diffusers'), atomically.

    The metadata is carried over, except what would now be wrong: diffusers' PEFT config (the scale is folded
    into the weights) and, for kohya, ss_network_dim / ss_network_alpha, which are set from the tensors
    (dropped when modules differ)."""
    writers = {"kohya": to_kohya, "comfy": to_comfy, "diffusers": to_diffusers}
    if target not in writers:
        raise ValueError(f"unknown LoRA target format {target!r}; choose one of: {', '.join(FORMATS)}")
    tensors = writers[target](lora)
    check_finite(tensors, path)
    metadata = {k: v for k, v in lora.metadata.items() if k not in ("format", "lora_adapter_metadata")}
    if target == "kohya":
        for key, value in (("ss_network_dim", _uniform(w.rank for w in lora.modules.values() if w.rank)),
                           ("ss_network_alpha", _uniform(w.alpha for w in lora.modules.values()))):
            metadata.pop(key, None)
            if value is not None:
                metadata[key] = str(value)
    if target == "diffusers":
        metadata["format"] = "pt"
    if lora.format != target:
        metadata["flux2.converted_from"] = lora.format
    save_file_atomic(tensors, path, metadata)


def convert_lora(in_path: str | os.PathLike, out_path: str | os.PathLike, target: str) -> LoRA:
    """Read a LoRA in any supported layout and write it in layout `target`; returns what was read."""
    if target not in FORMATS:
        raise ValueError(f"unknown LoRA target format {target!r}; choose one of: {', '.join(FORMATS)}")
    lora = read_lora(in_path)
    write_lora(lora, out_path, target)
    return lora
