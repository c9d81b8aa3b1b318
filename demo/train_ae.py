"""Stage train_ae: the tiny autoencoder (assets/tiny/ae.safetensors, BFL layout) trained to reconstruct pictures of
shapes in 15 colours (data/codec), with the `bn` running statistics set to those of the patchified latents of
the DiT's pictures (data/images), so that `encode` gives the DiT latents of about N(0, 1) per channel.

Loss: L1 + MSE on the decoded mean of the latent distribution, with a little noise added to the latents so
the decoder tolerates the DiT's imperfect samples. Two phases: random crops (the AE is convolutional; many
pictures per step, so it learns fast), then whole pictures at a lower learning rate, so that GroupNorm and the
attention get used to the full size (crops alone reconstruct whole pictures 3x worse; whole pictures alone, in
small batches, train unstably). The last 64 codec pictures are held out and reconstructed at full size for
metrics/ae.json and outputs/ae_reconstructions.png (rows: 8 of them, their reconstructions, 8 purple stars - the
LoRA's concept, which the codec must be able to represent - and theirs).
"""
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import MODEL_DIR, load_params, load_pictures, to_unit
from flux2.autoencoder import AutoEncoder, patchify
from flux2.concept import Concept, concept_score
from flux2.images import to_pil, to_tensor
from flux2.optim import build_optimizer, lr_factor
from flux2.safetensors_io import save_file_atomic
from flux2.variants import VARIANTS
from shapes import BASE_COLOURS, CONCEPT_COLOUR, CONCEPT_COLOUR_NAME, CONCEPT_SHAPE, random_scene, render

HELD_OUT = 64


def random_crops(pixels: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    n, _, h, w = pixels.shape
    top = torch.randint(0, h - size + 1, (n,), generator=generator).tolist()
    left = torch.randint(0, w - size + 1, (n,), generator=generator).tolist()
    return torch.stack([p[:, y:y + size, x:x + size] for p, y, x in zip(pixels, top, left)])


def fit(ae: AutoEncoder, pixels: torch.Tensor, steps: int, batch_size: int, learning_rate: float,
        crop: int | None, latent_noise: float, generator: torch.Generator, name: str) -> float:
    """One training phase (fresh AdamW, warm-up then cosine decay); returns the last step's loss."""
    optimizer = build_optimizer(ae.parameters(), "adamw", learning_rate, {})
    t0 = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * lr_factor(step, "cosine", steps, warmup_steps=min(50, steps // 10))
        batch = pixels[torch.randint(0, len(pixels), (batch_size,), generator=generator)]
        x = to_unit(random_crops(batch, crop, generator) if crop else batch)
        z = ae.encoder(x)[:, : ae.config.z_channels]
        z = z + latent_noise * z.detach().std() * torch.randn(z.shape, generator=generator)
        y = ae.decoder(z)
        loss = F.l1_loss(y, x) + F.mse_loss(y, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"{name} step {step}: loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return loss.item()


@torch.no_grad()
def latent_statistics(ae: AutoEncoder, pixels: torch.Tensor, batch: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and variance of the patchified latent means (what `bn` normalises)."""
    z = [patchify(ae.encoder(to_unit(pixels[i:i + batch]))[:, : ae.config.z_channels])
         for i in range(0, len(pixels), batch)]
    z = torch.cat(z).transpose(0, 1).flatten(1)  # (channels, N*h*w)
    return z.mean(dim=1), z.var(dim=1)


def main() -> None:
    p = load_params()
    c = p["ae"]
    pixels, _ = load_pictures("codec")
    train, held_out = pixels[:-HELD_OUT], pixels[-HELD_OUT:]
    torch.manual_seed(p["seed"])
    ae = AutoEncoder(VARIANTS["tiny"].ae)
    ae.train()
    generator = torch.Generator().manual_seed(p["seed"])
    t0 = time.perf_counter()
    fit(ae, train, c["crop_steps"], c["crop_batch_size"], c["learning_rate"], c["crop"], c["latent_noise"],
        generator, "crops")
    loss = fit(ae, train, c["full_steps"], c["full_batch_size"], c["full_learning_rate"], None, c["latent_noise"],
               generator, "whole pictures")
    ae.eval()

    mean, var = latent_statistics(ae, load_pictures("images")[0][: c["stats_images"]])  # what the DiT sees
    ae.bn.running_mean.copy_(mean)
    ae.bn.running_var.copy_(var)
    rng = random.Random(p["seed"])
    stars = torch.stack([to_tensor(render(scene, p["resolution"])) for scene in
                         (random_scene(rng, (CONCEPT_SHAPE,), {CONCEPT_COLOUR_NAME: CONCEPT_COLOUR}, BASE_COLOURS)
                          for _ in range(8))])
    with torch.no_grad():
        x = to_unit(held_out)
        latents = ae.encode(x)
        y = ae.decode(latents).clamp(-1, 1)
        stars_out = ae.decode(ae.encode(stars)).clamp(-1, 1)
    mse = F.mse_loss(y, x).item()
    concept = Concept(CONCEPT_COLOUR)
    metrics = {"final_train_loss": loss, "held_out_mse": mse,
               "held_out_psnr_db": 10 * torch.log10(torch.tensor(4.0 / mse)).item(),
               "latent_mean": latents.mean().item(), "latent_std": latents.std().item(),
               # The LoRA's concept must survive the codec: purple pixels in 8 purple stars, before and after.
               "concept_pixels": concept_score(to_pil(stars), concept),
               "concept_pixels_reconstructed": concept_score(to_pil(stars_out), concept),
               "seconds": round(time.perf_counter() - t0, 1)}

    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    save_file_atomic({k: v.contiguous() for k, v in ae.state_dict().items()}, MODEL_DIR / "ae.safetensors",
                     {"flux2.variant": "tiny", "flux2.trained_by": "demo/train_ae.py"})
    Path("metrics").mkdir(exist_ok=True)
    Path("metrics/ae.json").write_text(json.dumps(metrics, indent=2) + "\n")
    Path("outputs").mkdir(exist_ok=True)
    rows = [torch.cat(list(images[:8]), dim=2) for images in (x, y, stars, stars_out)]
    to_pil(torch.cat(rows, dim=1)[None])[0].save("outputs/ae_reconstructions.png")
    print(f"wrote {MODEL_DIR / 'ae.safetensors'}: {json.dumps(metrics)}")


if __name__ == "__main__":
    main()
