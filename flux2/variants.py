"""The FLUX.2 variants: one table of plain values that every other module reads.

The five official variants come from the BFL / diffusers configs (see docs/ARCHITECTURE.md). `tiny` is the
embedded default: the same classes at small dimensions, so the whole pipeline runs on a CPU in minutes.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AutoEncoderConfig:
    """Shape of the FLUX.2 autoencoder (`ae.safetensors`); one config serves every official variant."""

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 32
    norm_groups: int = 32
    bn_eps: float = 1e-4

    @property
    def latent_channels(self) -> int:
        """Channels of a patchified (2x2) latent: what the DiT sees."""
        return self.z_channels * 4

    @property
    def downscale(self) -> int:
        """Pixels per latent token side: the AE's 2^(levels-1) times the 2x2 patch."""
        return 2 ** (len(self.ch_mult) - 1) * 2


@dataclass(frozen=True)
class TextEncoderConfig:
    """The language model whose hidden states condition the DiT."""

    kind: str  # "qwen3" | "mistral3"
    hidden_size: int
    num_layers: int
    # Shape of the tiny text encoder that `flux2 make-tiny-model` writes (unused for official variants).
    num_heads: int = 0
    num_kv_heads: int = 0
    intermediate_size: int = 0
    vocab_size: int = 0


@dataclass(frozen=True)
class SampleSettings:
    """Size, steps and guidance of one sample: what was asked for, the variant's defaults for the rest."""

    height: int
    width: int
    steps: int
    guidance: float  # true-CFG scale (base variants), dev's embedded guidance; distilled klein ignore it


@dataclass(frozen=True)
class Variant:
    """Everything that differs between FLUX.2 variants."""

    name: str
    hidden_size: int
    num_heads: int
    depth: int  # double-stream blocks
    depth_single_blocks: int
    context_in_dim: int
    axes_dim: tuple[int, ...]
    theta: int
    mlp_ratio: float
    use_guidance_embed: bool
    guidance_distilled: bool  # True: dev and the distilled klein models (one pass per step, no true CFG)
    text_encoder: str  # "mistral3" | "qwen3"
    text_layers: tuple[int, ...]
    max_text_tokens: int
    default_steps: int  # sampling defaults: training samples, evaluate and generate all take them from here
    default_guidance: float
    arch: str  # family id shared by a distilled model and its base (same weights shape, same caches)
    max_blocks_to_swap: int
    in_channels: int = 128
    time_dim: int = 256
    text: TextEncoderConfig = TextEncoderConfig("qwen3", 0, 0)
    ae: AutoEncoderConfig = AutoEncoderConfig()
    sample_size: tuple[int, int] = (1024, 1024)  # (height, width) of samples when none is asked for

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def is_base(self) -> bool:
        """Base (non-distilled) variants are the ones to train."""
        return not self.guidance_distilled

    def sample_settings(self, height: int | None = None, width: int | None = None, steps: int | None = None,
                        guidance: float | None = None) -> SampleSettings:
        """The given values, this variant's defaults for those left None: the one rule that samples during
        training, the evaluate stage and `flux2 generate` share."""
        return SampleSettings(height or self.sample_size[0], width or self.sample_size[1],
                              steps or self.default_steps, self.default_guidance if guidance is None else guidance)


_DEV = dict(hidden_size=6144, num_heads=48, depth=8, depth_single_blocks=48, context_in_dim=15360,
            axes_dim=(32, 32, 32, 32), theta=2000, mlp_ratio=3.0, text_encoder="mistral3",
            text_layers=(10, 20, 30), max_text_tokens=512, arch="flux_2_dev", max_blocks_to_swap=29,
            text=TextEncoderConfig("mistral3", 5120, 40))
_K4 = dict(hidden_size=3072, num_heads=24, depth=5, depth_single_blocks=20, context_in_dim=7680,
           axes_dim=(32, 32, 32, 32), theta=2000, mlp_ratio=3.0, use_guidance_embed=False,
           text_encoder="qwen3", text_layers=(9, 18, 27), max_text_tokens=512, arch="flux_2_klein_4b",
           max_blocks_to_swap=13, text=TextEncoderConfig("qwen3", 2560, 36))
_K9 = dict(_K4, hidden_size=4096, num_heads=32, depth=8, depth_single_blocks=24, context_in_dim=12288,
           arch="flux_2_klein_9b", max_blocks_to_swap=16, text=TextEncoderConfig("qwen3", 4096, 36))
_DISTILLED = dict(guidance_distilled=True, default_steps=4, default_guidance=1.0)
_BASE = dict(guidance_distilled=False, default_steps=50, default_guidance=4.0)

VARIANTS: dict[str, Variant] = {
    "dev": Variant(name="dev", use_guidance_embed=True, guidance_distilled=True, default_steps=50,
                   default_guidance=4.0, **_DEV),
    "klein-4b": Variant(name="klein-4b", **_K4, **_DISTILLED),
    "klein-base-4b": Variant(name="klein-base-4b", **_K4, **_BASE),
    "klein-9b": Variant(name="klein-9b", **_K9, **_DISTILLED),
    "klein-base-9b": Variant(name="klein-base-9b", **_K9, **_BASE),
    # The embedded default: FLUX.2-shaped, small enough that a CPU training step takes a fraction of a second.
    "tiny": Variant(
        name="tiny", hidden_size=128, num_heads=4, depth=2, depth_single_blocks=2, context_in_dim=192,
        axes_dim=(8, 8, 8, 8), theta=2000, mlp_ratio=3.0, use_guidance_embed=False, guidance_distilled=False,
        text_encoder="qwen3", text_layers=(1, 2, 3), max_text_tokens=64, default_steps=20,
        default_guidance=4.0, arch="flux_2_tiny", max_blocks_to_swap=0,
        text=TextEncoderConfig("qwen3", 64, 3, num_heads=4, num_kv_heads=2, intermediate_size=128,
                               vocab_size=512),
        ae=AutoEncoderConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1),
        sample_size=(128, 128),  # the size the tiny DiT was trained at (demo/params.yaml resolution)
    ),
}


def get_variant(name: str) -> Variant:
    """The variant called `name`, or a ValueError listing the valid names."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown model_version {name!r}; choose one of: {', '.join(VARIANTS)}") from None
