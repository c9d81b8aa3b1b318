"""LoRA layouts: names, detection, exact conversions (incl. the fused-qkv cases), metadata, `flux2 convert-lora`."""
import copy
import json
from dataclasses import replace

import pytest
import torch

from flux2 import cli
from flux2.lora import apply_loras, linear_modules
from flux2.lora_formats import (LoRAFormatError, convert_lora, detect_format, diffusers_names, is_module_path,
                                kohya_name, lora_from_state_dict, module_path_from_diffusers, module_path_from_kohya,
                                read_lora, to_diffusers)
from flux2.model import Flux2Transformer
from flux2.safetensors_io import load_file, read_metadata, save_file_atomic
from tests.conftest import random_dit, rel_err
from tests.test_lora import EXTRA, TINY, inputs, random_network, run

ALL_OUTSIDE = EXTRA + ["txt_in", "double_stream_modulation_txt.lin", "single_stream_modulation.lin",
                       "final_layer.adaLN_modulation.1", "time_in.out_layer"]


def merged_with(dit, files, multipliers=1.0):
    model = copy.deepcopy(dit)
    apply_loras(model, files, multipliers)
    return model


# ------------------------------------------------------------------------------------------------ names

def test_name_tables_cover_the_dit_and_match_diffusers():
    from tests.oracles.dit import diffusers_transformer

    variant = replace(TINY, use_guidance_embed=True)
    with torch.device("meta"):
        ours = linear_modules(Flux2Transformer(variant))
        theirs = {n for n, m in diffusers_transformer(variant).named_modules() if isinstance(m, torch.nn.Linear)}
    assert all(is_module_path(p) for p in ours)
    assert all(module_path_from_kohya(kohya_name(p)) == p for p in ours)
    mapped = {n: p for p in ours for n in diffusers_names(p)}
    assert mapped.keys() == theirs  # every diffusers Linear is reached, and only real ones
    for name, path in mapped.items():
        back, index, count = module_path_from_diffusers(name)
        assert back == path and diffusers_names(path)[index] == name and count == len(diffusers_names(path))


def test_kohya_names_are_matched_not_blindly_replaced():
    assert module_path_from_kohya("lora_unet_final_layer_adaLN_modulation_1") == "final_layer.adaLN_modulation.1"
    assert module_path_from_kohya("lora_unet_double_blocks_17_txt_mlp_2") == "double_blocks.17.txt_mlp.2"
    assert module_path_from_kohya("lora_unet_single_blocks_47_linear1") == "single_blocks.47.linear1"
    assert module_path_from_kohya("lora_unet_double_stream_modulation_img_lin") == "double_stream_modulation_img.lin"
    for unknown in ("lora_unet_double_blocks_0_img_mod_lin", "lora_unet_single_blocks_0_linear3",
                    "lora_unet_input_blocks_1_0_proj", "lora_te1_text_model_encoder_layers_0_mlp_fc1"):
        assert module_path_from_kohya(unknown) is None
    assert kohya_name("double_blocks.0.img_attn.qkv") == "lora_unet_double_blocks_0_img_attn_qkv"


def test_detect_format():
    assert detect_format(["lora_unet_img_in.lora_down.weight", "lora_unet_img_in.alpha"]) == "kohya"
    assert detect_format(["diffusion_model.img_in.lora_A.weight"]) == "comfy"
    assert detect_format(["transformer.x_embedder.lora_A.weight"]) == "diffusers"
    assert detect_format(["base_model.model.x_embedder.lora_A.weight"]) == "diffusers"
    with pytest.raises(LoRAFormatError, match="mixes LoRA layouts"):
        detect_format(["lora_unet_img_in.lora_down.weight", "transformer.x_embedder.lora_A.weight"])
    with pytest.raises(LoRAFormatError, match="text-encoder"):
        detect_format(["lora_unet_img_in.lora_down.weight", "lora_te1_x.lora_down.weight"])
    with pytest.raises(LoRAFormatError, match="DoRA"):
        detect_format(["transformer.x_embedder.lora_magnitude_vector"])
    with pytest.raises(LoRAFormatError, match="no tensors"):
        detect_format([], "empty.safetensors")


# ------------------------------------------------------------------------------------------------ round trips

def test_round_trip_kohya_comfy_diffusers_kohya(tmp_path):
    dit = random_dit()
    net = random_network(dit, rank=4, alpha=3.0, include_patterns=ALL_OUTSIDE)
    kohya, comfy, diffusers, back = (tmp_path / f"{n}.safetensors" for n in ("kohya", "comfy", "diffusers", "back"))
    net.save(kohya, {"ss_learning_rate": "0.0001"})
    assert convert_lora(kohya, comfy, "comfy").format == "kohya"
    assert convert_lora(comfy, diffusers, "diffusers").format == "comfy"
    assert convert_lora(diffusers, back, "kohya").format == "diffusers"

    comfy_keys = load_file(comfy).keys()
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight" in comfy_keys
    assert "diffusion_model.final_layer.adaLN_modulation.1.lora_B.weight" in comfy_keys
    assert not any(k.endswith(".alpha") for k in comfy_keys) and len(comfy_keys) == 2 * len(net.lora_modules)
    diffusers_tensors = load_file(diffusers)
    assert diffusers_tensors["transformer.transformer_blocks.1.attn.add_v_proj.lora_B.weight"].shape == (128, 4)
    assert diffusers_tensors["transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight"].shape == (
        4, 128)
    assert read_metadata(diffusers)["format"] == "pt"
    back_tensors = load_file(back)
    assert back_tensors.keys() == load_file(kohya).keys()
    assert back_tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (4, 128)  # rank kept
    meta = read_metadata(back)
    assert meta["ss_learning_rate"] == "0.0001" and meta["ss_base_model_version"] == "flux_2_tiny"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0"  # alpha now folded: alpha = rank

    x = inputs()
    expected = copy.deepcopy(dit)
    net.merge_into(expected)
    expected = run(expected, x)
    for path in (kohya, comfy, diffusers, back):
        assert rel_err(run(merged_with(dit, [path]), x), expected) < 1e-5, path


def diffusers_qkv_lora(tmp_path, shared_a: bool, metadata=None):
    """A hand-made diffusers-layout LoRA on the tiny DiT's first double block: q/k/v pieces of the image
    stream (shared or different A, different ranks) and only q and v of the text stream."""
    g = torch.Generator().manual_seed(5)
    h = TINY.hidden_size
    pieces = {}  # diffusers module -> (A, B)
    shared = torch.randn(3, h, generator=g)
    for name, rank in [("to_q", 3), ("to_k", 2), ("to_v", 4), ("add_q_proj", 2), ("add_v_proj", 3)]:
        if shared_a and not name.startswith("add"):
            rank = 3
        a = shared if shared_a and not name.startswith("add") else torch.randn(rank, h, generator=g)
        pieces[f"transformer_blocks.0.attn.{name}"] = (a, torch.randn(h, rank, generator=g) * 0.3)
    tensors = {}
    for name, (a, b) in pieces.items():
        tensors[f"transformer.{name}.lora_A.weight"] = a.clone()
        tensors[f"transformer.{name}.lora_B.weight"] = b
    path = tmp_path / "qkv.safetensors"
    save_file_atomic(tensors, path, metadata)
    return path, pieces


def merge_by_hand(dit, pieces, scale=1.0):
    """Apply diffusers-layout pieces straight to the fused BFL weights: rows of q, k, v in turn."""
    model = copy.deepcopy(dit)
    h = TINY.hidden_size
    with torch.no_grad():
        for name, (a, b) in pieces.items():
            path, index, _ = module_path_from_diffusers(name)
            model.get_submodule(path).weight[index * h:(index + 1) * h] += scale * b @ a
    return model


@pytest.mark.parametrize("shared_a", [False, True])
def test_diffusers_qkv_pieces_fuse_exactly(tmp_path, shared_a):
    dit = random_dit()
    path, pieces = diffusers_qkv_lora(tmp_path, shared_a)
    lora = read_lora(path)
    img, txt = lora.modules["double_blocks.0.img_attn.qkv"], lora.modules["double_blocks.0.txt_attn.qkv"]
    assert img.rank == (3 if shared_a else 3 + 2 + 4) and txt.rank == 2 + 3  # missing k: its rows stay zero
    assert torch.count_nonzero(txt.up[128:256]) == 0
    x = inputs()
    expected = run(merge_by_hand(dit, pieces), x)
    assert rel_err(run(merged_with(dit, [path]), x), expected) < 1e-6
    # And through the other layouts and back.
    for target in ("kohya", "comfy", "diffusers"):
        out = tmp_path / f"{target}.safetensors"
        convert_lora(path, out, target)
        assert rel_err(run(merged_with(dit, [out]), x), expected) < 1e-6, target


def test_diffusers_peft_metadata_scale_matches_diffusers(tmp_path):
    from diffusers import Flux2KleinPipeline
    from tests.oracles.dit import diffusers_transformer, dit_to_diffusers
    from tests.test_lora import diffusers_forward

    config = {"r": 3, "lora_alpha": 6, "rank_pattern": {"add_q_proj": 2}, "alpha_pattern": {"add_q_proj": 1.0},
              "target_modules": [f"transformer_blocks.0.attn.{n}" for n in ("to_q", "to_k", "to_v", "add_q_proj",
                                                                             "add_v_proj")]}
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps({f"transformer.{k}": v
                                                                      for k, v in config.items()})}
    path, pieces = diffusers_qkv_lora(tmp_path, shared_a=True, metadata=metadata)
    dit = random_dit()
    x = inputs()
    ours = run(merged_with(dit, [path]), x)

    theirs = diffusers_transformer(TINY).eval()
    theirs.load_state_dict(dit_to_diffusers(dit.state_dict()), strict=True)
    state_dict, meta = Flux2KleinPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    theirs.load_lora_adapter(state_dict, prefix="transformer", metadata=meta)
    assert rel_err(ours, diffusers_forward(theirs, x)) < 1e-4
    lora = read_lora(path)
    assert lora.modules["double_blocks.0.img_attn.qkv"].scale == 2.0  # 6 / 3
    # Written back as diffusers, the scale is folded in and the PEFT config dropped.
    out = tmp_path / "out.safetensors"
    convert_lora(path, out, "diffusers")
    assert "lora_adapter_metadata" not in read_metadata(out)
    assert rel_err(run(merged_with(dit, [out]), x), ours) < 1e-6


def test_comfy_spellings_alpha_and_diffusers_names(tmp_path):
    dit = random_dit()
    net = random_network(dit, rank=4, alpha=2.0)
    sd = net.kohya_state_dict()
    # ComfyUI's lora_down / lora_up spelling with .alpha keys, BFL names.
    down_up = {}
    for key, value in sd.items():
        name, _, suffix = key.partition(".")
        down_up[f"diffusion_model.{module_path_from_kohya(name)}.{suffix}"] = value
    lora = lora_from_state_dict(down_up)
    assert lora.format == "comfy" and lora.modules["single_blocks.1.linear2"].alpha == 2.0
    # Diffusers module names after the comfy prefix, and PEFT's base_model.model. prefix.
    comfy_diffusers_names = {k.replace("transformer.", "diffusion_model.", 1): v
                             for k, v in to_diffusers(lora_from_state_dict(sd)).items()}
    peft = {k.replace("diffusion_model.", "base_model.model.", 1): v for k, v in comfy_diffusers_names.items()}
    x = inputs()
    expected = copy.deepcopy(dit)
    net.merge_into(expected)
    expected = run(expected, x)
    for name, tensors in (("down_up", down_up), ("comfy_diffusers_names", comfy_diffusers_names), ("peft", peft)):
        save_file_atomic(tensors, tmp_path / f"{name}.safetensors")
        assert rel_err(run(merged_with(dit, [tmp_path / f"{name}.safetensors"]), x), expected) < 1e-5, name


def test_broken_files(tmp_path):
    for tensors, pattern in [
        ({"lora_unet_img_in.lora_down.weight": torch.zeros(2, 128)}, "no up"),
        ({"lora_unet_img_in.lora_down.weight": torch.zeros(2, 128), "lora_unet_img_in.lora_up.weight":
          torch.zeros(128, 3)}, "one rank"),
        ({"lora_unet_img_in.lora_mid.weight": torch.zeros(2, 2)}, "Tucker-decomposed.*LoCon.*not support"),
        ({"lora_unet_img_in.lora_middle.weight": torch.zeros(2, 2)}, "unknown suffix"),
        ({"transformer.x_embedder.lora_A.weight": torch.zeros(2, 128), "transformer.x_embedder.lora_B.weight":
          torch.zeros(128, 2), "transformer.ff.linear_in.lora_A.weight": torch.zeros(2, 2)}, "name no Linear"),
        ({f"diffusion_model.{name}.lora_{ab}.weight": torch.zeros(shape) for name in ("img_in", "x_embedder")
          for ab, shape in (("A", (2, 128)), ("B", (128, 2)))}, "twice"),
    ]:
        save_file_atomic(tensors, tmp_path / "bad.safetensors")
        with pytest.raises(LoRAFormatError, match=pattern):
            read_lora(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="unknown LoRA target format 'peft'"):
        convert_lora(tmp_path / "bad.safetensors", tmp_path / "out.safetensors", "peft")


# ------------------------------------------------------------------------------------------------ CLI

def test_convert_lora_cli(tmp_path, capsys):
    net = random_network(random_dit())
    net.save(tmp_path / "in.safetensors")
    out = tmp_path / "out.safetensors"
    assert cli.main(["convert-lora", "--input", str(tmp_path / "in.safetensors"), "--output", str(out),
                     "--target", "comfy"]) == 0
    assert "20 modules, kohya layout -> comfy" in capsys.readouterr().out
    assert "diffusion_model.single_blocks.0.linear1.lora_B.weight" in load_file(out)
    save_file_atomic({"foo.weight": torch.zeros(1)}, tmp_path / "bad.safetensors")
    assert cli.main(["convert-lora", "--input", str(tmp_path / "bad.safetensors"), "--output", str(out),
                     "--target", "kohya"]) == 2
    assert "not a FLUX.2 DiT LoRA" in capsys.readouterr().err
