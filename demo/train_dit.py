"""Stage train_dit: the tiny DiT (assets/tiny/dit.safetensors, BFL layout), trained from scratch (all weights) on
the base pictures.

The pictures are encoded once with the trained AE (assets/tiny/ae.safetensors) and the captions once with the
text encoder (assets/tiny/text_encoder), both through the real loaders. Training is the pipeline's flow
matching: timesteps from flux2.timesteps, the loss flux2.train.velocity_loss (x_t = (1 - t) x0 + t noise,
target noise - x0). Some captions are dropped (the empty prompt), so that classifier-free guidance, which
`flux2 generate` uses for the tiny variant, has an unconditional prediction to work from.
Writes metrics/dit.json and outputs/dit_samples.png (rows: SAMPLE_PROMPTS, columns: seeds 0-3).
"""
import json
import time
from pathlib import Path

import torch

from common import MODEL_DIR, load_params, load_pictures, to_unit
from flux2 import sampling, timesteps
from flux2.generate import sample_latents
from flux2.images import to_pil
from flux2.loading import load_ae, save_dit
from flux2.model import Flux2Transformer
from flux2.optim import build_optimizer, lr_factor
from flux2.text_encoder import load_text_encoder
from flux2.train import velocity_loss
from flux2.variants import VARIANTS

SAMPLE_PROMPTS = ["a red circle on a blue background", "a green square on a yellow background",
                  "a white triangle on a black background", "a purple star on a green background"]


@torch.no_grad()
def encode_pictures(pixels: torch.Tensor, batch: int = 50) -> torch.Tensor:
    ae = load_ae(MODEL_DIR / "ae.safetensors", "tiny")
    return torch.cat([ae.encode(to_unit(pixels[i:i + batch])) for i in range(0, len(pixels), batch)])


@torch.no_grad()
def encode_captions(prompts: list[str]) -> torch.Tensor:
    te = load_text_encoder(MODEL_DIR / "text_encoder", VARIANTS["tiny"], dtype=torch.float32)
    return te.encode(prompts, batch_size=64)


@torch.no_grad()
def samples(dit: Flux2Transformer, resolution: int, seeds: range = range(4)) -> torch.Tensor:
    """Pixels of SAMPLE_PROMPTS x seeds as one image tensor (3, rows * H, columns * W), as flux2 generate makes
    them (the tiny variant's default steps and guidance)."""
    variant = VARIANTS["tiny"]
    ctx = encode_captions(SAMPLE_PROMPTS + [""])
    ae = load_ae(MODEL_DIR / "ae.safetensors", variant)
    rows = []
    for i in range(len(SAMPLE_PROMPTS)):
        cond = sampling.Conditioning(ctx=ctx[i:i + 1], neg_ctx=ctx[-1:], cfg_scale=variant.default_guidance)
        latents = torch.cat([sample_latents(dit, variant, cond, resolution, resolution, seed, variant.default_steps,
                                            None, torch.device("cpu"), progress=False) for seed in seeds])
        rows.append(torch.cat(list(ae.decode(latents).clamp(-1, 1)), dim=2))
    return torch.cat(rows, dim=1)


def main() -> None:
    p = load_params()
    c = p["dit"]
    variant = VARIANTS["tiny"]
    t0 = time.perf_counter()
    pixels, captions = load_pictures("images")
    x0_all = encode_pictures(pixels)
    prompts = sorted(set(captions)) + [""]
    ctx_all = encode_captions(prompts)
    caption_index = torch.tensor([prompts.index(cap) for cap in captions])
    empty = len(prompts) - 1
    print(f"encoded {len(pixels)} pictures {tuple(x0_all.shape[1:])} and {len(prompts)} captions in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)

    torch.manual_seed(p["seed"])
    dit = Flux2Transformer(variant)
    dit.train()
    optimizer = build_optimizer(dit.parameters(), "adamw", c["learning_rate"], {})
    generator = torch.Generator().manual_seed(p["seed"])
    h, w = x0_all.shape[-2:]
    t1 = time.perf_counter()
    losses = []
    for step in range(c["steps"]):
        for group in optimizer.param_groups:
            group["lr"] = c["learning_rate"] * lr_factor(step, "cosine", c["steps"], c["warmup_steps"])
        b = c["batch_size"]
        index = torch.randint(0, len(x0_all), (b,), generator=generator)
        dropped = torch.rand(b, generator=generator) < c["caption_dropout_rate"]
        ctx = ctx_all[torch.where(dropped, empty, caption_index[index])]
        x0 = x0_all[index]
        noise = torch.randn(x0.shape, generator=generator)
        t = timesteps.sample_timesteps(c["timestep_sampling"], torch.randn(b, generator=generator),
                                       torch.rand(b, generator=generator), h * w)
        loss = velocity_loss(dit, x0, noise, t, ctx, [], variant).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), c["max_grad_norm"])
        optimizer.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == c["steps"] - 1:
            recent = losses[-100:]
            print(f"step {step}: loss {sum(recent) / len(recent):.4f} (mean of the last {len(recent)}; "
                  f"{time.perf_counter() - t1:.0f} s)", flush=True)
    dit.eval()

    save_dit(dit, MODEL_DIR / "dit.safetensors", {"flux2.variant": variant.name,
                                                  "flux2.trained_by": "demo/train_dit.py",
                                                  "flux2.steps": str(c["steps"])})
    train_seconds = time.perf_counter() - t1
    Path("outputs").mkdir(exist_ok=True)
    to_pil(samples(dit, p["resolution"])[None])[0].save("outputs/dit_samples.png")
    last = losses[-200:]
    metrics = {"steps": c["steps"], "final_loss": sum(last) / len(last), "train_seconds": round(train_seconds, 1),
               "total_seconds": round(time.perf_counter() - t0, 1)}
    Path("metrics").mkdir(exist_ok=True)
    Path("metrics/dit.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"wrote {MODEL_DIR / 'dit.safetensors'}: {json.dumps(metrics)}")


if __name__ == "__main__":
    main()
