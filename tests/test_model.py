"""The DiT equals diffusers' Flux2Transformer2DModel on random weights, and has the BFL checkpoint keys."""
import re
from dataclasses import replace

import pytest
import torch

from flux2.model import Flux2Transformer
from flux2.variants import VARIANTS
from tests.conftest import dit_inputs, random_dit, rel_err
from tests.oracles.dit import diffusers_transformer, dit_to_diffusers

REL_TOL = 1e-4  # fp32, relative L2 error


@pytest.mark.parametrize("guidance", [False, True])
@pytest.mark.parametrize("refs", [(), ((4, 6), (2, 4))], ids=["t2i", "two_refs"])
def test_forward_matches_diffusers(guidance, refs):
    variant = replace(VARIANTS["tiny"], use_guidance_embed=guidance)
    ours = random_dit(variant)
    theirs = diffusers_transformer(variant).eval()
    theirs.load_state_dict(dit_to_diffusers(ours.state_dict()), strict=True)
    x, x_ids, t, ctx, ctx_ids = dit_inputs(variant, batch=2, w=6, refs=refs)
    g = torch.tensor([3.5, 1.0]) if guidance else None
    with torch.no_grad():
        a = ours(x, x_ids, t, ctx, ctx_ids, g)
        b = theirs(hidden_states=x, encoder_hidden_states=ctx, timestep=t, img_ids=x_ids, txt_ids=ctx_ids,
                   guidance=g, return_dict=False)[0]
    assert a.shape == (2, x.shape[1], 128)
    assert rel_err(a, b) < REL_TOL


def test_oracle_mapping_equals_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    sd = random_dit(replace(VARIANTS["tiny"], use_guidance_embed=True)).state_dict()
    ours = dit_to_diffusers(sd)
    theirs = convert_flux2_transformer_checkpoint_to_diffusers(dict(sd))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_reference_predictions_do_not_change_target_tokens_layout():
    """Appending references changes the target prediction (they are attended to) but not its shape."""
    variant = VARIANTS["tiny"]
    model = random_dit(variant)
    x, x_ids, t, ctx, ctx_ids = dit_inputs(variant, batch=2, w=6)
    xr, xr_ids, *_ = dit_inputs(variant, batch=2, w=6, refs=((4, 6),))
    with torch.no_grad():
        a = model(x, x_ids, t, ctx, ctx_ids)
        b = model(xr, xr_ids, t, ctx, ctx_ids)[:, : x.shape[1]]
    assert a.shape == b.shape and not torch.allclose(a, b)


# Checkpoint key layout per BFL (reference sheet section 3.1), with shapes for H, C.
def expected_keys(v):
    H, C, M = v.hidden_size, v.context_in_dim, v.mlp_hidden
    keys = {"img_in.weight": (H, 128), "txt_in.weight": (H, C), "time_in.in_layer.weight": (H, 256),
            "time_in.out_layer.weight": (H, H), "double_stream_modulation_img.lin.weight": (6 * H, H),
            "double_stream_modulation_txt.lin.weight": (6 * H, H), "single_stream_modulation.lin.weight": (3 * H, H),
            "final_layer.adaLN_modulation.1.weight": (2 * H, H), "final_layer.linear.weight": (128, H)}
    if v.use_guidance_embed:
        keys |= {"guidance_in.in_layer.weight": (H, 256), "guidance_in.out_layer.weight": (H, H)}
    for i in range(v.depth):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}_"
            keys |= {p + "attn.qkv.weight": (3 * H, H), p + "attn.proj.weight": (H, H),
                     p + "attn.norm.query_norm.scale": (128,), p + "attn.norm.key_norm.scale": (128,),
                     p + "mlp.0.weight": (2 * M, H), p + "mlp.2.weight": (H, M)}
    for j in range(v.depth_single_blocks):
        p = f"single_blocks.{j}."
        keys |= {p + "linear1.weight": (3 * H + 2 * M, H), p + "linear2.weight": (H, H + M),
                 p + "norm.query_norm.scale": (128,), p + "norm.key_norm.scale": (128,)}
    return keys


@pytest.mark.parametrize("name,tensors,billions", [("dev", 299, 32.223), ("klein-4b", 149, 3.876),
                                                   ("klein-base-9b", 201, 9.079)])
def test_official_key_layout(name, tensors, billions):
    v = VARIANTS[name]
    with torch.device("meta"):
        model = Flux2Transformer(v)
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    assert shapes == expected_keys(v)
    assert len(shapes) == tensors
    assert sum(t.numel() for t in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.001)


def test_no_biases_and_interleaved_rope_pairs():
    model = random_dit(VARIANTS["tiny"])
    assert not any(re.search(r"\.bias$", k) for k in model.state_dict())
    # RoPE rotates adjacent pairs: position 0 on every axis is the identity.
    q = torch.randn(1, 3, 1, VARIANTS["tiny"].head_dim)  # (B, N, heads, D)
    cos, sin = model.pe_embedder(torch.zeros(1, 3, 4, dtype=torch.long))
    from flux2.model import apply_rope

    assert torch.equal(apply_rope(q, cos, sin), q)


def test_gradient_checkpointing_gives_same_gradients():
    variant = VARIANTS["tiny"]
    x, x_ids, t, ctx, ctx_ids = dit_inputs(variant, batch=2, w=6)
    grads = []
    for ckpt in (False, True):
        model = random_dit(variant).train()
        model.gradient_checkpointing = ckpt
        model(x, x_ids, t, ctx, ctx_ids).square().mean().backward()
        grads.append(model.single_blocks[0].linear1.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)
