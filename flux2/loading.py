"""Loading the official FLUX.2 checkpoints: the DiT (`flux2-*.safetensors`) and the autoencoder (`ae.safetensors`).

Every file is checked from its header alone before any tensor is read: the right kind of file (a DiT, not the
AE or a text encoder or a diffusers `transformer/` shard), the right variant (hidden size, block counts, context
width), the exact key set and every shape. The model is then built on the meta device and the tensors are read
one at a time, converted, moved to the target device and assigned in place, so memory holds one copy of the
weights. Distilled and base klein files have identical shapes; nothing here can tell them apart.

With a quantisation mode (fp8, nf4, int8: flux2.quantize) or a pre-quantised fp8 file (ComfyUI's scaled_fp8 and
mixed-precision layouts), the DiT is read with plain reads instead of a memory map, each block Linear quantised
a chunk of rows at a time as it arrives and every other tensor copied, so the process holds the quantised model
and one chunk, never the model in bf16 nor the file's pages.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

import torch

from flux2.autoencoder import AutoEncoder
from flux2.fp8 import dit_block_linear
from flux2.model import Flux2Transformer
from flux2.quantize import (PrequantizedLayout, check_layer_formats, check_mode, is_quantized_linear, load_streaming,
                            prequantized_layout)
from flux2.safetensors_io import (CheckpointError, Shape, TensorFile, iter_tensors, read_metadata, save_file_atomic,
                                  tensor_shapes)
from flux2.variants import VARIANTS, AutoEncoderConfig, Variant, get_variant

# ComfyUI stores the DiT under `model.diffusion_model.` (full checkpoints) or `diffusion_model.`.
DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

ShapeTable = dict[str, tuple[Shape, torch.dtype]]

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}


def resolve_device(name: str | None = "auto", local_rank: int = 0) -> torch.device:
    """"auto" (or None): this process's CUDA device when there is one, else the CPU; otherwise the named one."""
    if name in (None, "auto"):
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    check_device_available(device)
    return device


def check_device_available(device: torch.device) -> None:
    """A clear error for a CUDA device this machine does not have (instead of a traceback at the first tensor)."""
    if device.type != "cuda":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(f"device {str(device)!r}: no CUDA device is available here (torch {torch.__version__}, "
                         f"CUDA {torch.version.cuda or 'not built in'}); use auto or cpu")
    if device.index is not None and device.index >= count:
        raise ValueError(f"device {str(device)!r}: this machine has {count} CUDA device(s), cuda:0 to "
                         f"cuda:{count - 1}")


# Variants whose "auto" dtype on the CPU is float32 (see resolve_dtype).
FP32_ON_CPU = ("tiny",)


def resolve_dtype(name: str | None, device: torch.device, variant: Variant | str | None = None) -> torch.dtype:
    """"auto" (or None): bfloat16, except float32 for the tiny variant on the CPU; otherwise bfloat16 / float32
    (bf16 / fp32).

    bfloat16 halves the memory of the frozen weights and keeps a bf16 file zero-copy (a klein-base-4b in float32
    is a 15.5 GB copy). The tiny variant stays float32 on the CPU: its weights are 3 MB, so bf16 saves nothing,
    and measured on the demo (docs/performance.md) bf16 was no faster and scored the same, while the README's
    demo numbers and the tests' tolerances are float32 ones."""
    if name in (None, "auto"):
        name_of = variant if isinstance(variant, str) or variant is None else variant.name
        return torch.float32 if device.type == "cpu" and name_of in FP32_ON_CPU else torch.bfloat16
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r}: use auto, bfloat16 or float32") from None



@dataclass(frozen=True)
class DitInfo:
    """What a DiT file's header says about the model inside (None: the key it comes from is missing)."""

    hidden_size: int | None
    depth: int  # double-stream blocks
    depth_single_blocks: int
    context_in_dim: int | None
    has_guidance_in: bool
    num_heads: int | None
    dtype: torch.dtype | None  # the dtype holding most of the bytes

    def describe(self) -> str:
        def v(x: object) -> str:
            return "?" if x is None else str(x)
        return (f"hidden {v(self.hidden_size)}, {self.depth} / {self.depth_single_blocks}, "
                f"context {v(self.context_in_dim)}")


def _variant(variant: Variant | str) -> Variant:
    return get_variant(variant) if isinstance(variant, str) else variant


def _listing(keys: list[str], n: int = 5) -> str:
    """'a, b, c' or 'a, b, c, ... (12 in all)'."""
    shown = ", ".join(keys[:n])
    return shown if len(keys) <= n else f"{shown}, ... ({len(keys)} in all)"


def strip_prefix(keys: Iterable[str], path: str | os.PathLike = "checkpoint") -> dict[str, str]:
    """Model key -> file key. Accepts BFL single files (no prefix) and ComfyUI's `model.diffusion_model.` or
    `diffusion_model.` prefix. Keys without the prefix are kept as they are (and then fail the key check)."""
    keys = list(keys)
    prefix = next((p for p in DIT_PREFIXES if any(k.startswith(p) for k in keys)), "")
    mapping: dict[str, str] = {}
    for key in keys:
        name = key[len(prefix):] if prefix and key.startswith(prefix) else key
        if name in mapping:
            raise CheckpointError(f"{path} holds both {mapping[name]!r} and {key!r}: the same weight twice")
        mapping[name] = key
    return mapping


def detect_checkpoint_kind(keys: Iterable[str]) -> str:
    """Which kind of file these (prefix-stripped) keys come from: 'dit', 'ae', 'lora', 'text_encoder',
    'diffusers_transformer', 'diffusers_ae' or 'unknown'."""
    keys = list(keys)

    def has(*patterns: str) -> bool:
        return any(re.search(p, k) for k in keys for p in patterns)

    if has(r"^lora_unet_", r"\.lora_(down|up|A|B)\."):
        return "lora"
    if has(r"^(double_blocks|single_blocks)\.\d+\.", r"^(img_in|txt_in)\.weight$"):
        return "dit"
    if has(r"^(transformer_blocks|single_transformer_blocks)\.\d+\.", r"^(x_embedder|context_embedder)\."):
        return "diffusers_transformer"
    if has(r"^(encoder\.down_blocks|decoder\.up_blocks)\.", r"^(encoder|decoder)\.conv_norm_out\."):
        return "diffusers_ae"
    if has(r"^(encoder|decoder)\.(conv_in|down|up|mid)\b", r"^bn\.running_(mean|var)$"):
        return "ae"
    if has(r"embed_tokens\.", r"\.self_attn\.[qkvo]_proj\.", r"^lm_head\.", r"^(language_model|vision_tower)\."):
        return "text_encoder"
    return "unknown"


_WRONG_KIND = {
    "ae": "looks like the FLUX.2 autoencoder (ae.safetensors); pass it as --vae",
    "dit": "looks like a FLUX.2 DiT (flux2-*.safetensors); pass it as --dit",
    "lora": "looks like a LoRA file; pass it as --lora_weight",
    "text_encoder": "looks like a text encoder (Qwen3 / Mistral weights); pass it (its first shard) as --text_encoder",
    "diffusers_transformer": (
        "is a diffusers-layout transformer (keys like transformer_blocks.0.attn.to_q.weight, from a transformer/ "
        "folder); use the BFL single file at the top of the model's Hugging Face repo instead (e.g. "
        "flux2-dev.safetensors, flux-2-klein-base-4b.safetensors)"),
    "diffusers_ae": (
        "is a diffusers-layout autoencoder (a vae/ folder or ComfyUI's VAE file); use the BFL ae.safetensors "
        "from the black-forest-labs/FLUX.2-dev repo instead"),
    "unknown": "is not a FLUX.2 checkpoint (none of its keys look like a DiT, autoencoder, text encoder or LoRA)",
}


def _require_kind(shapes: ShapeTable, wanted: str, path: str | os.PathLike) -> None:
    if not shapes:
        raise CheckpointError(f"{path} holds no tensors; download it again")
    kind = detect_checkpoint_kind(shapes)
    if kind != wanted:
        raise CheckpointError(f"{path} {_WRONG_KIND[kind]}")


def dit_info_from_shapes(shapes: ShapeTable) -> DitInfo:
    """DitInfo from prefix-stripped header shapes."""
    def dim(key: str, axis: int) -> int | None:
        return shapes[key][0][axis] if key in shapes and len(shapes[key][0]) > axis else None

    def count(prefix: str) -> int:
        found = [int(m.group(1)) for k in shapes if (m := re.match(rf"{prefix}\.(\d+)\.", k))]
        return max(found) + 1 if found else 0

    hidden = dim("img_in.weight", 0)
    head_dim = dim("double_blocks.0.img_attn.norm.query_norm.scale", 0)
    nbytes: dict[torch.dtype, int] = {}
    for shape, dtype in shapes.values():
        numel = 1
        for d in shape:
            numel *= d
        nbytes[dtype] = nbytes.get(dtype, 0) + numel * dtype.itemsize
    return DitInfo(
        hidden_size=hidden,
        depth=count("double_blocks"),
        depth_single_blocks=count("single_blocks"),
        context_in_dim=dim("txt_in.weight", 1),
        has_guidance_in=any(k.startswith("guidance_in.") for k in shapes),
        num_heads=hidden // head_dim if hidden and head_dim else None,
        dtype=max(nbytes, key=nbytes.get) if nbytes else None,
    )


def detect_variant_family(info: DitInfo) -> tuple[str, ...]:
    """Names of the variants whose DiT has these dimensions, e.g. ('klein-4b', 'klein-base-4b'): distilled and
    base files have the same shapes, so a file names a family, never one of its members."""
    return tuple(name for name, v in VARIANTS.items()
                 if (v.hidden_size, v.depth, v.depth_single_blocks, v.context_in_dim, v.use_guidance_embed)
                 == (info.hidden_size, info.depth, info.depth_single_blocks, info.context_in_dim,
                     info.has_guidance_in))


@lru_cache(maxsize=None)
def expected_dit_shapes(variant: Variant) -> dict[str, Shape]:
    """Key -> shape of the variant's BFL state dict (from a model on the meta device: no memory used)."""
    with torch.device("meta"):
        model = Flux2Transformer(variant)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_keys(shapes: ShapeTable, expected: dict[str, Shape], what: str, path: str | os.PathLike,
                optional: Iterable[str] = ()) -> None:
    """Exactly the expected keys (`optional` ones may be absent or present), with the expected shapes."""
    optional = set(optional)
    missing = sorted(set(expected) - set(shapes) - optional)
    unexpected = sorted(set(shapes) - set(expected) - optional)
    if missing or unexpected:
        parts = ([f"{len(missing)} missing ({_listing(missing)})"] if missing else []) + (
            [f"{len(unexpected)} unexpected ({_listing(unexpected)})"] if unexpected else [])
        raise CheckpointError(f"{path} does not have the keys of {what}: {'; '.join(parts)}. Use the complete, "
                              "unmodified official file")
    wrong = [f"{k} is {list(shapes[k][0])}, expected {list(expected[k])}"
             for k in expected if k in shapes and tuple(shapes[k][0]) != tuple(expected[k])]
    if wrong:
        raise CheckpointError(f"{path} does not match {what}: {len(wrong)} tensors have other shapes: "
                              f"{_listing(wrong, 3)}")
    not_float = sorted(k for k, (_, dtype) in shapes.items() if k in expected and not dtype.is_floating_point
                       and k not in optional)
    if not_float:
        raise CheckpointError(f"{path} stores weights as non-floating-point data ({_listing(not_float, 3)}): "
                              "quantised formats other than plain fp8 are not supported; use the bf16 file")


def check_dit_shapes(shapes: ShapeTable, variant: Variant | str, path: str | os.PathLike = "checkpoint",
                     metadata: dict[str, str] | None = None) -> DitInfo:
    """Check header shapes (file keys, prefix allowed) against `variant`'s DiT; CheckpointError if they differ.
    Pre-quantised fp8 files (ComfyUI scaled_fp8 / mixed precision) pass: their scales and markers are set aside."""
    variant = _variant(variant)
    shapes, _ = _model_shapes(shapes, path, metadata or {})
    info = dit_info_from_shapes(shapes)
    v = variant
    if (info.hidden_size, info.depth, info.depth_single_blocks, info.context_in_dim, info.has_guidance_in) != (
            v.hidden_size, v.depth, v.depth_single_blocks, v.context_in_dim, v.use_guidance_embed):
        expected = (f"hidden {v.hidden_size}, {v.depth} double / {v.depth_single_blocks} single blocks, "
                    f"context {v.context_in_dim}")
        found = info.describe()
        if info.has_guidance_in != v.use_guidance_embed:
            expected += ", guidance_in" if v.use_guidance_embed else ", no guidance_in"
            found += ", guidance_in" if info.has_guidance_in else ", no guidance_in"
        family = detect_variant_family(info)
        if not family:
            which, fix = "which matches no FLUX.2 variant", "; check that it is a complete official FLUX.2 DiT"
        else:
            which, fix = f"which is {' or '.join(family)}", f"; pass --model_version {family[0]}"
            if len(family) > 1:
                fix += f" (or {', '.join(family[1:])}: distilled and base files have the same shapes)"
        raise CheckpointError(f"{path} does not fit --model_version {v.name}: expected {expected} ({v.name}); "
                              f"found {found}, {which}{fix}")
    _check_keys(shapes, expected_dit_shapes(variant), f"the FLUX.2 {variant.name} DiT", path)
    return info


def _model_shapes(shapes: ShapeTable, path: str | os.PathLike, metadata: dict[str, str]
                  ) -> tuple[ShapeTable, PrequantizedLayout]:
    """The model's tensors (prefix stripped, quantisation scales and markers set aside) and the file's fp8 layout."""
    key_map = strip_prefix(shapes, path)
    shapes = {name: shapes[key] for name, key in key_map.items()}
    _require_kind(shapes, "dit", path)
    layout = prequantized_layout(shapes, metadata, path)
    return {k: v for k, v in shapes.items() if k not in layout.extra_keys}, layout


def check_dit(path: str | os.PathLike, variant: Variant | str) -> DitInfo:
    """Check a DiT file from its header alone (no tensor data is read); returns what it holds."""
    return check_dit_shapes(tensor_shapes(path), variant, path, read_metadata(path))


def inspect_dit(path: str | os.PathLike) -> DitInfo:
    """The dimensions of the DiT in `path`, from the header alone (CheckpointError if it is not a DiT)."""
    shapes, _ = _model_shapes(tensor_shapes(path), path, read_metadata(path))
    return dit_info_from_shapes(shapes)


def dit_quantize_mode(fp8_scaled: bool = False, quantize: str = "none") -> str:
    """The one quantisation mode of the DiT from the seed's fp8 switch and `quantize` (none | fp8 | nf4 | int8)."""
    check_mode(quantize)
    if fp8_scaled and quantize not in ("none", "fp8"):
        raise ValueError(f"--fp8_scaled and --quantize {quantize} both quantise the DiT: choose one")
    return "fp8" if fp8_scaled else quantize


def load_dit(path: str | os.PathLike, variant: Variant | str, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.bfloat16, fp8_scaled: bool = False, quantize: str = "none",
             ) -> Flux2Transformer:
    """Load a BFL-format DiT file (or its ComfyUI-prefixed form), checked first, into a frozen eval model.

    Every tensor is cast to `dtype` (norm scales included) and moved to `device` one at a time, then assigned to
    a model built on the meta device, so memory holds a single copy of the weights. `quantize` (or the seed's
    `fp8_scaled`, the same as quantize="fp8") stores the Linear layers inside the blocks as block-wise fp8
    (flux2.fp8), NF4 or int8 (flux2.bnb_linear), each quantised a chunk at a time as it is read (see the module
    docstring). A pre-quantised fp8 file (ComfyUI scaled_fp8 / mixed precision, or plain fp8 weights) is
    dequantised to `dtype`, or in fp8 mode kept exactly (its fp8 layers outside the blocks too).
    """
    variant = _variant(variant)
    mode = dit_quantize_mode(fp8_scaled, quantize)
    shapes, metadata = tensor_shapes(path), read_metadata(path)
    check_dit_shapes(shapes, variant, path, metadata)
    _, layout = _model_shapes(shapes, path, metadata)
    key_map = strip_prefix(shapes, path)
    with torch.device("meta"):
        model = Flux2Transformer(variant)
    if mode == "none" and not layout.layers:
        return _load_mapped(model, path, key_map, device, dtype)

    quantized = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and mode != "none"
                 and (dit_block_linear(name, m) or (mode == "fp8" and name in layout.layers))}
    with TensorFile(path) as f:
        check_layer_formats(f, layout, key_map)
        names = sorted(model.state_dict(), key=lambda n: f.header[key_map[n]]["data_offsets"][0])  # file order
        load_streaming(model, lambda name: (f, key_map[name]), quantized, mode, dtype, device, layout.file_layers(key_map), names,
                       desc=f"loading the DiT ({mode})")
    return model.requires_grad_(False).eval()


def load_frozen_dit(path: str | os.PathLike, variant: Variant | str, device: torch.device, dtype: torch.dtype,
                    load_device: str | torch.device | None = None, fp8_scaled: bool = False, quantize: str = "none",
                    fp8_matmul: bool = False, attention_backend: str = "auto") -> Flux2Transformer:
    """The frozen DiT as training and evaluation run it: `load_dit` onto `load_device` (default `device`; the CPU
    when the blocks are swapped or sharded afterwards) in its memory form, then its block Linears multiplying in
    fp8 on `device` (`fp8_matmul`, which excludes the other quantisation modes) and the attention kernel."""
    dit = load_dit(path, variant, device=device if load_device is None else load_device, dtype=dtype,
                   fp8_scaled=fp8_scaled, quantize=quantize)
    if fp8_matmul:
        from flux2.fp8_matmul import apply_fp8_matmul

        apply_fp8_matmul(dit, device)
    dit.set_attention_backend(attention_backend)
    return dit

def _load_mapped(model: Flux2Transformer, path: str | os.PathLike, key_map: dict[str, str],
                 device: str | torch.device, dtype: torch.dtype) -> Flux2Transformer:
    """The unquantised load: tensors read through safetensors' memory map (zero-copy when nothing is cast)."""
    state: dict[str, torch.Tensor] = {}
    model_key = {file_key: name for name, file_key in key_map.items()}
    for file_key, tensor in iter_tensors(path, [key_map[k] for k in model.state_dict()]):
        state[model_key[file_key]] = tensor.to(device).to(dtype)
        del tensor
    model.load_state_dict(state, strict=True, assign=True)
    return model.requires_grad_(False).eval()


def save_dit(model: Flux2Transformer, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write the DiT as a BFL-format single file (atomically); quantised layers (fp8, nf4, int8) are dequantised
    to the dtype of the model's unquantised weights.

    The model must have exactly the BFL keys: merge LoRA weights into it first.
    """
    quantized = {name: m for name, m in model.named_modules() if is_quantized_linear(m)}
    dtype = model.double_blocks[0].img_attn.norm.query_norm.scale.dtype  # never quantised
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if not any(name.startswith(f"{q}.") for q in quantized):
            tensors[name] = tensor.detach().to("cpu").contiguous()
    for name, m in quantized.items():
        tensors[f"{name}.weight"] = m.dequantized_weight(dtype).detach().to("cpu").contiguous()
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach().to("cpu", dtype).contiguous()
    expected = expected_dit_shapes(model.variant)
    extra, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
    if extra or missing:
        raise ValueError(f"cannot save the DiT to {path} in the BFL layout: "
                         + "; ".join(([f"extra keys {_listing(extra)} (merge LoRA layers first)"] if extra else [])
                                     + ([f"missing keys {_listing(missing)}"] if missing else [])))
    save_file_atomic(tensors, path, metadata)


# ---------------------------------------------------------------- autoencoder

AE_OPTIONAL_KEYS = ("bn.num_batches_tracked",)  # BFL's module has it; files with and without it exist


@lru_cache(maxsize=None)
def expected_ae_shapes(config: AutoEncoderConfig) -> dict[str, Shape]:
    with torch.device("meta"):
        model = AutoEncoder(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_ae_shapes(shapes: ShapeTable, variant: Variant | str, path: str | os.PathLike = "checkpoint") -> None:
    """Check header shapes against the variant's autoencoder; CheckpointError if they differ."""
    variant = _variant(variant)
    _require_kind(shapes, "ae", path)
    conv_out = shapes.get("encoder.conv_out.weight")
    if "bn.running_mean" not in shapes and conv_out and conv_out[0][0] == 2 * 16:
        raise CheckpointError(f"{path} looks like the FLUX.1 autoencoder (16 latent channels, no bn statistics); "
                              "FLUX.2 needs its own ae.safetensors from the black-forest-labs/FLUX.2-dev repo")
    if not _ae_fits(shapes, variant.ae):
        owners = [name for name, v in VARIANTS.items() if _ae_fits(shapes, v.ae)]
        if owners:
            raise CheckpointError(f"{path} is the autoencoder of {', '.join(owners)}, which does not fit "
                                  f"--model_version {variant.name}: pass the autoencoder of {variant.name}")
    _check_keys(shapes, expected_ae_shapes(variant.ae), f"the FLUX.2 autoencoder of {variant.name}", path,
                optional=AE_OPTIONAL_KEYS)


def _ae_fits(shapes: ShapeTable, config: AutoEncoderConfig) -> bool:
    expected = expected_ae_shapes(config)
    keys = set(shapes) - set(AE_OPTIONAL_KEYS)
    return keys == set(expected) - set(AE_OPTIONAL_KEYS) and all(shapes[k][0] == expected[k] for k in keys)


def check_ae(path: str | os.PathLike, variant: Variant | str) -> None:
    """Check an autoencoder file from its header alone."""
    check_ae_shapes(tensor_shapes(path), variant, path)


def load_ae(path: str | os.PathLike, variant: Variant | str, device: str | torch.device = "cpu",
            dtype: torch.dtype = torch.float32) -> AutoEncoder:
    """Load a BFL `ae.safetensors` (checked first; with or without bn.num_batches_tracked) into a frozen eval
    model in `dtype`. The bn running statistics stay float32: they are tiny and set the latent scale."""
    variant = _variant(variant)
    shapes = tensor_shapes(path)
    check_ae_shapes(shapes, variant, path)
    with torch.device("meta"):
        model = AutoEncoder(variant.ae)
    state = {}
    for name, tensor in iter_tensors(path):
        if not tensor.is_floating_point():
            state[name] = tensor.to(device)
        else:
            state[name] = tensor.to(device).to(torch.float32 if name.startswith("bn.") else dtype)
    state.setdefault("bn.num_batches_tracked", torch.zeros((), dtype=torch.long, device=device))
    model.load_bfl_state_dict(state, strict=True, assign=True)
    return model.requires_grad_(False).eval()
