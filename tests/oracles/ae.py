"""Oracle for the autoencoder: diffusers' `AutoencoderKLFlux2` loaded from our BFL-layout state dict.

The key mapping is diffusers' own `convert_ldm_vae_checkpoint` (it knows the LDM names that BFL uses), after
moving `encoder.quant_conv.*` / `decoder.post_quant_conv.*` to the top level where the LDM layout keeps them;
`bn.*` is copied as is. Encode and decode follow the FLUX.2 pipelines (`_encode_vae_image`, and the
un-normalise / unpatchify / `vae.decode` at the end of `__call__`).
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKLFlux2
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from flux2.variants import AutoEncoderConfig


def diffusers_vae(cfg: AutoEncoderConfig) -> AutoencoderKLFlux2:
    n = len(cfg.ch_mult)
    return AutoencoderKLFlux2(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_ch,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
        layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.z_channels,
        norm_num_groups=cfg.norm_groups,
        sample_size=cfg.resolution,
        batch_norm_eps=cfg.bn_eps,
    )


def bfl_to_diffusers(sd: dict[str, torch.Tensor], vae: AutoencoderKLFlux2) -> dict[str, torch.Tensor]:
    ldm = {}
    for key, value in sd.items():
        if key.startswith("encoder.quant_conv."):
            key = key.removeprefix("encoder.")
        elif key.startswith("decoder.post_quant_conv."):
            key = key.removeprefix("decoder.")
        ldm[key] = value
    out = convert_ldm_vae_checkpoint(ldm, vae.config)
    out.update({k: v for k, v in sd.items() if k.startswith("bn.")})
    return out


def load_oracle(sd: dict[str, torch.Tensor], cfg: AutoEncoderConfig) -> AutoencoderKLFlux2:
    """A diffusers VAE holding exactly the weights of the BFL state dict `sd` (strict load), in eval mode."""
    vae = diffusers_vae(cfg)
    vae.load_state_dict(bfl_to_diffusers(sd, vae), strict=True)
    return vae.eval()


def _bn_stats(vae: AutoencoderKLFlux2, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


def oracle_encode(vae: AutoencoderKLFlux2, x: torch.Tensor) -> torch.Tensor:
    """As `Flux2KleinPipeline._encode_vae_image`: mode of the latent distribution, patchify, bn-normalise."""
    latents = vae.encode(x).latent_dist.mode()
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
    mean, std = _bn_stats(vae, latents)
    return (latents - mean) / std


def oracle_decode(vae: AutoencoderKLFlux2, z: torch.Tensor) -> torch.Tensor:
    """As the end of `Flux2KleinPipeline.__call__`: un-normalise, unpatchify, `vae.decode`."""
    mean, std = _bn_stats(vae, z)
    z = z * std + mean
    b, c4, h, w = z.shape
    z = z.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h * 2, w * 2)
    return vae.decode(z, return_dict=False)[0]
