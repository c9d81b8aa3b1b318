"""Text-to-image and editing with a FLUX.2 variant: the library side of `flux2 generate`.

Models are loaded one after another and freed when done (text encoder, then DiT, then AE decode), so peak
memory is that of the largest, not the sum. With `from_file`, every model is loaded once for all prompts.

LoRAs (`lora_weight`, any layout flux2.lora_formats reads, LyCORIS LoKr / LoHa included) are merged into the DiT
weights once, right after loading, or attached as hooks (`lora_merge=False`); both give the same images. With fp8_scaled the DiT is loaded
unquantised, merged, then quantised, so each weight is rounded to fp8 once. With --quantize nf4 / int8 the LoRAs
are attached as hooks (merging would round the update into the 4/8-bit grid).
"""
from __future__ import annotations

import gc
import json
import math
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
from flux2.buckets import fit_area
from flux2.loading import resolve_device, resolve_dtype
from flux2.variants import Variant, get_variant

ONE_REF_MAX_AREA = 2024 * 2024  # BFL: a single reference image may be up to ~4 MP
MANY_REF_MAX_AREA = 1024 * 1024  # each of several references
MIN_REF_SIDE, MAX_REF_ASPECT = 64, 8  # BFL's and diffusers' limits for reference images


@dataclass
class GenerateOptions:
    """The seed's inference options, by the same names."""

    model_version: str
    dit: str
    vae: str | None  # both needed to generate; not for save_merged_model
    text_encoder: str | None
    prompt: str | None = None  # one prompt, or `from_file`
    tokenizer: str | None = None
    negative_prompt: str = ""
    image_size: tuple[int, int] | None = None  # (height, width); default: the variant's sample_size (1024^2)
    infer_steps: int | None = None  # default: the variant's (4 distilled klein, 50 otherwise)
    guidance_scale: float | None = None  # true CFG for base variants; default: the variant's (4.0)
    embedded_cfg_scale: float = 4.0  # dev's distilled guidance
    flow_shift: float | None = None  # constant shift instead of the empirical-mu schedule
    seed: int | None = None
    control_image_path: list[str] = field(default_factory=list)
    no_resize_control: bool = False
    fp8_scaled: bool = False
    fp8_matmul: bool = False  # block Linears in row-wise fp8, multiplied in fp8 (flux2.fp8_matmul)
    compile: bool | str = "auto"  # regional torch.compile of the DiT blocks: auto (on CUDA) | true | false
    fp8_text_encoder: bool = False
    quantize: str = "none"  # DiT block Linears: none | fp8 (= fp8_scaled) | nf4 | int8
    text_encoder_quantize: str = "none"  # none | fp8 (= fp8_text_encoder) | nf4 | int8
    blocks_to_swap: int = 0
    dtype: str | None = None  # "bfloat16" | "float32"; default bf16 (fp32 for the tiny variant on CPU)
    device: str | None = None
    save_path: str = "outputs"
    output_type: str = "images"  # images | latent | latent_images
    from_file: str | None = None  # a prompt per line with --w/--h/--d/--s/--g/--n/--ci/--fs (flux2.prompts)
    lora_weight: list[str] = field(default_factory=list)
    lora_multiplier: list[float] = field(default_factory=lambda: [1.0])  # one per LoRA, or one for all
    include_patterns: list[str] | None = None  # regex per LoRA (re.search on module paths / names in the file)
    exclude_patterns: list[str] | None = None
    lora_merge: bool = True  # False: attach as hooks (same images, the weights untouched)
    save_merged_model: str | None = None  # write the DiT with the LoRAs merged (BFL layout) and skip inference


@dataclass
class PromptJob:
    """One image to generate: a prompt with its settings resolved."""

    prompt: str
    negative_prompt: str
    height: int
    width: int
    steps: int
    guidance_scale: float
    seed: int
    flow_shift: float | None
    control_image_path: list[str]


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
        w, h = fit_area(im.width, im.height, limit, multiple)
        out.append(images.to_tensor(images.resize_cover_crop(im, w, h))[None])
    return out


def prompt_jobs(opts: GenerateOptions, variant: Variant) -> list[PromptJob]:
    """The images to make: `opts.prompt`, or one per line of `opts.from_file` (a line's flags override the
    options). Unset seeds are drawn at random, one per prompt."""
    from flux2.prompts import SamplePrompt, read_prompt_file

    if (opts.prompt is None) == (opts.from_file is None):
        raise ValueError("give either --prompt or --from_file (a prompt file, one prompt per line)")
    lines = [SamplePrompt(opts.prompt)] if opts.prompt is not None else read_prompt_file(opts.from_file)
    if not lines:
        raise ValueError(f"{opts.from_file}: no prompts (every line is blank or a # comment)")
    jobs = []
    height, width = opts.image_size or (None, None)
    for sp in lines:
        s = variant.sample_settings(sp.height or height, sp.width or width, sp.steps or opts.infer_steps,
                                    sp.guidance if sp.guidance is not None else opts.guidance_scale)
        check_image_size(s.height, s.width, variant.ae.downscale)
        seed = sp.seed if sp.seed is not None else opts.seed
        jobs.append(PromptJob(
            prompt=sp.prompt,
            negative_prompt=opts.negative_prompt if sp.negative_prompt is None else sp.negative_prompt,
            height=s.height, width=s.width, steps=s.steps, guidance_scale=s.guidance,
            seed=seed if seed is not None else random.randint(0, 2**32 - 1),
            flow_shift=sp.flow_shift if sp.flow_shift is not None else opts.flow_shift,
            control_image_path=sp.control_images or opts.control_image_path))
    return jobs


def check_lora_files(opts: GenerateOptions) -> None:
    """The LoRA options fit together and every file is a LoRA in a known layout (headers only, before any model
    loads; shapes are checked against the DiT when it is there)."""
    from flux2.lora import compile_patterns
    from flux2.lora_formats import detect_format
    from flux2.safetensors_io import tensor_shapes

    n = len(opts.lora_weight)
    for name, values in (("--lora_multiplier", opts.lora_multiplier), ("--include_patterns", opts.include_patterns),
                         ("--exclude_patterns", opts.exclude_patterns)):
        if values is not None and n and len(values) not in (1, n):
            raise ValueError(f"{name}: got {len(values)} values for {n} LoRA files; give one per --lora_weight "
                             "file, or a single one for all")
        if values and not n and name != "--lora_multiplier":
            raise ValueError(f"{name} is given without --lora_weight")
    compile_patterns(opts.include_patterns or [], "--include_patterns")
    compile_patterns(opts.exclude_patterns or [], "--exclude_patterns")
    if opts.save_merged_model and not n:
        raise ValueError("--save_merged_model needs --lora_weight: there is nothing to merge")
    for path in opts.lora_weight:
        detect_format(tensor_shapes(path), path)


def check_numbers(opts: GenerateOptions) -> None:
    """Every number option finite and in its range: `--lora_multiplier nan` would give a black image."""
    numbers = [("--lora_multiplier", m) for m in opts.lora_multiplier] + [
        ("--embedded_cfg_scale", opts.embedded_cfg_scale), ("--guidance_scale", opts.guidance_scale),
        ("--flow_shift", opts.flow_shift)]
    for name, value in numbers:
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name} {value}: must be a finite number")
    if opts.flow_shift is not None and opts.flow_shift <= 0:
        raise ValueError(f"--flow_shift {opts.flow_shift}: must be above 0")
    if opts.infer_steps is not None and opts.infer_steps < 1:
        raise ValueError(f"--infer_steps {opts.infer_steps}: must be at least 1")
    if opts.blocks_to_swap < 0:
        raise ValueError(f"--blocks_to_swap {opts.blocks_to_swap}: must be 0 or more")


def check_finite_output(latents: list[Tensor], opts: GenerateOptions) -> None:
    """Refuse to write an image from NaN or inf latents (it would be black): the weights hold them, since every
    option and LoRA file was checked to be finite before."""
    bad = [k for k, x in enumerate(latents) if not torch.isfinite(x).all()]
    if bad:
        loras = f" or a LoRA ({', '.join(opts.lora_weight)})" if opts.lora_weight else ""
        raise ValueError(f"the denoised latents of {len(bad)} of {len(latents)} image(s) hold NaN or inf, so no "
                         f"image was written: the DiT {opts.dit}{loras} holds non-finite weights, or they overflow in "
                         f"{opts.dtype or 'the default dtype'} (--fp8_scaled?); check the files, e.g. load them in "
                         "safetensors and test torch.isfinite")


def generate(opts: GenerateOptions) -> list[Path]:
    """Run one generation (or one per line of `opts.from_file`, or only the LoRA merge with
    `save_merged_model`); returns the files written."""
    from flux2.loading import load_ae

    variant = get_variant(opts.model_version)
    if opts.output_type not in ("images", "latent", "latent_images"):
        raise ValueError(f"--output_type {opts.output_type!r}: use images, latent or latent_images")
    check_numbers(opts)
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device, variant)
    check_quantize_options(opts)
    check_lora_files(opts)
    if opts.save_merged_model:
        return [save_merged_dit(opts, variant)]
    missing = [name for name, value in (("--vae", opts.vae), ("--text_encoder", opts.text_encoder)) if not value]
    if missing:
        raise ValueError(f"generate needs {' and '.join(missing)} (only --save_merged_model works without them)")
    jobs = prompt_jobs(opts, variant)

    # Inputs are checked before any model loads, so a bad file fails in a second, not after minutes.
    ref_pixels = [prepare_control_images(job.control_image_path, opts.no_resize_control, variant.ae.downscale)
                  for job in jobs]
    t0 = time.perf_counter()
    contexts = encode_prompts(opts, variant, jobs, device, dtype)

    ae = load_ae(opts.vae, variant, device=device, dtype=torch.float32)
    conds = []
    for job, (ctx, neg_ctx), refs in zip(jobs, contexts, ref_pixels):
        cfg = use_cfg(variant, job.guidance_scale)
        cond = sampling.Conditioning(ctx=ctx, neg_ctx=neg_ctx, cfg_scale=job.guidance_scale if cfg else None,
                                     guidance=opts.embedded_cfg_scale if variant.use_guidance_embed else None)
        if refs:
            with torch.no_grad():
                cond.ref_tokens, cond.ref_ids = sampling.reference_tokens([ae.encode(x.to(device)) for x in refs])
        conds.append(cond)

    dit = load_dit_for(opts, variant, device, dtype)
    latents = [sample_latents(dit, variant, cond, job.height, job.width, job.seed, job.steps, job.flow_shift,
                              device) for job, cond in zip(jobs, conds)]
    free(dit)
    del dit
    check_finite_output(latents, opts)

    out_dir = Path(opts.save_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for k, (job, latent) in enumerate(zip(jobs, latents)):
        stem = f"{time.strftime('%Y%m%d-%H%M%S')}_" + (f"{k:03d}_" if opts.from_file else "") + str(job.seed)
        written += write_outputs(opts, variant, job, latent, ae, device, out_dir / stem)
    print(f"generated {len(written)} file(s) in {time.perf_counter() - t0:.1f} s: "
          + ", ".join(str(p) for p in written))
    return written


def encode_prompts(opts: GenerateOptions, variant: Variant, jobs: list[PromptJob], device: torch.device,
                   dtype: torch.dtype) -> list[tuple[Tensor, Tensor | None]]:
    """(ctx, negative ctx or None) per job, the text encoder loaded once for all and freed afterwards."""
    from flux2.text_encoder import load_text_encoder

    te = load_text_encoder(opts.text_encoder, variant, tokenizer=opts.tokenizer, device=device,
                           dtype=resolve_dtype(None, device, variant), fp8=opts.fp8_text_encoder,
                           quantize=opts.text_encoder_quantize)
    encoded: dict[str, Tensor] = {}

    def encode(text: str) -> Tensor:
        if text not in encoded:
            encoded[text] = te.encode([text]).to(dtype)
        return encoded[text]

    out = [(encode(job.prompt), encode(job.negative_prompt) if use_cfg(variant, job.guidance_scale) else None)
           for job in jobs]
    free(te)
    del te
    return out


def write_outputs(opts: GenerateOptions, variant: Variant, job: PromptJob, latents: Tensor, ae: torch.nn.Module,
                  device: torch.device, stem: Path) -> list[Path]:
    """The latent file and/or PNGs of one job, named `{stem}_latent.safetensors` / `{stem}_000.png`."""
    cfg = use_cfg(variant, job.guidance_scale)
    meta = {"prompt": job.prompt, "negative_prompt": job.negative_prompt if cfg else "", "seed": str(job.seed),
            "height": str(job.height), "width": str(job.width), "infer_steps": str(job.steps),
            "model_version": variant.name, "guidance_scale": str(job.guidance_scale if cfg else ""),
            "embedded_cfg_scale": str(opts.embedded_cfg_scale if variant.use_guidance_embed else "")}
    if opts.lora_weight:
        meta["loras"] = json.dumps(lora_list(opts))
    written = []
    if opts.output_type in ("latent", "latent_images"):
        from flux2.safetensors_io import save_file_atomic

        path = stem.with_name(f"{stem.name}_latent.safetensors")
        save_file_atomic({"latent": latents.contiguous()}, path, metadata=meta)
        written.append(path)
    if opts.output_type in ("images", "latent_images"):
        with torch.no_grad():
            pixels = ae.decode(latents.to(device))
        for i, im in enumerate(images.to_pil(pixels)):
            path = stem.with_name(f"{stem.name}_{i:03d}.png")
            save_png(im, path, meta)
            written.append(path)
    return written


def lora_list(opts: GenerateOptions) -> list[list]:
    """[[path, multiplier], ...] for metadata."""
    mults = opts.lora_multiplier if len(opts.lora_multiplier) > 1 else opts.lora_multiplier * len(opts.lora_weight)
    return [[str(p), float(m)] for p, m in zip(opts.lora_weight, mults)]


def _apply_loras(dit: torch.nn.Module, opts: GenerateOptions, merge: bool) -> list:
    from flux2.lora import apply_loras

    networks = apply_loras(dit, opts.lora_weight, opts.lora_multiplier, opts.include_patterns,
                           opts.exclude_patterns, merge=merge)
    n_modules = sum(len(net.lora_modules) for net in networks)
    print(f"{'merged' if merge else 'attached'} {len(networks)} LoRA file(s), {n_modules} modules")
    return networks


def load_dit_for(opts: GenerateOptions, variant: Variant, device: torch.device, dtype: torch.dtype
                 ) -> torch.nn.Module:
    """The DiT on `device` with the LoRAs applied (each merged exactly once); with blocks_to_swap, loaded to CPU
    first and then only the resident blocks move.

    fp8_scaled with merged LoRAs: loaded unquantised to the CPU, merged, then each block is moved to the device
    and quantised there, so the device never holds the unquantised model."""
    from flux2.block_swap import enable_block_swap
    from flux2.compile import compile_blocks
    from flux2.compile import resolve as resolve_compile
    from flux2.fp8 import quantize_linears
    from flux2.fp8_matmul import apply_fp8_matmul
    from flux2.loading import dit_quantize_mode, load_dit
    from flux2.params import parse_auto_bool

    mode = dit_quantize_mode(opts.fp8_scaled, opts.quantize)
    merge = opts.lora_merge and mode not in ("nf4", "int8")
    merge_then_quantise = bool(opts.lora_weight) and merge and mode == "fp8"
    on_cpu = bool(opts.blocks_to_swap) or merge_then_quantise
    dit = load_dit(opts.dit, variant, device="cpu" if on_cpu else device, dtype=dtype,
                   quantize="none" if merge_then_quantise else mode)
    if opts.fp8_matmul and not (opts.lora_weight and opts.lora_merge):
        apply_fp8_matmul(dit, device)  # before LoRA hooks attach to the Linears it replaces
    if opts.lora_weight:
        networks = _apply_loras(dit, opts, merge=merge)
        if not merge:
            for network in networks:
                network.to(device)  # attached updates run where the activations are
    if opts.fp8_matmul and opts.lora_weight and opts.lora_merge:
        apply_fp8_matmul(dit, device)  # after the merge: each weight is rounded to fp8 once
    elif merge_then_quantise:
        # The same as quantize_linears(dit, dit_block_linear), one block at a time on the device.
        for block in [*dit.double_blocks, *dit.single_blocks]:
            if not opts.blocks_to_swap:
                block.to(device)
            quantize_linears(block, lambda name, module: True)
    if opts.blocks_to_swap:
        enable_block_swap(dit, opts.blocks_to_swap, device)
    else:
        dit.to(device)
    if resolve_compile(parse_auto_bool(opts.compile, "--compile"), device):
        compile_blocks(dit)
    return dit


def check_quantize_options(opts: GenerateOptions) -> None:
    """The quantisation options fit together (before any model loads)."""
    from flux2.loading import dit_quantize_mode
    from flux2.text_encoder import text_encoder_quantize_mode

    mode = dit_quantize_mode(opts.fp8_scaled, opts.quantize)
    text_encoder_quantize_mode(opts.fp8_text_encoder, opts.text_encoder_quantize)
    if opts.fp8_matmul and mode != "none":
        raise ValueError(f"--fp8_matmul stores the block Linears in an fp8 of its own (row-wise scales), so it cannot "
                         f"be combined with {'--fp8_scaled' if mode == 'fp8' else f'--quantize {mode}'}; choose one")
    if mode in ("nf4", "int8") and opts.blocks_to_swap:
        raise ValueError(f"--quantize {mode} cannot be combined with --blocks_to_swap (bitsandbytes' quantisation "
                         "state does not move with swapped blocks); use --fp8_scaled with it")
    if opts.save_merged_model and mode in ("nf4", "int8"):
        raise ValueError(f"--save_merged_model writes the merged DiT unquantised (a 4/8-bit file would not load in "
                         f"ComfyUI or diffusers), so --quantize {mode} does nothing here: drop it, and pass it when "
                         "you load the merged file")


def save_merged_dit(opts: GenerateOptions, variant: Variant) -> Path:
    """Load the DiT unquantised on the CPU, merge the LoRAs and write it in the BFL layout, in the file's own
    dtype (bfloat16 for an fp8 file: a pre-quantised file is dequantised, and says so) unless `opts.dtype` says
    otherwise."""
    from flux2.loading import load_dit, save_dit
    from flux2.safetensors_io import non_finite_keys, tensor_shapes

    if opts.dtype is not None:
        dtype = resolve_dtype(opts.dtype, torch.device("cpu"))
    else:
        counts: dict[torch.dtype, int] = {}
        for shape, dt in tensor_shapes(opts.dit).values():
            counts[dt] = counts.get(dt, 0) + math.prod(shape)
        dtype = max(counts, key=counts.get)
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            print(f"{opts.dit} stores its weights in {str(dtype).removeprefix('torch.')}: they are dequantised to "
                  "bfloat16 for the merge, and the merged file is bfloat16 (load it with --fp8_scaled to quantise "
                  "it again)")
            dtype = torch.bfloat16
    t0 = time.perf_counter()
    dit = load_dit(opts.dit, variant, device="cpu", dtype=dtype)
    _apply_loras(dit, opts, merge=True)
    path = Path(opts.save_merged_model)
    bad = non_finite_keys(dit.state_dict())
    if bad:
        raise ValueError(f"refusing to write {path}: {len(bad)} tensors of the merged DiT hold NaN or inf (e.g. "
                         f"{bad[0]}): the DiT {opts.dit} holds them, or the merge overflows "
                         f"{str(dtype).removeprefix('torch.')} (try --dtype float32)")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_dit(dit, path, {"flux2.variant": variant.name, "flux2.base_dit": str(opts.dit),
                         "flux2.merged_loras": json.dumps(lora_list(opts))})
    print(f"wrote the merged DiT {path} ({str(dtype).removeprefix('torch.')}) in {time.perf_counter() - t0:.1f} s")
    return path


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
