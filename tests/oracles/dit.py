"""BFL -> diffusers key mapping for the DiT, written from the reference sheet (section 3.2), for the oracle."""
import re

import torch


def dit_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    simple = {
        "img_in.weight": "x_embedder.weight",
        "txt_in.weight": "context_embedder.weight",
        "time_in.in_layer.weight": "time_guidance_embed.timestep_embedder.linear_1.weight",
        "time_in.out_layer.weight": "time_guidance_embed.timestep_embedder.linear_2.weight",
        "guidance_in.in_layer.weight": "time_guidance_embed.guidance_embedder.linear_1.weight",
        "guidance_in.out_layer.weight": "time_guidance_embed.guidance_embedder.linear_2.weight",
        "double_stream_modulation_img.lin.weight": "double_stream_modulation_img.linear.weight",
        "double_stream_modulation_txt.lin.weight": "double_stream_modulation_txt.linear.weight",
        "single_stream_modulation.lin.weight": "single_stream_modulation.linear.weight",
        "final_layer.linear.weight": "proj_out.weight",
    }
    for k, v in sd.items():
        if k in simple:
            out[simple[k]] = v
        elif k == "final_layer.adaLN_modulation.1.weight":
            shift, scale = v.chunk(2, dim=0)  # BFL [shift; scale] -> diffusers [scale; shift]
            out["norm_out.linear.weight"] = torch.cat([scale, shift], dim=0)
        elif m := re.fullmatch(r"double_blocks\.(\d+)\.(img|txt)_(attn|mlp)\.(.+)", k):
            i, stream, part, rest = m.groups()
            pre = f"transformer_blocks.{i}."
            img = stream == "img"
            if rest == "qkv.weight":
                names = ["to_q", "to_k", "to_v"] if img else ["add_q_proj", "add_k_proj", "add_v_proj"]
                for name, w in zip(names, v.chunk(3, dim=0)):
                    out[f"{pre}attn.{name}.weight"] = w
            elif rest == "proj.weight":
                out[pre + ("attn.to_out.0.weight" if img else "attn.to_add_out.weight")] = v
            elif rest.startswith("norm."):
                which = "q" if "query_norm" in rest else "k"
                out[pre + (f"attn.norm_{which}.weight" if img else f"attn.norm_added_{which}.weight")] = v
            elif rest in ("0.weight", "2.weight"):
                ff = "ff" if img else "ff_context"
                out[f"{pre}{ff}.{'linear_in' if rest[0] == '0' else 'linear_out'}.weight"] = v
            else:
                raise KeyError(k)
        elif m := re.fullmatch(r"single_blocks\.(\d+)\.(.+)", k):
            i, rest = m.groups()
            pre = f"single_transformer_blocks.{i}.attn."
            rename = {"linear1.weight": "to_qkv_mlp_proj.weight", "linear2.weight": "to_out.weight",
                      "norm.query_norm.scale": "norm_q.weight", "norm.key_norm.scale": "norm_k.weight"}
            out[pre + rename[rest]] = v
        else:
            raise KeyError(k)
    return out


def diffusers_transformer(variant, guidance_embeds=None):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1, in_channels=variant.in_channels, num_layers=variant.depth,
        num_single_layers=variant.depth_single_blocks, attention_head_dim=variant.head_dim,
        num_attention_heads=variant.num_heads, joint_attention_dim=variant.context_in_dim,
        timestep_guidance_channels=variant.time_dim, mlp_ratio=variant.mlp_ratio, axes_dims_rope=variant.axes_dim,
        rope_theta=variant.theta, eps=1e-6,
        guidance_embeds=variant.use_guidance_embed if guidance_embeds is None else guidance_embeds)
