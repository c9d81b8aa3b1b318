"""Training timesteps and loss weights for flow matching: x_t = (1 - t) x0 + t noise, target noise - x0.

Every sampler maps a standard draw (uniform u or normal z, supplied by the caller's seeded generator) to t in
(0, 1), so a step's timesteps are a pure function of the seed: resumed and multi-process runs draw the same ones.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

SAMPLERS = ("flux2_shift", "sigmoid", "uniform", "shift", "logit_normal")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def flux2_shift_mu(image_seq_len: int) -> float:
    """The resolution-dependent shift of FLUX.2 training: mu = 0.5 + 0.65 * (n - 256) / 3840, shift = e^mu.

    The same line as the sampling schedule's large-image branch (a2 * n + b2).
    """
    return 0.5 + (0.65 / 3840.0) * (image_seq_len - 256)


def shift_time(t: Tensor, shift: float) -> Tensor:
    """t -> shift * t / (1 + (shift - 1) * t): moves mass towards t = 1 (more noise) for shift > 1."""
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(method: str, normal: Tensor, uniform: Tensor, image_seq_len: int, sigmoid_scale: float = 1.0,
                     discrete_flow_shift: float = 1.0, logit_mean: float = 0.0, logit_std: float = 1.0) -> Tensor:
    """t in (0, 1) per sample from standard draws `normal` (N(0,1)) and `uniform` (U[0,1)), same shape.

    flux2_shift: sigmoid(scale z) shifted by exp(flux2_shift_mu(n)); sigmoid: sigmoid(scale z);
    uniform: u; shift: sigmoid(scale z) shifted by discrete_flow_shift; logit_normal: sigmoid(mean + std z).
    """
    if method == "flux2_shift":
        return shift_time(torch.sigmoid(sigmoid_scale * normal), math.exp(flux2_shift_mu(image_seq_len)))
    if method == "sigmoid":
        return torch.sigmoid(sigmoid_scale * normal)
    if method == "uniform":
        return uniform
    if method == "shift":
        return shift_time(torch.sigmoid(sigmoid_scale * normal), discrete_flow_shift)
    if method == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * normal)
    raise ValueError(f"timestep_sampling {method!r}: use one of {', '.join(SAMPLERS)}")


def loss_weights(scheme: str, t: Tensor) -> Tensor:
    """Per-sample loss weights: none = 1; sigma_sqrt = t^-2; cosmap = 2 / (pi (1 - 2t + 2t^2))."""
    if scheme == "none":
        return torch.ones_like(t)
    if scheme == "sigma_sqrt":
        return t.clamp(min=1e-4) ** -2.0
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1 - 2 * t + 2 * t * t))
    raise ValueError(f"weighting_scheme {scheme!r}: use one of {', '.join(WEIGHTINGS)}")


def noisy_latents(x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """x_t = (1 - t) x0 + t noise and the velocity target noise - x0 (t broadcast over all but dim 0)."""
    tt = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - tt) * x0 + tt * noise, noise - x0
