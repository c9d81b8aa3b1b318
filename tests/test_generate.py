"""`flux2 generate` end to end: the latent equals diffusers' Flux2KleinPipeline with the same noise and models."""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from flux2.autoencoder import unpatchify
from flux2.cli import main
from flux2.loading import load_ae
from flux2.variants import VARIANTS
from tests.conftest import generate_args
from tests.oracles.ae import load_oracle
from tests.oracles.dit import diffusers_transformer, dit_to_diffusers

TINY = VARIANTS["tiny"]
REL_TOL = 1e-4  # fp32


def diffusers_pipeline(files, distilled):
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    transformer = diffusers_transformer(TINY).eval()
    transformer.load_state_dict(dit_to_diffusers(load_file(files["dit"])))
    vae = load_oracle(load_file(files["vae"]), TINY.ae).eval()
    te_dir = str(files["text_encoder"])
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential", shift=3.0)
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, transformer=transformer,
                              text_encoder=Qwen3ForCausalLM.from_pretrained(te_dir, dtype=torch.float32).eval(),
                              tokenizer=AutoTokenizer.from_pretrained(te_dir), is_distilled=distilled)


def run_ours(files, out, model_version, extra=()):
    assert main(generate_args(files, out, "--prompt", "a red circle on a blue background", "--image_size", "64", "96",
                              "--infer_steps", "4", "--seed", "7", "--dtype", "float32", "--output_type",
                              "latent_images", *extra, model_version=model_version)) == 0
    (latent_file,) = out.glob("*_latent.safetensors")
    (png,) = out.glob("*.png")
    assert Image.open(png).size == (96, 64)
    return load_file(latent_file)["latent"]


def to_diffusers_space(latent, files):
    """Our normalised, patchified DiT-space latent -> diffusers' output_type='latent' (un-normalised, 32-ch)."""
    ae = load_ae(files["vae"], TINY, dtype=torch.float32)
    return unpatchify(ae.inv_normalize(latent))


@pytest.mark.parametrize("distilled", [False, True], ids=["base_cfg", "distilled"])
def test_generate_matches_diffusers_pipeline(tiny_model, tmp_path, distilled):
    import dataclasses

    # The tiny variant is a base model; a distilled twin differs only in its sampling mode.
    name = "tiny"
    if distilled:
        VARIANTS["tiny-distilled"] = dataclasses.replace(TINY, name="tiny-distilled", guidance_distilled=True)
        name = "tiny-distilled"
    try:
        ours = to_diffusers_space(run_ours(tiny_model, tmp_path / "ours", name, ["--guidance_scale", "4.0"]),
                                  tiny_model)
    finally:
        VARIANTS.pop("tiny-distilled", None)
    pipe = diffusers_pipeline(tiny_model, distilled)
    with torch.no_grad():
        theirs = pipe(prompt="a red circle on a blue background", height=64, width=96, num_inference_steps=4,
                      guidance_scale=4.0, generator=torch.Generator("cpu").manual_seed(7), output_type="latent",
                      max_sequence_length=TINY.max_text_tokens, text_encoder_out_layers=TINY.text_layers).images
    assert ours.shape == theirs.shape
    assert ((ours - theirs).norm() / theirs.norm()).item() < REL_TOL


def test_generate_with_reference_image_matches_diffusers(tiny_model, tmp_path):
    rng = np.random.default_rng(0)
    ref = Image.fromarray(rng.integers(0, 255, (64, 112, 3), dtype=np.uint8), "RGB")
    ref.save(tmp_path / "ref.png")
    ours = to_diffusers_space(run_ours(tiny_model, tmp_path / "ours", "tiny",
                                       ["--control_image_path", str(tmp_path / "ref.png")]), tiny_model)
    pipe = diffusers_pipeline(tiny_model, distilled=False)
    with torch.no_grad():
        theirs = pipe(image=[ref], prompt="a red circle on a blue background", height=64, width=96,
                      num_inference_steps=4, guidance_scale=4.0, generator=torch.Generator("cpu").manual_seed(7),
                      output_type="latent", max_sequence_length=TINY.max_text_tokens,
                      text_encoder_out_layers=TINY.text_layers).images
    assert ((ours - theirs).norm() / theirs.norm()).item() < REL_TOL


def test_too_small_reference_is_a_clear_error(tiny_model, tmp_path, capsys):
    Image.new("RGB", (32, 64)).save(tmp_path / "small.png")
    args = generate_args(tiny_model, tmp_path, "--prompt", "x", "--image_size", "64", "64", "--control_image_path",
                         str(tmp_path / "small.png"))
    assert main(args) == 2
    assert "small.png: reference image 32x64 must have both sides at least 64" in capsys.readouterr().err


def test_bad_image_size_is_a_clear_error(tiny_model, tmp_path, capsys):
    assert main(generate_args(tiny_model, tmp_path, "--prompt", "x", "--image_size", "100", "64")) == 2
    assert "nearest valid size is 96x64" in capsys.readouterr().err
