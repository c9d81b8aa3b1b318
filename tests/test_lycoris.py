"""LoKr and LoHa on the tiny DiT, proven against the reference implementations: LyCORIS (lycoris-lora) builds the
same adapter from our file with the same deltas and DiT output, diffusers loads our LoKr, ComfyUI's key rule
finds every module; hooks == merged, fp8, files in every layout, mixing with LoRA, errors."""
import copy
import logging

import pytest
import torch

from flux2.fp8 import dit_block_linear, quantize_linears
from flux2.lora import apply_loras, create_network, param_groups
from flux2.lora_formats import LoRAFormatError, read_lora, write_lora
from flux2.lycoris import factorization, lokr_layout
from flux2.network_config import NetworkOptions
from flux2.safetensors_io import load_file, read_metadata, save_file_atomic
from tests.conftest import random_dit, rel_err
from tests.test_lora import EXTRA, TINY, diffusers_forward, inputs, run

# fp32 on CPU: the kron / Hadamard products are the same arithmetic, sums in another order.
DELTA_TOL, OUTPUT_TOL = 1e-6, 1e-5
CONFIGS = {"lokr": NetworkOptions("lokr"),
           "lokr_factor16_decompose_both": NetworkOptions("lokr", factor=16, decompose_both=True),
           "lokr_full_matrix": NetworkOptions("lokr", factor=8, full_matrix=True),
           "loha": NetworkOptions("loha")}


def random_adapter(dit, options, rank=4, alpha=2.0, seed=3, **kwargs):
    """A network whose factors are all non-zero, so it really changes the output."""
    torch.manual_seed(seed)
    net = create_network(dit, rank, alpha, options=options, **kwargs)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    return net


def test_factorization_and_layout_match_lycoris():
    from lycoris.functional.general import factorization as theirs
    from lycoris.modules.lokr import LokrModule

    dims = [127, 128, 250, 360, 384, 512, 768, 1152, 3072, 9216, 27648, 6144, 55296]
    assert all(factorization(d, f) == theirs(d, f) for d in dims for f in (-1, 1, 2, 4, 8, 16, 3, 100))
    for out_f, in_f, rank, factor, both, full in [(384, 128, 4, -1, False, False), (384, 128, 4, 16, True, False),
                                                 (1152, 128, 8, 4, False, False), (128, 512, 64, -1, False, False),
                                                 (768, 128, 2, 8, True, True)]:
        reference = LokrModule("x", torch.nn.Linear(in_f, out_f, bias=False), lora_dim=rank, alpha=1.0,
                               factor=factor, decompose_both=both, full_matrix=full)
        expected = {k: tuple(v.shape) for k, v in reference.state_dict().items() if k.startswith("lokr_")}
        assert lokr_layout(out_f, in_f, rank, factor, both, full) == expected


@pytest.mark.parametrize("name", list(CONFIGS))
def test_lycoris_builds_the_same_adapter_from_our_file(name, tmp_path):
    from lycoris.kohya import create_network_from_weights

    dit = random_dit()
    net = random_adapter(dit, CONFIGS[name], include_patterns=EXTRA)
    path = tmp_path / "adapter.safetensors"
    net.save(path)
    x = inputs()
    ours = copy.deepcopy(dit)
    net.apply_to(ours)
    expected = run(ours, x)
    assert rel_err(expected, run(dit, x)) > 1e-2  # not vacuous

    theirs = copy.deepcopy(dit)
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    lycoris, _ = create_network_from_weights(1.0, None, None, None, theirs, weights_sd=load_file(path))
    lycoris.apply_to(None, theirs, apply_text_encoder=False, apply_unet=True)
    by_name = {m.lora_name: m for m in lycoris.unet_loras}
    assert set(by_name) == {f"lora_unet_{m.path.replace('.', '_')}" for m in net.lora_modules}
    for m in net.lora_modules:
        # LyCORIS' forward uses get_weight (scale applied once). Its get_diff_weight / merge_to apply alpha / rank
        # a second time (lycoris-lora 4.1.3), unlike its forward and ComfyUI: not used here.
        reference = by_name[f"lora_unet_{m.path.replace('.', '_')}"]
        assert rel_err(m.weight_delta(), reference.get_weight(reference.shape).float()) < DELTA_TOL, m.path
    assert rel_err(run(theirs, x), expected) < OUTPUT_TOL
    lycoris.set_multiplier(0.5)
    net.set_multiplier(0.5)
    assert rel_err(run(theirs, x), run(ours, x)) < OUTPUT_TOL


def test_comfyui_key_rule_finds_every_module_with_its_weight_shape(tmp_path):
    """ComfyUI maps `lora_unet_<key with '.' -> '_'>` to `diffusion_model.<key>.weight` for every weight of its
    (BFL-layout) FLUX.2 model; a module's delta must have that weight's shape, fused qkv and linear1 included."""
    dit = random_dit()
    key_map = {"lora_unet_" + k.removesuffix(".weight").replace(".", "_"): tuple(v.shape)
               for k, v in dit.state_dict().items() if k.endswith(".weight")}
    for name in ("lokr", "loha"):
        net = random_adapter(dit, CONFIGS[name], include_patterns=EXTRA)
        net.save(tmp_path / f"{name}.safetensors")
        lora = read_lora(tmp_path / f"{name}.safetensors")
        assert {k.split(".")[0] for k in load_file(tmp_path / f"{name}.safetensors")} <= set(key_map)
        for path, w in lora.modules.items():
            assert tuple(w.delta().shape) == key_map["lora_unet_" + path.replace(".", "_")]
        meta = read_metadata(tmp_path / f"{name}.safetensors")
        assert meta["ss_network_module"] == "lycoris.kohya" and f'"algo": "{name}"' in meta["ss_network_args"]
        assert meta["flux2.network_type"] == name and meta["modelspec.architecture"] == "Flux.2-tiny/lora"


@pytest.mark.parametrize("name", ["lokr", "lokr_full_matrix"])
def test_diffusers_loads_our_lokr_in_the_comfy_layout(name, tmp_path):
    from diffusers import Flux2KleinPipeline
    from tests.oracles.dit import diffusers_transformer, dit_to_diffusers

    dit = random_dit()
    net = random_adapter(dit, CONFIGS[name], include_patterns=EXTRA)
    net.save(tmp_path / "kohya.safetensors")
    write_lora(read_lora(tmp_path / "kohya.safetensors"), tmp_path / "comfy.safetensors", "comfy")
    x = inputs()
    net.apply_to(dit)
    expected = run(dit, x)
    net.remove()
    theirs = diffusers_transformer(TINY).eval()
    theirs.load_state_dict(dit_to_diffusers(dit.state_dict()), strict=True)
    # diffusers fuses its q/k/v projections to take the fused-qkv LoKr whole.
    theirs.load_lora_adapter(Flux2KleinPipeline.lora_state_dict(str(tmp_path / "comfy.safetensors")),
                             prefix="transformer")
    assert rel_err(diffusers_forward(theirs, x), expected) < 1e-5


def test_layouts_round_trip_and_diffusers_target_is_refused(tmp_path):
    dit = random_dit()
    x = inputs()
    for name in ("lokr_factor16_decompose_both", "loha"):
        net = random_adapter(dit, CONFIGS[name])
        net.save(tmp_path / "a.safetensors")
        merged = copy.deepcopy(dit)
        net.merge_into(merged)
        for target in ("comfy", "kohya"):
            write_lora(read_lora(tmp_path / "a.safetensors"), tmp_path / f"{target}.safetensors", target)
            back = read_lora(tmp_path / f"{target}.safetensors")
            assert back.format == target and len(back.modules) == len(net.lora_modules)
            applied = copy.deepcopy(dit)
            apply_loras(applied, [tmp_path / f"{target}.safetensors"])
            assert rel_err(run(applied, x), run(merged, x)) < OUTPUT_TOL
        with pytest.raises(LoRAFormatError, match="holds LoRA only.*comfy layout"):
            write_lora(read_lora(tmp_path / "a.safetensors"), tmp_path / "d.safetensors", "diffusers")


def test_mixed_with_lora_hooks_equal_merge_multipliers_and_patterns(tmp_path):
    from tests.test_lora import random_network

    dit = random_dit()
    x = inputs()
    lora, lokr, loha = (random_network(dit, seed=1), random_adapter(dit, CONFIGS["lokr"]),
                        random_adapter(dit, CONFIGS["loha"], include_patterns=["img_in"]))
    files = []
    for name, net in (("lora", lora), ("lokr", lokr), ("loha", loha)):
        net.save(tmp_path / f"{name}.safetensors")
        files.append(tmp_path / f"{name}.safetensors")
    expected = copy.deepcopy(dit)
    for net, mult in ((lora, 0.7), (lokr, -0.5), (loha, 1.2)):
        net.merge_into(expected, mult)
    merged, hooked = copy.deepcopy(dit), copy.deepcopy(dit)
    apply_loras(merged, files, [0.7, -0.5, 1.2])
    nets = apply_loras(hooked, files, [0.7, -0.5, 1.2], merge=False)
    assert rel_err(run(merged, x), run(expected, x)) < OUTPUT_TOL
    assert rel_err(run(hooked, x), run(merged, x)) < OUTPUT_TOL
    for n in nets:
        n.remove()
    assert torch.equal(run(hooked, x), run(dit, x))
    nets = apply_loras(copy.deepcopy(dit), files[1:], include_patterns=[r"single_blocks", "img_in"],
                       exclude_patterns=[r"linear2", None])
    assert [len(n.lora_modules) for n in nets] == [2, 1] and nets[0].network_type == "lokr"


def test_fp8_dit_merge_and_a_file_for_another_variant(tmp_path):
    dit = random_dit()
    quantize_linears(dit, dit_block_linear)
    net = random_adapter(dit, CONFIGS["lokr"])
    x = inputs()
    base = run(dit, x)
    net.apply_to(dit)
    hooked = run(dit, x)
    net.merge_into(dit)
    assert rel_err(run(dit, x), hooked) < 5e-3 < 2e-2 < rel_err(hooked, base)  # fp8 rounding once more
    h = 3072  # klein-4b's qkv: LoKr factors of a 9216 x 3072 weight
    tensors = {"lora_unet_double_blocks_0_img_attn_qkv.lokr_w1": torch.zeros(*factorization(3 * h)[:1],
                                                                             factorization(h)[0]),
               "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2": torch.zeros(factorization(3 * h)[1],
                                                                             factorization(h)[1])}
    save_file_atomic(tensors, tmp_path / "k4.safetensors")
    with pytest.raises(ValueError, match=r"does not fit the tiny DiT.*9216x3072.*looks made for flux_2_klein_4b"):
        apply_loras(random_dit(), [tmp_path / "k4.safetensors"])


def test_new_adapters_start_at_zero_and_train_with_loraplus_groups():
    dit = random_dit()
    x = inputs()
    base = run(dit, x)
    for name, options in CONFIGS.items():
        torch.manual_seed(0)
        net = create_network(dit, 4, 2.0, options=options)
        net.apply_to(dit)
        assert torch.equal(run(dit, x), base), name
        net.train()
        dit(*x).square().mean().backward()
        assert all(m.up_parameters()[0].grad.abs().sum() > 0 for m in net.lora_modules), name
        groups = param_groups(net, 1e-3, NetworkOptions(options.network_type, loraplus_lr_ratio=8.0,
                                                        single_lr=(5e-4, 5e-4)))
        by_scale = {g["lr_scale"]: g for g in groups}
        assert sorted(by_scale) == [0.5, 1.0, 4.0, 8.0] and by_scale[8.0]["lr"] == 8e-3
        ups = {id(m.up_parameters()[0]) for m in net.lora_modules if m.path.startswith("double")}
        assert {id(q) for q in by_scale[8.0]["params"]} == ups
        assert sum(len(g["params"]) for g in groups) == len([q for q in net.parameters() if q.requires_grad])
        net.remove()


def test_broken_lycoris_files_are_clear_errors(tmp_path):
    dit = random_dit()
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    for tensors, pattern in [
        ({f"{qkv}.lokr_w1": torch.zeros(16, 8), f"{qkv}.lokr_w2": torch.zeros(24, 16),
          f"{qkv}.lokr_w2_a": torch.zeros(24, 2)}, "needs either lokr_w2 or both"),
        ({f"{qkv}.lokr_w1": torch.zeros(16, 8), f"{qkv}.lokr_w2_a": torch.zeros(24, 2),
          f"{qkv}.lokr_w2_b": torch.zeros(3, 16)}, "different ranks"),
        ({f"{qkv}.hada_w1_a": torch.zeros(384, 2), f"{qkv}.hada_w1_b": torch.zeros(2, 128),
          f"{qkv}.hada_w2_a": torch.zeros(384, 2), f"{qkv}.hada_w2_b": torch.zeros(2, 64)}, "LoHa factors of shapes"),
        ({f"{qkv}.lokr_w1": torch.zeros(16, 8), f"{qkv}.lora_down.weight": torch.zeros(2, 128)}, "mixes LoRA and LoKr"),
        ({f"{qkv}.lokr_w1": torch.zeros(16, 8, 3, 3), f"{qkv}.lokr_w2": torch.zeros(24, 16)}, "non-empty matrix"),
        ({"transformer.transformer_blocks.0.attn.to_q.lokr_w1": torch.zeros(8, 8),
          "transformer.transformer_blocks.0.attn.to_q.lokr_w2": torch.zeros(16, 16)}, "piece of FLUX.2's"),
        ({"lycoris_transformer_blocks_0_attn_to_q.lokr_w1": torch.zeros(8, 8)}, "LyCORIS' own wrapper layout"),
    ]:
        save_file_atomic(tensors, tmp_path / "bad.safetensors")
        with pytest.raises(LoRAFormatError, match=pattern):
            apply_loras(dit, [tmp_path / "bad.safetensors"])
    # musubi-tuner's native LoKr adds a `lokr_factor` tensor outside any module: read and ignored.
    net = random_adapter(dit, CONFIGS["lokr"])
    save_file_atomic({**net.kohya_state_dict(), "lokr_factor": torch.tensor(-1)}, tmp_path / "musubi.safetensors")
    assert len(read_lora(tmp_path / "musubi.safetensors").modules) == len(net.lora_modules)
