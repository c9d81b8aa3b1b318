"""The LoRA network on the tiny DiT: targets, hooks == merged weights, fp8, files, errors, diffusers interop."""
import copy
import logging
import os

import pytest
import torch

from flux2.fp8 import Fp8Linear, dit_block_linear, quantize_linears
from flux2.lora import LoRAModule, LoRANetwork, apply_loras, create_network, target_modules
from flux2.lora_formats import LoRAFormatError, diffusers_names, read_lora, write_lora
from flux2.model import Flux2Transformer
from flux2.safetensors_io import load_file, read_metadata, save_file_atomic
from flux2.variants import VARIANTS
from tests.conftest import dit_inputs, random_dit, rel_err

TINY = VARIANTS["tiny"]
EXTRA = ["img_in", "txt_in", "final_layer.linear", "time_in.in_layer"]  # outside the blocks, mapped everywhere


def random_network(dit, rank=4, alpha=2.0, seed=1, **kwargs) -> LoRANetwork:
    """A network whose up matrices are non-zero, so applying it really changes the output."""
    torch.manual_seed(seed)
    net = create_network(dit, rank, alpha, **kwargs)
    with torch.no_grad():
        for m in net.lora_modules:
            m.lora_up.weight.normal_(0, 0.5)
    return net


def inputs():
    """The DiT inputs of the LoRA tests: two items, six text tokens."""
    return dit_inputs(batch=2, txt=6)


@torch.no_grad()
def run(dit, x):
    return dit(*x)


# ------------------------------------------------------------------------------------------------ targets

@pytest.mark.parametrize("name,count", [("klein-4b", 80), ("klein-base-9b", 112), ("dev", 160), ("tiny", 20)])
def test_default_targets_per_variant(name, count):
    with torch.device("meta"):
        dit = Flux2Transformer(VARIANTS[name])
    net = create_network(dit, rank=1)
    assert len(net.lora_modules) == count
    assert all(m.path.startswith(("double_blocks.", "single_blocks.")) for m in net.lora_modules)
    assert {type(dit.get_submodule(m.path)) for m in net.lora_modules} == {torch.nn.Linear}


def test_include_exclude_rules():
    dit = random_dit()
    paths = lambda **kw: list(target_modules(dit, **kw))  # noqa: E731
    assert len(paths(exclude_patterns=[r"single_blocks\..*"])) == 16
    # Exclude all, include some: only those.
    assert paths(exclude_patterns=[".*"], include_patterns=[r"single_blocks\.\d+\.linear1"]) == [
        "single_blocks.0.linear1", "single_blocks.1.linear1"]
    # An include alone adds modules outside the blocks.
    assert set(paths(include_patterns=EXTRA)) - set(paths()) == set(EXTRA)
    # Include overrides exclude.
    kept = paths(exclude_patterns=[r"double_blocks\..*"], include_patterns=[r"double_blocks\.0\.img_attn\.qkv"])
    assert kept[0] == "double_blocks.0.img_attn.qkv" and len(kept) == 1 + 4
    # Everything that is a Linear, and never a norm.
    everything = paths(include_patterns=[".*"])
    assert len(everything) == 20 + 9 and not any("norm" in p for p in everything)
    for bad in ([r"double_blocks\.0\.img_attn_qkv"], [r".*norm.*"]):  # typo; norms are not Linears
        with pytest.raises(ValueError, match="matches no Linear"):
            paths(include_patterns=bad)
    with pytest.raises(ValueError, match=r"train\.exclude_patterns '\(' is not a valid regular expression"):
        paths(exclude_patterns=["("])
    with pytest.raises(ValueError, match="leave no module"):
        paths(exclude_patterns=[".*"])


def test_new_network_is_identity_and_trainable():
    dit = random_dit()
    x = inputs()
    base = run(dit, x)
    torch.manual_seed(0)
    net = create_network(dit, rank=4)  # alpha 1 by default: scale 1/4
    assert all(m.scale == 0.25 and torch.count_nonzero(m.lora_up.weight) == 0 for m in net.lora_modules)
    net.apply_to(dit)
    assert torch.equal(run(dit, x), base)
    net.train()
    dit(*x).square().mean().backward()
    assert all(m.lora_up.weight.grad is not None and m.lora_up.weight.grad.abs().sum() > 0 for m in net.lora_modules)
    assert not any(p.grad is not None for p in dit.parameters() if not p.requires_grad)


@pytest.mark.parametrize("kind", ["lora", "lokr", "loha"])
def test_dropouts_only_in_training(kind):
    from flux2.lycoris import LoHaModule, LoKrModule

    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8, bias=False)
    x = torch.randn(4, 5, 16)
    plain = base(x).detach()
    dropouts = dict(rank_dropout=0.5, module_dropout=0.5)
    lora = {"lora": lambda: LoRAModule("img_in", 16, 8, rank=4, alpha=4.0, dropout=0.3, **dropouts),
            "lokr": lambda: LoKrModule("img_in", 16, 8, rank=1, alpha=1.0, **dropouts),
            "loha": lambda: LoHaModule("img_in", 16, 8, rank=2, alpha=2.0, **dropouts)}[kind]()
    torch.nn.init.normal_(lora.up_parameters()[0])  # non-zero, so the update shows (LoKr/LoHa: output channels)
    lora.attach(base)
    lora.eval()
    full = base(x).detach()
    assert torch.equal(base(x), full) and not torch.allclose(full, plain)
    lora.train()
    outs = [base(x).detach() for _ in range(200)]
    skipped = sum(torch.equal(o, plain) for o in outs)
    assert 70 < skipped < 130  # module dropout 0.5: the whole update skipped about half the time
    assert not any(torch.equal(o, full) for o in outs)  # the rest have dropped channels
    lora.remove()
    assert torch.equal(base(x), plain)


# ------------------------------------------------------------------------------------------------ apply

def test_hooks_equal_merged_weights_and_remove_restores():
    dit = random_dit()
    keys = list(dit.state_dict())
    net = random_network(dit, include_patterns=EXTRA)
    x = inputs()
    base = run(dit, x)
    net.apply_to(dit)
    assert list(dit.state_dict()) == keys  # hooks leave the DiT's keys alone
    hooked = run(dit, x)
    assert rel_err(hooked, base) > 1e-2  # not vacuous
    net.remove()
    assert torch.equal(run(dit, x), base)
    merged = copy.deepcopy(dit)
    net.merge_into(merged)
    assert rel_err(run(merged, x), hooked) < 1e-5
    # The multiplier scales the update: hooks at 0.5 == merge at 0.5; 0 is the base model.
    net.set_multiplier(0.5)
    net.apply_to(dit)
    half = run(dit, x)
    net.set_multiplier(0.0)
    assert torch.equal(run(dit, x), base)
    net.remove()
    merged_half = copy.deepcopy(dit)
    net.merge_into(merged_half, multiplier=0.5)
    assert rel_err(run(merged_half, x), half) < 1e-5


def test_bf16_base_with_fp32_lora():
    dit = random_dit()
    net = random_network(dit)
    x = inputs()
    net.apply_to(dit)
    reference = run(dit, x)
    net.remove()
    dit_bf16 = copy.deepcopy(dit).to(torch.bfloat16)
    net.apply_to(dit_bf16)
    out = run(dit_bf16, x)
    assert out.dtype == torch.bfloat16 and rel_err(out.float(), reference) < 3e-2


@pytest.mark.parametrize("network_type", ["lora", "lokr", "loha"])
def test_adapters_under_autocast_make_no_float32_copy_of_their_input(network_type):
    """Under bf16 autocast an adapter's products run in bf16 whatever its weights' dtype, so it computes on the
    bf16 input as it is: the same update, bit for bit, as casting the input to float32 first (which autocast
    casts back), without the float32 copy of every adapted Linear's input."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from flux2.network_config import NetworkOptions

    network = create_network(random_dit(), 4, 4, options=NetworkOptions(network_type=network_type, factor=4))
    module = network.lora_modules[0]
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(2, 16, module.in_features, dtype=torch.bfloat16)

    class Float32Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == x.shape:
                self.shapes.append(func)
            return out

    with torch.autocast("cpu", dtype=torch.bfloat16):
        with Float32Copies() as copies:
            update = module(x)
        expected = module(x.float())  # what the adapters computed before: the input cast to float32 first
    assert copies.shapes == [] and update.dtype == torch.bfloat16
    assert torch.equal(update, expected)
    assert module(x).dtype == torch.float32  # without autocast: in the adapter's dtype, as before


def test_fp8_dit_merged_close_to_hooked():
    dit = random_dit()
    quantize_linears(dit, dit_block_linear)
    keys = list(dit.state_dict())
    net = random_network(dit)
    assert {type(dit.get_submodule(m.path)) for m in net.lora_modules} == {Fp8Linear}
    x = inputs()
    base = run(dit, x)
    net.apply_to(dit)
    hooked = run(dit, x)
    assert list(dit.state_dict()) == keys
    net.remove()
    assert torch.equal(run(dit, x), base)
    net.merge_into(dit)
    assert list(dit.state_dict()) == keys and dit.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    # Re-quantising the merged weight adds fp8 rounding (e4m3: 3 mantissa bits), small against the update.
    assert rel_err(run(dit, x), hooked) < 5e-3 < 2e-2 < rel_err(hooked, base)


def test_apply_loras_merge_equals_hooks_with_filters(tmp_path):
    dit = random_dit()
    x = inputs()
    first, second = random_network(dit, seed=1), random_network(dit, rank=2, seed=2, include_patterns=EXTRA)
    first.save(tmp_path / "a.safetensors")
    second.save(tmp_path / "b.safetensors")
    write_lora(read_lora(tmp_path / "b.safetensors"), tmp_path / "b_diffusers.safetensors", "diffusers")
    files = [tmp_path / "a.safetensors", tmp_path / "b_diffusers.safetensors"]

    # Reference: the networks themselves, the first filtered to its single blocks.
    expected = copy.deepcopy(dit)
    for m in first.lora_modules:
        if not m.path.startswith("single_blocks."):
            m.lora_up.weight.data.zero_()
    first.merge_into(expected, 0.7)
    second.merge_into(expected, -0.5)

    merged = copy.deepcopy(dit)
    nets = apply_loras(merged, files, [0.7, -0.5], include_patterns=["single_blocks", None])
    assert [len(n.lora_modules) for n in nets] == [4, 24]
    hooked = copy.deepcopy(dit)
    nets = apply_loras(hooked, files, [0.7, -0.5], include_patterns=["lora_unet_single", None], merge=False)
    assert rel_err(run(merged, x), run(expected, x)) < 1e-5
    assert rel_err(run(hooked, x), run(merged, x)) < 1e-5
    for n in nets:
        n.remove()
    assert torch.equal(run(hooked, x), run(dit, x))
    # Exclude drops modules; per-file lists must match the file count.
    nets = apply_loras(copy.deepcopy(dit), files[:1], 1.0, exclude_patterns=r"img_attn\.qkv")
    assert len(nets[0].lora_modules) == 20 - 2
    with pytest.raises(ValueError, match="2 multipliers for 1 LoRA files"):
        apply_loras(dit, files[:1], [1.0, 1.0])
    with pytest.raises(ValueError, match="leave none"):
        apply_loras(dit, files[:1], include_patterns="no_such_module")


# ------------------------------------------------------------------------------------------------ files

def test_save_metadata_and_resume(tmp_path):
    dit = random_dit()
    net = random_network(dit, rank=4, alpha=2.0)
    path = tmp_path / "lora.safetensors"
    net.save(path, {"ss_learning_rate": "0.0001", "flux2.commit": "abc", "ss_network_dim": "999"})
    tensors = load_file(path)
    assert len(tensors) == 20 * 3
    assert tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (4, 128)
    assert tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape == (3 * 128, 4)
    alpha = tensors["lora_unet_single_blocks_1_linear2.alpha"]
    assert alpha.shape == () and alpha.dtype == torch.float32 and alpha.item() == 2.0
    meta = read_metadata(path)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"  # the network's own keys win
    assert meta["ss_learning_rate"] == "0.0001" and meta["flux2.commit"] == "abc"
    assert meta["ss_base_model_version"] == "flux_2_tiny"
    assert meta["modelspec.architecture"] == "Flux.2-tiny/lora" and meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.implementation"] == "https://github.com/black-forest-labs/flux2"
    assert meta["ss_network_module"]

    resumed = create_network(dit, rank=4, alpha=2.0)
    resumed.load_weights(path)
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), net.state_dict().values()))
    with pytest.raises(ValueError, match="another rank or variant"):
        create_network(dit, rank=8, alpha=2.0).load_weights(path)
    with pytest.raises(ValueError, match="another network_alpha"):
        create_network(dit, rank=4, alpha=1.0).load_weights(path)
    with pytest.raises(ValueError, match="it lacks 3 tensors.*lora_unet_img_in.*include/exclude"):
        create_network(dit, rank=4, alpha=2.0, include_patterns=["img_in"]).load_weights(path)
    with pytest.raises(ValueError, match="strings to strings"):
        net.save(tmp_path / "x.safetensors", {"ss_steps": 10})


@pytest.mark.parametrize("arch,expected", [("klein-base-4b", "Flux.2-klein-4b/lora"),
                                           ("klein-9b", "Flux.2-klein-9b/lora"), ("dev", "Flux.2-dev/lora")])
def test_architecture_names(arch, expected):
    with torch.device("meta"):
        dit = Flux2Transformer(VARIANTS[arch])
    meta = create_network(dit, rank=1, include_patterns=[], exclude_patterns=[r"single_blocks.*"]).file_metadata()
    assert meta["modelspec.architecture"] == expected and meta["ss_base_model_version"] == VARIANTS[arch].arch


def test_non_finite_save_is_refused(tmp_path):
    net = random_network(random_dit())
    net.lora_modules[3].lora_up.weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="refusing to write.*NaN or inf.*lora_unet_double_blocks_0_img_mlp_2"):
        net.save(tmp_path / "lora.safetensors")
    assert os.listdir(tmp_path) == []
    lora = read_lora_from_network(net)
    with pytest.raises(ValueError, match="NaN or inf"):
        write_lora(lora, tmp_path / "comfy.safetensors", "comfy")
    assert os.listdir(tmp_path) == []


def read_lora_from_network(net):
    from flux2.lora_formats import lora_from_state_dict

    return lora_from_state_dict(net.kohya_state_dict())


# ------------------------------------------------------------------------------------------------ errors

def test_lora_with_modules_the_dit_lacks(tmp_path):
    dit = random_dit()
    net = random_network(dit)
    tensors = net.kohya_state_dict()
    for i in range(2, 14):  # blocks the tiny DiT does not have
        for suffix, t in [(".lora_down.weight", torch.ones(4, 128)), (".lora_up.weight", torch.ones(128, 4))]:
            tensors[f"lora_unet_double_blocks_{i}_img_attn_proj{suffix}"] = t
    save_file_atomic(tensors, tmp_path / "lora.safetensors")
    with pytest.raises(ValueError) as e:
        apply_loras(dit, [tmp_path / "lora.safetensors"])
    message = str(e.value)
    assert str(tmp_path / "lora.safetensors") in message and "12 of its 32 LoRA modules match no module" in message
    assert "lora_unet_double_blocks_2_img_attn_proj" in message and "(and 2 more)" in message


def test_lora_for_another_variant(tmp_path):
    dit = random_dit()
    h = VARIANTS["klein-4b"].hidden_size
    tensors = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, h),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(3 * h, 4),
               "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(4.0)}
    save_file_atomic(tensors, tmp_path / "k4.safetensors", {"ss_base_model_version": "flux_2_klein_4b"})
    before = copy.deepcopy(dit.state_dict())
    with pytest.raises(ValueError, match=r"does not fit the tiny DiT.*9216x3072.*looks made for flux_2_klein_4b "
                                         r"\(klein-4b, klein-base-4b\).*metadata says.*flux_2_klein_4b"):
        apply_loras(dit, [tmp_path / "k4.safetensors"])
    assert all(torch.equal(before[k], v) for k, v in dit.state_dict().items())  # nothing applied


def test_unknown_and_unsupported_layouts(tmp_path):
    dit = random_dit()
    for tensors, pattern in [
        ({"foo.weight": torch.zeros(2, 2)}, "not a FLUX.2 DiT LoRA in a known layout.*foo.weight"),
        ({"lora_unet_double_blocks_0_img_attn_qkv.lokr_w1": torch.zeros(2, 2)}, "needs either lokr_w2 or both"),
        ({"lora_unet_double_blocks_0_img_attn_qkv.hada_w1_a": torch.zeros(2, 2)}, "lacks hada_w1_b.*incomplete"),
        ({"lora_unet_double_blocks_0_img_attn_qkv.lokr_t2": torch.zeros(2, 2, 3, 3)}, "Tucker.*not support"),
        ({"lora_unet_img_in.dora_scale": torch.zeros(2, 1)}, "DoRA.*not support"),
        ({"lora_unet_input_blocks_0_proj.lora_down.weight": torch.zeros(2, 2)}, "Stable Diffusion LoRA"),
        ({"lora_unet_double_blocks_0_img_mod_lin.lora_down.weight": torch.zeros(2, 2)}, "FLUX.1 LoRA"),
    ]:
        save_file_atomic(tensors, tmp_path / "bad.safetensors")
        with pytest.raises(LoRAFormatError, match=pattern):
            apply_loras(dit, [tmp_path / "bad.safetensors"])


# ------------------------------------------------------------------------------------------------ diffusers oracle

def diffusers_forward(model, x):
    xx, x_ids, t, ctx, ctx_ids = x
    with torch.no_grad():
        return model(hidden_states=xx, encoder_hidden_states=ctx, timestep=t, img_ids=x_ids, txt_ids=ctx_ids,
                     return_dict=False)[0]


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("target", ["kohya", "diffusers"])
def test_diffusers_loads_our_files(tmp_path, target):
    from diffusers import Flux2KleinPipeline
    from diffusers.utils import logging as diffusers_logging
    from tests.oracles.dit import diffusers_transformer, dit_to_diffusers

    dit = random_dit()
    # diffusers' kohya reader maps the embedders and final linear but not the modulations; its own layout
    # takes them all (the adaLN one with its halves swapped).
    extra = EXTRA + (["double_stream_modulation_img.lin", "final_layer.adaLN_modulation.1"]
                     if target == "diffusers" else [])
    net = random_network(dit, rank=4, alpha=2.0, include_patterns=extra)
    path = tmp_path / "lora.safetensors"
    net.save(path)
    if target == "diffusers":
        write_lora(read_lora(path), path, "diffusers")
        assert read_metadata(path)["format"] == "pt"
    x = inputs()
    merged = copy.deepcopy(dit)
    net.merge_into(merged)
    expected = run(merged, x)

    theirs = diffusers_transformer(TINY).eval()
    theirs.load_state_dict(dit_to_diffusers(dit.state_dict()), strict=True)
    records = Records()
    diffusers_logging.get_logger("diffusers").addHandler(records)
    try:
        state_dict = Flux2KleinPipeline.lora_state_dict(str(path))
        theirs.load_lora_adapter(state_dict, prefix="transformer")
    finally:
        diffusers_logging.get_logger("diffusers").removeHandler(records)
    assert not [m for m in records.messages if "key" in m.lower()], records.messages  # no missing/unexpected keys
    adapted = {name for name, module in theirs.named_modules() if hasattr(module, "lora_A") and module.lora_A}
    assert adapted == {n for m in net.lora_modules for n in diffusers_names(m.path)}
    assert rel_err(diffusers_forward(theirs, x), expected) < 1e-4
