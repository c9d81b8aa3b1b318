"""Sampling: noise, position ids, packing, the empirical-mu schedule and the Euler loop. Plain functions.

Token layout: the DiT sees image tokens (B, N, 128) packed row-major from (B, 128, h, w) latents, with integer
position ids (t, h, w, l): target (0, i, j, 0), reference k (10 + 10k, i, j, 0), text (0, 0, 0, l).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

REFERENCE_TIME_SCALE = 10  # reference image k gets t = 10 + 10k


def make_noise(batch: int, height: int, width: int, seed: int, channels: int = 128, downscale: int = 16) -> Tensor:
    """The starting noise for a seed: the same numbers on any machine (CPU generator, float32)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    shape = (batch, channels, height // downscale, width // downscale)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def pack(latents: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h*w, C), row-major (h outer)."""
    return latents.flatten(2).transpose(1, 2)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """(B, h*w, C) -> (B, C, h, w); the inverse of pack."""
    return tokens.transpose(1, 2).unflatten(2, (h, w))


def latent_ids(batch: int, h: int, w: int, t: int = 0, device: torch.device | str = "cpu") -> Tensor:
    """Position ids (B, h*w, 4) of a latent grid: (t, i, j, 0), row-major."""
    i, j = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ids = torch.stack([torch.full_like(i, t), i, j, torch.zeros_like(i)], dim=-1).reshape(1, h * w, 4)
    return ids.expand(batch, -1, -1)


def text_ids(batch: int, length: int, device: torch.device | str = "cpu") -> Tensor:
    """Position ids (B, L, 4) of text tokens: (0, 0, 0, l)."""
    ids = torch.zeros(1, length, 4, dtype=torch.long, device=device)
    ids[..., 3] = torch.arange(length, device=device)
    return ids.expand(batch, -1, -1)


def reference_tokens(references: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Reference latents [(B, 128, h_k, w_k), ...] -> tokens (B, sum h_k w_k, 128) and ids with t = 10 + 10k."""
    tokens, ids = [], []
    for k, ref in enumerate(references):
        b, _, h, w = ref.shape
        tokens.append(pack(ref))
        ids.append(latent_ids(b, h, w, t=REFERENCE_TIME_SCALE * (k + 1), device=ref.device))
    return torch.cat(tokens, dim=1), torch.cat(ids, dim=1)


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """The resolution- and step-dependent shift of FLUX.2's schedule (target tokens only, not references)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return a2 * image_seq_len + b2
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    slope = (m_200 - m_10) / 190.0
    return slope * num_steps + (m_200 - 200.0 * slope)


def get_schedule(num_steps: int, image_seq_len: int, flow_shift: float | None = None) -> list[float]:
    """num_steps + 1 times from 1 to 0: linspace shifted by exp(mu) (or a constant `flow_shift`)."""
    ts = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()
    if flow_shift is not None:
        return [flow_shift * t / (1 + (flow_shift - 1) * t) for t in ts]
    mu = compute_empirical_mu(image_seq_len, num_steps)
    return [0.0 if t == 0 else math.exp(mu) / (math.exp(mu) + (1 / t - 1)) for t in ts]


@dataclass
class Conditioning:
    """What the DiT is conditioned on besides the noisy latents."""

    ctx: Tensor  # (B, L, C) text embeddings
    neg_ctx: Tensor | None = None  # (B, L, C) negative-prompt embeddings, used when cfg_scale is set
    ref_tokens: Tensor | None = None  # (B, N_ref, 128) packed reference latents
    ref_ids: Tensor | None = None  # (B, N_ref, 4)
    guidance: float | None = None  # embedded guidance (dev)
    cfg_scale: float | None = None  # true classifier-free guidance (base variants)


def denoise(model: Callable[..., Tensor], x: Tensor, x_ids: Tensor, cond: Conditioning, timesteps: list[float],
            progress: Callable[[int], None] | None = None) -> Tensor:
    """Euler on the velocity: x <- x + (t_next - t) * v(x, t). x: packed noise (B, N, 128), float32."""
    b = x.shape[0]
    ctx_ids = text_ids(b, cond.ctx.shape[1], device=x.device)
    all_ids = x_ids if cond.ref_tokens is None else torch.cat((x_ids, cond.ref_ids), dim=1)
    guidance = None if cond.guidance is None else torch.full((b,), cond.guidance, device=x.device)
    n = x.shape[1]
    for step, (t_cur, t_next) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        t_vec = torch.full((b,), t_cur, dtype=x.dtype, device=x.device)
        inp = x if cond.ref_tokens is None else torch.cat((x, cond.ref_tokens.to(x.dtype)), dim=1)
        v = model(inp, all_ids, t_vec, cond.ctx, ctx_ids, guidance)[:, :n].float()
        if cond.cfg_scale is not None and cond.neg_ctx is not None:
            v_neg = model(inp, all_ids, t_vec, cond.neg_ctx, ctx_ids, guidance)[:, :n].float()
            v = v_neg + cond.cfg_scale * (v - v_neg)
        x = x + (t_next - t_cur) * v
        if progress is not None:
            progress(step)
    return x
