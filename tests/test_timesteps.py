"""Each timestep sampler's distribution matches its formula (KS distance on 20k draws); weights; LR schedules."""
import math

import pytest
import torch

from flux2 import optim, timesteps


def phi(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def logit(x):
    return torch.log(x / (1 - x))


def unshift(x, s):
    return x / (s - (s - 1) * x)  # inverse of t -> s t / (1 + (s - 1) t)


N_SEQ = 1024
S2 = math.exp(timesteps.flux2_shift_mu(N_SEQ))
CDFS = {  # analytic P(t <= x)
    ("flux2_shift", 1.0): lambda x: phi(logit(unshift(x, S2))),
    ("sigmoid", 1.5): lambda x: phi(logit(x) / 1.5),
    ("uniform", 1.0): lambda x: x,
    ("shift", 1.0): lambda x: phi(logit(unshift(x, 3.0))),
    ("logit_normal", 1.0): lambda x: phi((logit(x) - 0.2) / 0.8),
}


@pytest.mark.parametrize("method,scale", list(CDFS))
def test_sampler_distribution_matches_formula(method, scale):
    g = torch.Generator().manual_seed(0)
    n = 20000
    t = timesteps.sample_timesteps(method, torch.randn(n, generator=g, dtype=torch.float64),
                                   torch.rand(n, generator=g, dtype=torch.float64), N_SEQ, sigmoid_scale=scale,
                                   discrete_flow_shift=3.0, logit_mean=0.2, logit_std=0.8)
    assert ((t > 0) & (t < 1)).all() or method == "uniform"
    xs = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    empirical = (t[None, :] <= xs[:, None]).double().mean(1)
    ks = (empirical - CDFS[(method, scale)](xs)).abs().max().item()
    assert ks < 0.015, f"{method}: KS distance {ks}"


def test_flux2_shift_mu_examples():
    # musubi-tuner's documented shifts: 512^2 -> 1.88, 1024^2 -> 3.16
    assert math.exp(timesteps.flux2_shift_mu(1024)) == pytest.approx(1.88, abs=0.01)
    assert math.exp(timesteps.flux2_shift_mu(4096)) == pytest.approx(3.16, abs=0.01)


def test_weights_and_noisy_latents():
    t = torch.tensor([0.25, 0.5])
    assert torch.equal(timesteps.loss_weights("none", t), torch.ones(2))
    assert torch.allclose(timesteps.loss_weights("sigma_sqrt", t), torch.tensor([16.0, 4.0]))
    assert torch.allclose(timesteps.loss_weights("cosmap", t), 2 / (math.pi * (1 - 2 * t + 2 * t * t)))
    x0, noise = torch.zeros(2, 3), torch.ones(2, 3)
    xt, target = timesteps.noisy_latents(x0, noise, t)
    assert torch.allclose(xt[:, 0], t) and torch.equal(target, noise - x0)
    with pytest.raises(ValueError, match="weighting_scheme"):
        timesteps.loss_weights("snr", t)


@pytest.mark.parametrize("name,at_half", [("constant", 1.0), ("linear", 0.5), ("cosine", 0.5),
                                          ("polynomial", 0.25), ("cosine_with_restarts", 1.0)])
def test_lr_schedules(name, at_half):
    f = [optim.lr_factor(s, name, total_steps=110, warmup_steps=10, num_cycles=2, power=2.0) for s in range(111)]
    if name != "constant":
        assert f[0] == pytest.approx(1 / 11) and f[9] == pytest.approx(10 / 11)
    assert f[60] == pytest.approx(at_half, abs=1e-6)
    assert f[10] == pytest.approx(1.0)


def test_optimizers_build():
    p = [torch.nn.Parameter(torch.zeros(64, 64))]
    assert isinstance(optim.build_optimizer(p, "adamw", 1e-3), torch.optim.AdamW)
    assert type(optim.build_optimizer(p, "torch.optim.SGD", 1e-3, {"momentum": 0.9})).__name__ == "SGD"
    assert type(optim.build_optimizer(p, "adafactor", 1e-3)).__name__ == "Adafactor"
    with pytest.raises(ValueError, match="cannot be imported"):
        optim.build_optimizer(p, "torch.optim.Missing", 1e-3)
    with pytest.raises(ValueError, match="'nope.Missing' is not an optimizer this trainer loads"):
        optim.build_optimizer(p, "nope.Missing", 1e-3)  # refused before any import
