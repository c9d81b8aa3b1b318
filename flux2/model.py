"""The FLUX.2 diffusion transformer (DiT).

Module attribute names are the BFL checkpoint keys (`double_blocks.0.img_attn.qkv.weight`, ...), so a
`flux2-*.safetensors` file loads with `load_state_dict(strict=True)`. Imports only torch.

Shapes: x (B, N_img, 128) packed latents, x_ids (B, N_img, 4), timesteps (B,) in [0, 1], ctx (B, L, C),
ctx_ids (B, L, 4), guidance (B,) or None. Output: a velocity (B, N_img, 128).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from flux2.variants import Variant


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding [cos, sin] of `time_factor * t` (t in [0, 1])."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return emb.to(t.dtype) if torch.is_floating_point(t) else emb


def rope(pos: Tensor, dim: int, theta: int) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation angles for one position axis: (B, N, dim/2) each, float32."""
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta**scale)
    angles = pos.to(torch.float64)[..., None] * omega
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs (x[2j], x[2j+1]) of x (B, N, heads, D) by their angles: x * cos + swapped(x) * sin,
    with EmbedND's full-width tables (B, N, 1, D): cos repeated per pair, sin as (-sin, +sin) per pair, and
    swapped(x) = (x[2j+1], x[2j]). The same products and sums as the pairwise form, in three kernels instead of
    seven."""
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return (xf * cos + swapped * sin).type_as(x)


class EmbedND(nn.Module):
    """4-axis (t, h, w, l) rotary embedding; each axis owns `axes_dim[i]` dims of every head."""

    def __init__(self, theta: int, axes_dim: tuple[int, ...]):
        super().__init__()
        self.theta = theta
        self.axes_dim = axes_dim

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """ids (B, N, 4) -> the tables apply_rope takes: cos and signed sin, (B, N, 1, head_dim) float32."""
        parts = [rope(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)]
        cos = torch.cat([c for c, _ in parts], dim=-1)
        sin = torch.cat([s for _, s in parts], dim=-1)
        cos = torch.stack([cos, cos], dim=-1).flatten(-2)
        sin = torch.stack([-sin, sin], dim=-1).flatten(-2)
        return cos.unsqueeze(2), sin.unsqueeze(2)


# `model.attention_backend`: which scaled-dot-product kernel the blocks use; auto lets torch pick per call.
ATTENTION_BACKENDS = {"auto": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                      "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def attention(q: Tensor, k: Tensor, v: Tensor, pe: tuple[Tensor, Tensor], backend: SDPBackend | None = None
              ) -> Tensor:
    """RoPE then scaled dot-product attention, no mask. q, k, v: (B, N, heads, D) -> (B, N, heads * D).
    Tokens stay outermost (the layout flash attention kernels read without a copy); SDPA sees transposed views.
    `backend`: one SDPA kernel (inside the block, so a checkpointed block recomputes with the same kernel)."""
    q, k, v = apply_rope(q, *pe).transpose(1, 2), apply_rope(k, *pe).transpose(1, 2), v.transpose(1, 2)
    if backend is None:
        x = F.scaled_dot_product_attention(q, k, v)
    else:
        with sdpa_kernel([backend]):
            x = F.scaled_dot_product_attention(q, k, v)
    return x.transpose(1, 2).flatten(2)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=False)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMSNorm over head_dim, computed in float32, with a learned `scale` (checkpoint key name)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        rrms = torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + 1e-6)
        return (xf * rrms).to(x.dtype) * self.scale.to(x.dtype)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


def split_qkv(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, N, 3 * heads * D) laid out [q; k; v], head-major -> three (B, N, heads, D) views."""
    q, k, v = qkv.unflatten(-1, (3, num_heads, -1)).unbind(2)
    return q, k, v


class SelfAttention(nn.Module):
    """The projections of one stream of a double block; the attention itself is joint (see DoubleStreamBlock)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim, bias=False)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = split_qkv(self.qkv(x), self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


class SiLUActivation(nn.Module):
    """SwiGLU: silu(first half) * second half."""

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return F.silu(x1) * x2


class Modulation(nn.Module):
    """Shared modulation: computed once per forward from SiLU(vec), used by every block of its kind."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=False)

    def forward(self, vec: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return [tuple(out[i : i + 3]) for i in range(0, self.multiplier, 3)]


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return (1 + scale) * F.layer_norm(x, x.shape[-1:], eps=1e-6) + shift


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.attention_backend: SDPBackend | None = None
        self.img_attn = SelfAttention(hidden_size, num_heads)
        self.img_mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden * 2, bias=False), SiLUActivation(),
            nn.Linear(mlp_hidden, hidden_size, bias=False))
        self.txt_attn = SelfAttention(hidden_size, num_heads)
        self.txt_mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden * 2, bias=False), SiLUActivation(),
            nn.Linear(mlp_hidden, hidden_size, bias=False))

    def forward(self, img: Tensor, txt: Tensor, pe: tuple[Tensor, Tensor], mod_img: list, mod_txt: list
                ) -> tuple[Tensor, Tensor]:
        (img_shift1, img_scale1, img_gate1), (img_shift2, img_scale2, img_gate2) = mod_img
        (txt_shift1, txt_scale1, txt_gate1), (txt_shift2, txt_scale2, txt_gate2) = mod_txt

        img_q, img_k, img_v = self.img_attn.qkv_heads(modulate(img, img_shift1, img_scale1))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(modulate(txt, txt_shift1, txt_scale1))
        # Joint attention over [txt; img], text first.
        q = torch.cat((txt_q, img_q), dim=1)
        k = torch.cat((txt_k, img_k), dim=1)
        v = torch.cat((txt_v, img_v), dim=1)
        attn = attention(q, k, v, pe, self.attention_backend)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = img + img_gate1 * self.img_attn.proj(img_attn)
        img = img + img_gate2 * self.img_mlp(modulate(img, img_shift2, img_scale2))
        txt = txt + txt_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + txt_gate2 * self.txt_mlp(modulate(txt, txt_shift2, txt_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP over [txt; img], with one fused input and one fused output projection."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden * 2, bias=False)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden, hidden_size, bias=False)
        self.norm = QKNorm(hidden_size // num_heads)
        self.mlp_act = SiLUActivation()
        self.attention_backend: SDPBackend | None = None

    def forward(self, x: Tensor, pe: tuple[Tensor, Tensor], mod: list) -> Tensor:
        ((shift, scale, gate),) = mod
        qkv, mlp = self.linear1(modulate(x, shift, scale)).split(
            [3 * self.hidden_size, 2 * self.mlp_hidden], dim=-1)
        q, k, v = split_qkv(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, pe, self.attention_backend)
        return x + gate * self.linear2(torch.cat((attn, self.mlp_act(mlp)), dim=-1))


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, out_channels, bias=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=False))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)  # BFL order: shift first
        return self.linear(modulate(x, shift, scale))


class Flux2Transformer(nn.Module):
    """The FLUX.2 DiT for one variant (see flux2.variants)."""

    def __init__(self, variant: Variant):
        super().__init__()
        if sum(variant.axes_dim) != variant.head_dim:
            raise ValueError(f"variant {variant.name}: axes_dim {variant.axes_dim} must sum to head_dim "
                             f"{variant.head_dim}")
        self.variant = variant
        h = variant.hidden_size
        self.pe_embedder = EmbedND(variant.theta, variant.axes_dim)
        self.img_in = nn.Linear(variant.in_channels, h, bias=False)
        self.time_in = MLPEmbedder(variant.time_dim, h)
        if variant.use_guidance_embed:
            self.guidance_in = MLPEmbedder(variant.time_dim, h)
        self.txt_in = nn.Linear(variant.context_in_dim, h, bias=False)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(h, variant.num_heads, variant.mlp_ratio) for _ in range(variant.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(h, variant.num_heads, variant.mlp_ratio) for _ in range(variant.depth_single_blocks))
        self.double_stream_modulation_img = Modulation(h, double=True)
        self.double_stream_modulation_txt = Modulation(h, double=True)
        self.single_stream_modulation = Modulation(h, double=False)
        self.final_layer = LastLayer(h, variant.in_channels)
        self.gradient_checkpointing = False
        # With gradient_checkpointing: recompute only the first N blocks (double blocks first); None = all.
        self.checkpoint_blocks: int | None = None

    def forward(self, x: Tensor, x_ids: Tensor, timesteps: Tensor, ctx: Tensor, ctx_ids: Tensor,
                guidance: Tensor | None = None) -> Tensor:
        dtype = self.img_in.weight.dtype
        num_txt = ctx.shape[1]
        vec = self.time_in(timestep_embedding(timesteps.to(dtype), self.variant.time_dim))
        if self.variant.use_guidance_embed:
            if guidance is None:
                raise ValueError(f"variant {self.variant.name} needs a guidance value (embedded guidance)")
            vec = vec + self.guidance_in(timestep_embedding(guidance.to(dtype), self.variant.time_dim))
        mod_img = self.double_stream_modulation_img(vec)
        mod_txt = self.double_stream_modulation_txt(vec)
        mod_single = self.single_stream_modulation(vec)

        img = self.img_in(x.to(dtype))
        txt = self.txt_in(ctx.to(dtype))
        pe = self.pe_embedder(torch.cat((ctx_ids, x_ids), dim=1))

        for i, block in enumerate(self.double_blocks):
            img, txt = self._run(i, block, img, txt, pe, mod_img, mod_txt)
        x = torch.cat((txt, img), dim=1)
        for i, block in enumerate(self.single_blocks, start=len(self.double_blocks)):
            x = self._run(i, block, x, pe, mod_single)
        return self.final_layer(x[:, num_txt:], vec)

    def set_attention_backend(self, name: str) -> None:
        """Use one SDPA kernel in every block (`auto`: torch's choice per call); ValueError for an unknown name."""
        if name not in ATTENTION_BACKENDS:
            raise ValueError(f"model.attention_backend: {name!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
        for block in [*self.double_blocks, *self.single_blocks]:
            block.attention_backend = ATTENTION_BACKENDS[name]

    def _run(self, index: int, block: nn.Module, *args):
        """Block `index` (in execution order), checkpointed when asked: it keeps only its inputs for backward and
        runs its forward again there. A compiled block (flux2.compile) that can checkpoint inside its graph is told
        to, through its `in_graph_checkpoint`."""
        recompute = (self.gradient_checkpointing and torch.is_grad_enabled()
                     and (self.checkpoint_blocks is None or index < self.checkpoint_blocks))
        if hasattr(block, "in_graph_checkpoint"):
            block.in_graph_checkpoint = recompute
            return block(*args)
        if recompute:
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)
