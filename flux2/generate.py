"""Text-to-image and editing with a FLUX.2 variant: the library side of `flux2 generate`.

Models are loaded one after another and freed when done (text encoder, then DiT, then AE decode), so peak
memory is that of the largest, not the sum.
"""
from __future__ import annotations

import gc
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import PngImagePlugin
from torch import Tensor
from tqdm import tqdm

from flux2 import images, sampling
from flux2.autoencoder import check_image_size
from flux2.variants import Variant, get_variant

ONE_REF_MAX_AREA = 2024 * 2024  # BFL: a single reference image may be up to ~4 MP
MANY_REF_MAX_AREA = 1024 * 1024  # each of several references
MIN_REF_SIDE, MAX_REF_ASPECT = 64, 8  # BFL's and diffusers' limits for reference images


@dataclass
class GenerateOptions:
    """The seed's inference options, by the same names."""

    model_version: str
    dit: str
    vae: str
    text_encoder: str
    prompt: str
    tokenizer: str | None = None
    negative_prompt: str = ""
    image_size: tuple[int, int] = (1024, 1024)  # (height, width)
    infer_steps: int | None = None  # default: the variant's (4 distilled klein, 50 otherwise)
    guidance_scale: float | None = None  # true CFG for base variants; default: the variant's (4.0)
    embedded_cfg_scale: float = 4.0  # dev's distilled guidance
    flow_shift: float | None = None  # constant shift instead of the empirical-mu schedule
    seed: int | None = None
    control_image_path: list[str] = field(default_factory=list)
    no_resize_control: bool = False
    fp8_scaled: bool = False
    fp8_text_encoder: bool = False
    blocks_to_swap: int = 0
    dtype: str | None = None  # "bfloat16" | "float32"; default bf16 on CUDA, fp32 on CPU
    device: str | None = None
    save_path: str = "outputs"
    output_type: str = "images"  # images | latent | latent_images


def resolve_device_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    try:
        return dev, {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
                     "fp32": torch.float32}[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r}: use bfloat16 or float32") from None


def free(*models: object) -> None:
    del models
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def use_cfg(variant: Variant, guidance_scale: float) -> bool:
    """True classifier-free guidance runs for base variants with a scale above 1; distilled ones take one pass."""
    return variant.is_base and guidance_scale > 1.0


def prepare_control_images(paths: list[str], no_resize: bool, multiple: int = 16) -> list[Tensor]:
    """Reference images -> [-1, 1] tensors (1, 3, H, W): capped in area (one: 2024^2, several: 1024^2 each,
    aspect kept) unless `no_resize`, then centre-cropped to multiples of 16."""
    limit = None if no_resize else (ONE_REF_MAX_AREA if len(paths) == 1 else MANY_REF_MAX_AREA)
    out = []
    for p in paths:
        im = images.open_rgb(p)
        if min(im.size) < MIN_REF_SIDE or max(im.size) > MAX_REF_ASPECT * min(im.size):
            raise ValueError(f"{p}: reference image {im.width}x{im.height} must have both sides at least "
                             f"{MIN_REF_SIDE} px and an aspect ratio of at most {MAX_REF_ASPECT}:1")
        w, h = images.fit_area(im.width, im.height, limit, multiple)
        out.append(images.to_tensor(images.resize_cover_crop(im, w, h))[None])
    return out


def generate(opts: GenerateOptions) -> list[Path]:
    """Run one generation; returns the files written."""
    from flux2.loading import load_ae
    from flux2.text_encoder import load_text_encoder

    variant = get_variant(opts.model_version)
    height, width = opts.image_size
    check_image_size(height, width, variant.ae.downscale)
    if opts.output_type not in ("images", "latent", "latent_images"):
        raise ValueError(f"--output_type {opts.output_type!r}: use images, latent or latent_images")
    device, dtype = resolve_device_dtype(opts.device, opts.dtype)
    steps = opts.infer_steps or variant.default_steps
    guidance_scale = variant.default_guidance if opts.guidance_scale is None else opts.guidance_scale
    seed = opts.seed if opts.seed is not None else random.randint(0, 2**32 - 1)
    cfg = use_cfg(variant, guidance_scale)

    # Inputs are checked before any model loads, so a bad file fails in a second, not after minutes.
    ref_pixels = prepare_control_images(opts.control_image_path, opts.no_resize_control, variant.ae.downscale)
    t0 = time.perf_counter()
    te = load_text_encoder(opts.text_encoder, variant, tokenizer=opts.tokenizer, device=device,
                           dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                           fp8=opts.fp8_text_encoder)
    ctx = te.encode([opts.prompt]).to(dtype)
    neg_ctx = te.encode([opts.negative_prompt]).to(dtype) if cfg else None
    free(te)
    del te

    ae = load_ae(opts.vae, variant, device=device, dtype=torch.float32)
    cond = sampling.Conditioning(ctx=ctx, neg_ctx=neg_ctx, cfg_scale=guidance_scale if cfg else None,
                                 guidance=opts.embedded_cfg_scale if variant.use_guidance_embed else None)
    if ref_pixels:
        with torch.no_grad():
            refs = [ae.encode(x.to(device)) for x in ref_pixels]
        cond.ref_tokens, cond.ref_ids = sampling.reference_tokens(refs)

    dit = load_dit_for(opts, variant, device, dtype)
    latents = sample_latents(dit, variant, cond, height, width, seed, steps, opts.flow_shift, device)
    free(dit)
    del dit

    out_dir = Path(opts.save_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}_{seed}"
    meta = {"prompt": opts.prompt, "negative_prompt": opts.negative_prompt if cfg else "", "seed": str(seed),
            "height": str(height), "width": str(width), "infer_steps": str(steps),
            "model_version": variant.name, "guidance_scale": str(guidance_scale if cfg else ""),
            "embedded_cfg_scale": str(opts.embedded_cfg_scale if variant.use_guidance_embed else "")}
    written = []
    if opts.output_type in ("latent", "latent_images"):
        from flux2.safetensors_io import save_file_atomic

        path = out_dir / f"{stem}_latent.safetensors"
        save_file_atomic({"latent": latents.contiguous()}, path, metadata=meta)
        written.append(path)
    if opts.output_type in ("images", "latent_images"):
        with torch.no_grad():
            pixels = ae.decode(latents.to(device))
        for i, im in enumerate(images.to_pil(pixels)):
            path = out_dir / f"{stem}_{i:03d}.png"
            save_png(im, path, meta)
            written.append(path)
    print(f"generated {len(written)} file(s) in {time.perf_counter() - t0:.1f} s: "
          + ", ".join(str(p) for p in written))
    return written


def load_dit_for(opts: GenerateOptions, variant: Variant, device: torch.device, dtype: torch.dtype
                 ) -> torch.nn.Module:
    """The DiT on `device`; with blocks_to_swap, loaded to CPU first and then only the resident blocks move."""
    from flux2.block_swap import enable_block_swap
    from flux2.loading import load_dit

    if not opts.blocks_to_swap:
        return load_dit(opts.dit, variant, device=device, dtype=dtype, fp8_scaled=opts.fp8_scaled)
    dit = load_dit(opts.dit, variant, device="cpu", dtype=dtype, fp8_scaled=opts.fp8_scaled)
    enable_block_swap(dit, opts.blocks_to_swap, device)
    return dit


def sample_latents(dit: torch.nn.Module, variant: Variant, cond: sampling.Conditioning, height: int, width: int,
                   seed: int, steps: int, flow_shift: float | None, device: torch.device,
                   progress: bool = True) -> Tensor:
    """Noise for `seed` -> denoised latents (1, 128, H/16, W/16), normalised (the DiT's space)."""
    noise = sampling.make_noise(1, height, width, seed, variant.in_channels, variant.ae.downscale)
    h, w = noise.shape[-2:]
    x = sampling.pack(noise).to(device)
    x_ids = sampling.latent_ids(1, h, w, device=device)
    timesteps = sampling.get_schedule(steps, h * w, flow_shift)
    bar = tqdm(total=steps, desc="denoising", unit="step", disable=not progress, leave=False)
    with torch.no_grad():
        x = sampling.denoise(dit, x, x_ids, cond, timesteps, progress=lambda _: bar.update())
    bar.close()
    return sampling.unpack(x, h, w)


def save_png(im, path: Path, meta: dict[str, str]) -> None:
    """Write a PNG atomically with the generation parameters in a text chunk (readable by image viewers)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", json.dumps(meta))
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        im.save(tmp, format="PNG", pnginfo=info)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
