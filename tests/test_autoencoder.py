"""The FLUX.2 autoencoder: BFL key layout, parity with diffusers' AutoencoderKLFlux2, latent (de)normalisation."""
from __future__ import annotations

import pytest
import torch

from flux2.autoencoder import AutoEncoder, patchify, unpatchify
from flux2.variants import VARIANTS, AutoEncoderConfig
from tests.conftest import rel_err
from tests.oracles.ae import load_oracle, oracle_decode, oracle_encode

REL_TOL = 1e-4  # fp32 parity with diffusers: relative L2 error below this

TINY = VARIANTS["tiny"].ae
# A second shape: three levels (downscale 8), more blocks per level, fewer groups, another bn eps.
SMALL = AutoEncoderConfig(ch=16, ch_mult=(1, 2, 4), num_res_blocks=2, z_channels=4, norm_groups=8, bn_eps=1e-3)


def random_ae(cfg: AutoEncoderConfig, seed: int = 0) -> AutoEncoder:
    """An AE whose every parameter and bn running statistic is random (the default init leaves GN at 1/0)."""
    torch.manual_seed(seed)
    ae = AutoEncoder(cfg)
    with torch.no_grad():
        for p in ae.parameters():
            p.add_(0.05 * torch.randn_like(p))
        ae.bn.running_mean.copy_(0.5 * torch.randn_like(ae.bn.running_mean))
        ae.bn.running_var.copy_(0.5 + torch.rand_like(ae.bn.running_var))
    return ae.eval()


def resnet_keys(prefix: str, shortcut: bool) -> list[str]:
    names = ["norm1", "conv1", "norm2", "conv2"] + (["nin_shortcut"] if shortcut else [])
    return [f"{prefix}.{n}.{wb}" for n in names for wb in ("weight", "bias")]


def mid_keys(prefix: str) -> list[str]:
    keys = resnet_keys(f"{prefix}.mid.block_1", False) + resnet_keys(f"{prefix}.mid.block_2", False)
    attn = [f"{prefix}.mid.attn_1.{n}" for n in ("norm", "q", "k", "v", "proj_out")]
    return keys + [f"{name}.{wb}" for name in attn for wb in ("weight", "bias")]


def documented_bfl_keys() -> set[str]:
    """The ae.safetensors key list of flux2_architecture.md section 4 (real config: 4 levels, 2 blocks each)."""
    wb = lambda name: [f"{name}.weight", f"{name}.bias"]  # noqa: E731
    keys = wb("encoder.conv_in")
    for i in range(4):
        for j in range(2):
            keys += resnet_keys(f"encoder.down.{i}.block.{j}", shortcut=(i, j) in {(1, 0), (2, 0)})
        if i < 3:
            keys += wb(f"encoder.down.{i}.downsample.conv")
    keys += mid_keys("encoder") + wb("encoder.norm_out") + wb("encoder.conv_out") + wb("encoder.quant_conv")
    keys += wb("decoder.post_quant_conv") + wb("decoder.conv_in") + mid_keys("decoder")
    for i in range(4):
        for j in range(3):
            keys += resnet_keys(f"decoder.up.{i}.block.{j}", shortcut=(i, j) in {(1, 0), (0, 0)})
        if i > 0:
            keys += wb(f"decoder.up.{i}.upsample.conv")
    keys += wb("decoder.norm_out") + wb("decoder.conv_out")
    return set(keys) | {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}


def test_real_config_has_the_bfl_keys_shapes_and_parameter_count():
    with torch.device("meta"):
        ae = AutoEncoder(AutoEncoderConfig())
    sd = ae.state_dict()
    assert set(sd) == documented_bfl_keys()
    shapes = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.conv_out.weight": (64, 512, 3, 3),
        "encoder.quant_conv.weight": (64, 64, 1, 1),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "decoder.post_quant_conv.weight": (32, 32, 1, 1),
        "decoder.conv_in.weight": (512, 32, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
        "bn.running_mean": (128,),
        "bn.running_var": (128,),
    }
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    params = list(ae.parameters())
    assert len(params) == 248
    assert sum(p.numel() for p in params) / 1e6 == pytest.approx(84.05, abs=0.005)  # 34.43 M + 49.62 M


@pytest.mark.parametrize("cfg, size", [(TINY, (32, 48)), (SMALL, (24, 40))], ids=["tiny", "small"])
def test_encode_and_decode_match_diffusers(cfg: AutoEncoderConfig, size: tuple[int, int]):
    ae = random_ae(cfg)
    vae = load_oracle(ae.state_dict(), cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, *size, generator=g) * 2 - 1
    f = cfg.downscale
    z_random = torch.randn(2, cfg.latent_channels, size[0] // f, size[1] // f, generator=g)
    with torch.no_grad():
        z = ae.encode(x)
        assert z.shape == z_random.shape
        assert rel_err(z, oracle_encode(vae, x)) < REL_TOL
        assert rel_err(ae.decode(z_random), oracle_decode(vae, z_random)) < REL_TOL
        assert rel_err(ae.decode(z), oracle_decode(vae, z)) < REL_TOL


def test_patchify_channel_order_and_exact_round_trip():
    z = torch.randn(2, 3, 6, 8, generator=torch.Generator().manual_seed(0))
    p = patchify(z)
    assert p.shape == (2, 12, 3, 4)
    for c, pi, pj in [(0, 0, 0), (1, 0, 1), (2, 1, 0), (2, 1, 1)]:
        assert torch.equal(p[:, c * 4 + pi * 2 + pj], z[:, c, pi::2, pj::2])
    assert torch.equal(unpatchify(p), z)
    with pytest.raises(ValueError, match="even"):
        patchify(torch.zeros(1, 3, 5, 8))


def test_encode_uses_running_stats_in_train_mode_and_decode_inverts_normalisation():
    ae = random_ae(TINY)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    stats = [b.clone() for b in ae.bn.buffers()]
    with torch.no_grad():
        z_eval = ae.encode(x)
        z_train = ae.train().encode(x)
    assert torch.equal(z_eval, z_train)
    assert all(torch.equal(a, b) for a, b in zip(stats, ae.bn.buffers()))
    z = torch.randn(2, TINY.latent_channels, 2, 3)
    assert rel_err(ae.normalize(ae.inv_normalize(z)), z) < 1e-6


def test_load_bfl_state_dict_with_and_without_num_batches_tracked():
    sd = random_ae(TINY, seed=3).state_dict()
    for drop in (False, True):
        ae = AutoEncoder(TINY)
        ae.load_bfl_state_dict({k: v for k, v in sd.items() if not (drop and k == "bn.num_batches_tracked")})
        assert all(torch.equal(v, sd[k]) for k, v in ae.state_dict().items())
    renamed = {k.replace("encoder.norm_out", "encoder.conv_norm_out"): v for k, v in sd.items()}
    with pytest.raises(ValueError, match="ae.safetensors"):
        AutoEncoder(TINY).load_bfl_state_dict(renamed)


def test_bad_image_size_names_the_nearest_valid_size():
    ae = AutoEncoder(TINY)
    with pytest.raises(ValueError, match=r"100x64 .* multiple of 16.* 96x64"):
        ae.encode(torch.zeros(1, 3, 100, 64))
    with pytest.raises(ValueError, match=r"expects images"):
        ae.encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"expects latents"):
        ae.decode(torch.zeros(1, 32, 2, 2))


def test_bf16_module_encodes_and_decodes_in_bf16():
    ae = random_ae(TINY)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        z32, img32 = ae.encode(x), ae.decode(torch.zeros(1, TINY.latent_channels, 2, 2))
        ae = ae.to(torch.bfloat16)
        z16, img16 = ae.encode(x), ae.decode(torch.zeros(1, TINY.latent_channels, 2, 2))
    assert z16.dtype == img16.dtype == torch.bfloat16
    assert rel_err(z16.float(), z32) < 0.05 and rel_err(img16.float(), img32) < 0.05
