"""`flux2 generate` with LoRAs: every layout gives our latent, merged == attached, fp8 merges before quantising,
--save_merged_model, --from_file, and the errors for a LoRA that does not fit."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from flux2.cli import main
from flux2.lora_formats import read_lora, to_kohya, write_lora
from tests.conftest import generate_args
from tests.datasets import copy_pipeline

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def lora(cached_pipeline, tmp_path_factory):
    """A LoRA trained on the shapes dataset (10 steps, high learning rate; alpha 4 of rank 8 so that the layouts
    that fold alpha into the weights really differ from ours), and its copies in the other layouts."""
    folder = tmp_path_factory.mktemp("lora") / "pipeline"
    params = copy_pipeline(cached_pipeline, folder) / "params.yaml"
    assert main(["train", "--params", str(params), "--max_train_steps", "10", "--learning_rate", "0.01",
                 "--network_alpha", "4", "--save_every_n_steps", "0"]) == 0
    ours = folder / "outputs" / "lora" / "lora.safetensors"
    canonical = read_lora(ours)
    files = {"ours": ours}
    for target in ("kohya", "comfy", "diffusers"):
        files[target] = folder / f"lora_{target}.safetensors"
        write_lora(canonical, files[target], target)
    # musubi-tuner's own kohya files: its metadata, alpha stored in the save dtype, and here half our alpha with
    # lora_up doubled (the same update, exactly: both factors are powers of two).
    musubi = {}
    for key, value in to_kohya(canonical).items():
        if key.endswith(".alpha"):
            value = (value / 2).to(torch.bfloat16)
        elif key.endswith(".lora_up.weight"):
            value = value * 2
        musubi[key] = value
    files["musubi"] = folder / "lora_musubi.safetensors"
    save_file(musubi, files["musubi"], {"ss_network_module": "networks.lora_flux_2", "ss_network_dim": "8",
                                        "ss_network_alpha": "2", "ss_base_model_version": "flux_2_tiny"})
    return files


def generate(tiny_model, out, *extra, prompt=("--prompt", PROMPT)):
    """Run `flux2 generate` for a 64x64 latent (seed 7, 4 steps, fp32, CPU); returns the latents by file name."""
    assert main(generate_args(tiny_model, out, *prompt, "--image_size", "64", "64", "--infer_steps", "4", "--seed",
                              "7", "--dtype", "float32", "--output_type", "latent", *extra)) == 0
    return {p.name: load_file(p)["latent"] for p in sorted(out.glob("*_latent.safetensors"))}


def one(latents):
    (latent,) = latents.values()
    return latent


@pytest.fixture(scope="module")
def reference(tiny_model, lora, tmp_path_factory):
    """Latents without a LoRA and with ours merged."""
    out = tmp_path_factory.mktemp("reference")
    return {"base": one(generate(tiny_model, out / "base")),
            "ours": one(generate(tiny_model, out / "ours", "--lora_weight", str(lora["ours"])))}


def test_lora_changes_the_image(reference):
    base, ours = reference["base"], reference["ours"]
    assert (ours - base).norm() / base.norm() > 1e-3


@pytest.mark.parametrize("layout", ["kohya", "musubi", "comfy", "diffusers"])
def test_every_layout_gives_our_latent(tiny_model, lora, reference, tmp_path, layout):
    latent = one(generate(tiny_model, tmp_path, "--lora_weight", str(lora[layout])))
    # comfy and diffusers fold sqrt(alpha / rank) into both factors: equal up to float rounding.
    torch.testing.assert_close(latent, reference["ours"], rtol=1e-5, atol=1e-5)


def test_merged_equals_attached(tiny_model, lora, reference, tmp_path):
    latent = one(generate(tiny_model, tmp_path, "--lora_weight", str(lora["ours"]), "--no-lora_merge"))
    torch.testing.assert_close(latent, reference["ours"], rtol=1e-5, atol=1e-5)


def test_two_loras_and_multipliers(tiny_model, lora, reference, tmp_path):
    # The same LoRA twice at 0.5 each is the LoRA once at 1.0 (merged per module in one sum).
    latent = one(generate(tiny_model, tmp_path, "--lora_weight", str(lora["ours"]), str(lora["comfy"]),
                          "--lora_multiplier", "0.5", "0.5"))
    torch.testing.assert_close(latent, reference["ours"], rtol=1e-5, atol=1e-5)


def test_include_patterns_equal_a_filtered_file(tiny_model, lora, tmp_path):
    canonical = read_lora(lora["ours"])
    canonical.modules = {k: v for k, v in canonical.modules.items() if k.startswith("double_blocks")}
    write_lora(canonical, tmp_path / "double_only.safetensors", "kohya")
    filtered = one(generate(tiny_model, tmp_path / "a", "--lora_weight", str(lora["ours"]), "--include_patterns",
                            r"^double_blocks\."))
    by_file = one(generate(tiny_model, tmp_path / "b", "--lora_weight", str(tmp_path / "double_only.safetensors")))
    torch.testing.assert_close(filtered, by_file, rtol=1e-5, atol=1e-5)


def test_save_merged_model_then_fp8_merges_before_quantising(tiny_model, lora, reference, tmp_path):
    merged = tmp_path / "merged_dit.safetensors"
    # Merging needs the DiT only: no --vae, no --text_encoder.
    assert main(["generate", "--model_version", "tiny", "--dit", str(tiny_model["dit"]), "--lora_weight",
                 str(lora["diffusers"]), "--save_merged_model", str(merged),
                 "--save_path", str(tmp_path / "none")]) == 0
    assert not (tmp_path / "none").exists()  # no inference
    assert load_file(merged)["img_in.weight"].dtype == torch.float32  # the base file's dtype
    files = dict(tiny_model, dit=merged)
    without_lora = one(generate(files, tmp_path / "merged"))
    torch.testing.assert_close(without_lora, reference["ours"], rtol=1e-5, atol=1e-5)

    # fp8_scaled with a LoRA: loaded unquantised, merged, then quantised - exactly what loading the merged fp32
    # file with fp8_scaled does (each weight rounded to fp8 once, never quantised, merged and re-quantised).
    fp8_lora = one(generate(tiny_model, tmp_path / "fp8_lora", "--lora_weight", str(lora["diffusers"]),
                            "--fp8_scaled"))
    fp8_merged_file = one(generate(files, tmp_path / "fp8_merged", "--fp8_scaled"))
    # (Bit-equality across two model instances is not promised by the CPU BLAS; the other order - quantise,
    # merge, re-quantise - moves this latent by 2e-3, far outside the tolerance.)
    torch.testing.assert_close(fp8_lora, fp8_merged_file, rtol=1e-5, atol=1e-5)
    assert (fp8_lora - reference["ours"]).abs().max() > 1e-4  # fp8 was in effect
    torch.testing.assert_close(fp8_lora, reference["ours"], rtol=0.1, atol=0.1)


def test_from_file_runs_every_prompt(tiny_model, lora, reference, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"# two prompts\n{PROMPT} --d 7\n\na green square on a yellow background --d 3 --w 32 --h 48\n")
    latents = generate(tiny_model, tmp_path / "out", "--lora_weight", str(lora["kohya"]),
                       prompt=("--from_file", str(prompts)))
    first, second = latents.values()
    assert list(latents)[0].endswith("_000_7_latent.safetensors")
    assert list(latents)[1].endswith("_001_3_latent.safetensors")
    torch.testing.assert_close(first, reference["ours"], rtol=1e-5, atol=1e-5)  # the LoRA merged once, not twice
    assert second.shape == (1, 128, 3, 2)


def bad_lora(path, module, down_shape, up_shape):
    name = "lora_unet_" + module.replace(".", "_")
    save_file({f"{name}.lora_down.weight": torch.zeros(down_shape), f"{name}.lora_up.weight": torch.zeros(up_shape),
               f"{name}.alpha": torch.tensor(1.0)}, path)
    return path


def generate_error(tiny_model, tmp_path, capsys, lora_path):
    assert main(generate_args(tiny_model, tmp_path / "out", "--prompt", PROMPT, "--image_size", "64", "64",
                              "--infer_steps", "1", "--lora_weight", str(lora_path))) == 2
    assert not (tmp_path / "out").exists()
    return capsys.readouterr().err


def test_lora_for_another_variant_is_a_clear_error(tiny_model, tmp_path, capsys):
    # klein-4b's double_blocks.0.img_attn.qkv is 9216x3072; the tiny DiT's is 384x128.
    path = bad_lora(tmp_path / "klein.safetensors", "double_blocks.0.img_attn.qkv", (1, 3072), (9216, 1))
    err = generate_error(tiny_model, tmp_path, capsys, path)
    assert "klein.safetensors does not fit the tiny DiT" in err
    assert "double_blocks.0.img_attn.qkv (model 384x128, LoRA 9216x3072)" in err
    assert "flux_2_klein_4b (klein-4b, klein-base-4b)" in err


def test_lora_matching_no_module_is_a_clear_error(tiny_model, tmp_path, capsys):
    # The tiny DiT has two single blocks; a LoRA for block 30 would otherwise change nothing.
    path = bad_lora(tmp_path / "deep.safetensors", "single_blocks.30.linear1", (1, 128), (1152, 1))
    err = generate_error(tiny_model, tmp_path, capsys, path)
    assert "match no module of the tiny DiT" in err
    assert "lora_unet_single_blocks_30_linear1" in err


def test_not_a_lora_fails_before_loading(tiny_model, tmp_path, capsys):
    err = generate_error(tiny_model, tmp_path, capsys, tiny_model["dit"])
    assert "not a FLUX.2 DiT LoRA in a known layout" in err


def test_generating_without_the_vae_or_text_encoder_is_one_line_naming_them(tiny_model, tmp_path, capsys):
    assert main(["generate", "--model_version", "tiny", "--dit", str(tiny_model["dit"]), "--prompt", PROMPT,
                 "--save_path", str(tmp_path)]) != 0
    assert "generate needs --vae and --text_encoder" in capsys.readouterr().err
