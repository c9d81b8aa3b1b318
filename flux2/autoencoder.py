"""The FLUX.2 autoencoder (`ae.safetensors`): images in [-1, 1] <-> normalised, patchified latents.

Module attribute names are the BFL checkpoint keys (`encoder.down.0.block.0.conv1.weight`, `bn.running_mean`,
...), so `ae.safetensors` loads with `AutoEncoder.load_bfl_state_dict`. Imports only torch (PIL lazily, in
`tensor_to_images`).

Shapes for the real config: encode (B, 3, H, W) -> (B, 128, H/16, W/16); decode is the inverse. The DiT sees the
128-channel latents: the 32-channel AE mean, 2x2-patchified (channel c*4 + pi*2 + pj), then normalised with
the `bn` running statistics.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flux2.variants import AutoEncoderConfig

PATCH = 2  # latents are patchified 2x2 before the DiT sees them


def swish(x: Tensor) -> Tensor:
    return F.silu(x)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        # (B, C, H, W) -> (B, 1 head, H*W, C)
        q, k, v = (proj(hn).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class ResnetBlock(nn.Module):
    """GN, swish, conv3x3, GN, swish, conv3x3, plus the input (1x1 `nin_shortcut` when channels change)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # Asymmetric padding (right and bottom only) - the checkpoint was trained with it.
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2*z_channels, H/f, W/f), f = 2^(levels-1); quant_conv included."""

    def __init__(self, cfg: AutoEncoderConfig):
        super().__init__()
        g = cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, kernel_size=3, padding=1)
        in_mult = (1,) + tuple(cfg.ch_mult)
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            level = nn.Module()
            block_in, block_out = cfg.ch * in_mult[i], cfg.ch * mult
            level.block = nn.ModuleList(
                ResnetBlock(block_in if j == 0 else block_out, block_out, g) for j in range(cfg.num_res_blocks)
            )
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(block_out)
            self.down.append(level)
        top = cfg.ch * cfg.ch_mult[-1]
        self.mid = MidBlock(top, g)
        self.norm_out = group_norm(top, g)
        self.conv_out = nn.Conv2d(top, 2 * cfg.z_channels, kernel_size=3, padding=1)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        h = self.conv_out(swish(self.norm_out(h)))
        return self.quant_conv(h)


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f); post_quant_conv included.

    `up[i]` is level i (the same numbering as the encoder), run from the last level down to 0, with
    num_res_blocks + 1 blocks per level.
    """

    def __init__(self, cfg: AutoEncoderConfig):
        super().__init__()
        g = cfg.norm_groups
        top = cfg.ch * cfg.ch_mult[-1]
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, kernel_size=1)
        self.conv_in = nn.Conv2d(cfg.z_channels, top, kernel_size=3, padding=1)
        self.mid = MidBlock(top, g)
        levels: list[nn.Module] = []
        block_in = top
        for i in reversed(range(len(cfg.ch_mult))):
            level = nn.Module()
            block_out = cfg.ch * cfg.ch_mult[i]
            level.block = nn.ModuleList(
                ResnetBlock(block_in if j == 0 else block_out, block_out, g) for j in range(cfg.num_res_blocks + 1)
            )
            block_in = block_out
            if i != 0:
                level.upsample = Upsample(block_out)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(self.post_quant_conv(z))
        h = self.mid(h)
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


def patchify(z: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2); output channel c*4 + pi*2 + pj holds z[:, c, 2i+pi, 2j+pj]."""
    b, c, h, w = z.shape
    if h % PATCH or w % PATCH:
        raise ValueError(f"patchify needs an even latent height and width, got {h}x{w}")
    z = z.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH)
    return z.permute(0, 1, 3, 5, 2, 4).reshape(b, c * PATCH * PATCH, h // PATCH, w // PATCH)


def unpatchify(z: Tensor) -> Tensor:
    """The inverse of `patchify`: (B, 4C, h, w) -> (B, C, 2h, 2w)."""
    b, c4, h, w = z.shape
    if c4 % (PATCH * PATCH):
        raise ValueError(f"unpatchify needs a channel count divisible by {PATCH * PATCH}, got {c4}")
    c = c4 // (PATCH * PATCH)
    z = z.reshape(b, c, PATCH, PATCH, h, w)
    return z.permute(0, 1, 4, 2, 5, 3).reshape(b, c, h * PATCH, w * PATCH)


def check_image_size(height: int, width: int, multiple: int) -> None:
    """Raise a ValueError naming the nearest valid size unless both sides are positive multiples of `multiple`."""
    if height > 0 and width > 0 and height % multiple == 0 and width % multiple == 0:
        return

    def nearest(n: int) -> int:
        return max(multiple, round(n / multiple) * multiple)

    raise ValueError(
        f"image size {height}x{width} (HxW) is not a multiple of {multiple} on both sides; the nearest valid "
        f"size is {nearest(height)}x{nearest(width)}: resize or crop the image to it"
    )


class AutoEncoder(nn.Module):
    """The FLUX.2 AE: `encode` images to the DiT's normalised latents, `decode` them back."""

    def __init__(self, config: AutoEncoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # Only the running statistics are used (never updated); a BatchNorm2d keeps the checkpoint's key names.
        self.bn = nn.BatchNorm2d(config.latent_channels, eps=config.bn_eps, momentum=0.1, affine=False,
                                 track_running_stats=True)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    def normalize(self, z: Tensor) -> Tensor:
        """(z - running_mean) / sqrt(running_var + eps), in float32: eval BatchNorm whatever `self.training`."""
        mean = self.bn.running_mean.float().view(1, -1, 1, 1)
        std = torch.sqrt(self.bn.running_var.float().view(1, -1, 1, 1) + self.config.bn_eps)
        return ((z.float() - mean) / std).to(z.dtype)

    def inv_normalize(self, z: Tensor) -> Tensor:
        """The inverse of `normalize`."""
        mean = self.bn.running_mean.float().view(1, -1, 1, 1)
        std = torch.sqrt(self.bn.running_var.float().view(1, -1, 1, 1) + self.config.bn_eps)
        return (z.float() * std + mean).to(z.dtype)

    def encode(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> latents (B, 4*z_channels, H/f, W/f), f = config.downscale.

        Uses the mean of the latent distribution (never a sample). Computes in the module's dtype.
        """
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"encode expects images (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        check_image_size(x.shape[2], x.shape[3], self.config.downscale)
        moments = self.encoder(x.to(self.dtype))
        mean = moments[:, : self.config.z_channels]
        return self.normalize(patchify(mean))

    def decode(self, z: Tensor) -> Tensor:
        """Latents (B, 4*z_channels, h, w) from `encode` -> images (B, 3, h*f, w*f) in about [-1, 1]."""
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"decode expects latents (B, {self.config.latent_channels}, h, w), got {tuple(z.shape)}")
        return self.decoder(unpatchify(self.inv_normalize(z.to(self.dtype))))

    def load_bfl_state_dict(self, sd: dict[str, Tensor], strict: bool = True, assign: bool = False) -> Any:
        """Load a BFL `ae.safetensors` state dict, with or without `bn.num_batches_tracked`.

        With strict=True, a ValueError names the missing and unexpected keys. Returns load_state_dict's result.
        """
        sd = dict(sd)
        sd.setdefault("bn.num_batches_tracked", torch.tensor(0, dtype=torch.long))
        if strict:
            expected, found = set(self.state_dict().keys()), set(sd)
            missing, unexpected = sorted(expected - found), sorted(found - expected)
            if missing or unexpected:
                raise ValueError(
                    f"not a FLUX.2 autoencoder state dict in the BFL layout (ae.safetensors): "
                    f"{len(missing)} keys missing {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}. "
                    f"Use the BFL ae.safetensors file (a diffusers vae/ folder uses other key names), and check that "
                    f"the AutoEncoderConfig matches it."
                )
        return self.load_state_dict(sd, strict=strict, assign=assign)
