"""Schedule test values from the reference sheet, noise rule, ids and packing equal to diffusers'."""
import numpy as np
import pytest
import torch

from flux2 import sampling


@pytest.mark.parametrize("n,steps,mu", [(4096, 50, 2.023351), (4096, 4, 2.291180), (1024, 4, 2.030690),
                                        (5100, 50, 1.319944)])
def test_empirical_mu(n, steps, mu):
    assert sampling.compute_empirical_mu(n, steps) == pytest.approx(mu, abs=1e-6)


@pytest.mark.parametrize("n,steps,expected", [
    (4096, 4, [1, 0.967384, 0.908144, 0.767200, 0]),
    (1024, 4, [1, 0.958085, 0.883982, 0.717497, 0]),
])
def test_schedule_values(n, steps, expected):
    assert sampling.get_schedule(steps, n) == pytest.approx(expected, abs=1e-6)


def test_schedule_50_steps_and_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    ours = sampling.get_schedule(50, 4096)
    assert ours[1] == pytest.approx(0.997309, abs=1e-6) and ours[49] == pytest.approx(0.133719, abs=1e-6)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0, time_shift_type="exponential")
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 50, 50), mu=sampling.compute_empirical_mu(4096, 50))
    assert ours == pytest.approx(sched.sigmas.tolist(), abs=1e-6)


def test_constant_flow_shift():
    ts = sampling.get_schedule(4, 4096, flow_shift=3.0)
    assert ts[0] == 1 and ts[-1] == 0 and ts[2] == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))


def test_noise_rule_is_the_documented_one():
    a = sampling.make_noise(2, 64, 96, seed=42)
    b = torch.randn((2, 128, 4, 6), generator=torch.Generator("cpu").manual_seed(42), dtype=torch.float32)
    assert torch.equal(a, b)


def test_ids_and_packing_match_diffusers():
    from diffusers import Flux2KleinPipeline as P

    latents = torch.randn(2, 128, 3, 5)
    assert torch.equal(sampling.pack(latents), P._pack_latents(latents))
    assert torch.equal(sampling.unpack(sampling.pack(latents), 3, 5), latents)
    assert torch.equal(sampling.latent_ids(2, 3, 5), P._prepare_latent_ids(latents))
    refs = [torch.randn(1, 128, 3, 5), torch.randn(1, 128, 2, 2)]
    _, ids = sampling.reference_tokens(refs)
    assert torch.equal(ids, P._prepare_image_ids(refs))
    assert torch.equal(sampling.text_ids(2, 7), P._prepare_text_ids(torch.zeros(2, 7, 3)))


def test_denoise_euler_with_constant_velocity():
    """With v = c, Euler moves x by exactly (0 - 1) * c: a check of the update direction."""
    c = torch.full((1, 4, 128), 0.5)

    def model(x, x_ids, t, ctx, ctx_ids, g):
        return c.expand_as(x)

    x = torch.zeros(1, 4, 128)
    out = sampling.denoise(model, x, sampling.latent_ids(1, 2, 2), sampling.Conditioning(ctx=torch.zeros(1, 3, 8)),
                           sampling.get_schedule(4, 4))
    assert torch.allclose(out, -c)
