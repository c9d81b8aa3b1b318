"""The seed's cache, training and generation commands (`../shared/seed/flux_2.md`) run as written on the embedded
default (assets/tiny + assets/dataset through a musubi dataset TOML), with only the paths replaced and
`python src/musubi_tuner/X.py` replaced by its flux2 equivalent: through `flux2` (training under
`accelerate launch`, as in the seed) and through the DVC stage modules. The README's musubi-tuner block is that
translation, so it cannot drift."""
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from flux2.cli import main
from flux2.ingest import read_manifest
from tests.conftest import readme_block

REPO = Path(__file__).resolve().parents[1]

# Copied from the seed, character for character.
SEED_COMMANDS = [
    """python src/musubi_tuner/flux_2_cache_latents.py \\
  --dataset_config path/to/toml \\
  --vae path/to/ae_model \\
  --model_version dev""",
    """python src/musubi_tuner/flux_2_cache_text_encoder_outputs.py \\
  --dataset_config path/to/toml \\
  --text_encoder path/to/text_encoder \\
  --batch_size 16 \\
  --model_version dev""",
    """accelerate launch --num_cpu_threads_per_process 1 --mixed_precision bf16 \\
  src/musubi_tuner/flux_2_train_network.py \\
  --model_version dev \\
  --dit path/to/dit_model \\
  --vae path/to/ae_model \\
  --text_encoder path/to/text_encoder \\
  --dataset_config path/to/toml \\
  --sdpa --mixed_precision bf16 \\
  --timestep_sampling flux2_shift --weighting_scheme none \\
  --optimizer_type adamw8bit --learning_rate 1e-4 --gradient_checkpointing \\
  --max_data_loader_n_workers 2 --persistent_data_loader_workers \\
  --network_module networks.lora_flux_2 --network_dim 32 \\
  --max_train_epochs 16 --save_every_n_epochs 1 --seed 42 \\
  --output_dir path/to/output_dir --output_name name-of-lora""",
    """python src/musubi_tuner/flux_2_generate_image.py \\
  --model_version dev \\
  --dit path/to/dit_model \\
  --vae path/to/ae_model \\
  --text_encoder path/to/text_encoder \\
  --control_image_path path/to/control_image.jpg \\
  --prompt "A cat" \\
  --image_size 1024 1024 --infer_steps 50 \\
  --fp8_scaled \\
  --save_path path/to/save/dir --output_type images \\
  --seed 1234 --lora_multiplier 1.0 --lora_weight path/to/lora.safetensors""",
]
SCRIPTS = {"python src/musubi_tuner/flux_2_cache_latents.py": "flux2 cache-latents",
           "python src/musubi_tuner/flux_2_cache_text_encoder_outputs.py": "flux2 cache-text",
           "src/musubi_tuner/flux_2_train_network.py": "-m flux2.cli train",
           "python src/musubi_tuner/flux_2_generate_image.py": "flux2 generate"}

TOML = """\
[general]
resolution = 64
enable_bucket = true
caption_extension = ".txt"
batch_size = 8

[[datasets]]
image_directory = "{repo}/assets/dataset/images"

[[datasets]]
image_directory = "{repo}/assets/dataset/edits"
control_directory = "{repo}/assets/dataset/controls"
no_resize_control = true
control_resolution = [2024, 2024]
"""


def words(command: str) -> list[str]:
    return shlex.split(command.replace("\\\n", " "))


def translate(command: str) -> list[str]:
    for script, ours in SCRIPTS.items():
        command = command.replace(script, ours)
    return words(command)


def with_paths(argv: list[str], paths: dict[str, str]) -> list[str]:
    """The paths replaced, the embedded default's variant for dev, and (generation only, for CPU time) 128 px
    and 4 steps for 1024 px and 50 steps: 50 steps at 1024^2 take minutes on a CPU even for the tiny DiT."""
    out = [paths.get(a, a) for a in argv]
    cpu = {"--model_version": {"dev": "tiny"}, "--image_size": {"1024": "128"}, "--infer_steps": {"50": "4"}}
    for i in range(1, len(out)):
        option = out[i - 1] if out[i - 1].startswith("--") else out[i - 2]
        out[i] = cpu.get(option, {}).get(out[i], out[i])
    return out


def readme_musubi_commands() -> list[list[str]]:
    """The commands of the README's block under "Coming from musubi-tuner"."""
    block = readme_block("Coming from musubi-tuner")
    return [words(c) for c in re.split(r"\n(?=\S)", block.strip()) if not c.startswith("#")]


def test_the_readme_block_is_the_seed_commands_translated():
    assert readme_musubi_commands() == [translate(c) for c in SEED_COMMANDS]


def run_flux2(argv: list[str]) -> None:
    assert argv[0] == "flux2"
    assert main(argv[1:]) == 0, argv


def run_stage(module: str, argv: list[str], monkeypatch) -> None:
    """`python -m stages.X ARGS` in this process (what DVC runs, with the seed's options)."""
    monkeypatch.setattr(sys, "argv", [module, *argv])
    with pytest.raises(SystemExit) as e:
        runpy.run_module(module, run_name="__main__")
    assert e.value.code == 0, module


def batches_per_epoch(manifest: Path, batch_size: int) -> int:
    groups: dict[tuple, int] = {}
    for r in read_manifest(manifest):
        if r["split"] == "train":
            key = (r["bucket_width"], r["bucket_height"], tuple((c["bucket_width"], c["bucket_height"])
                                                               for c in r["controls"]))
            groups[key] = groups.get(key, 0) + r["num_repeats"]
    return sum(-(-n // batch_size) for n in groups.values())


@pytest.mark.slow
def test_seed_commands_run_as_written_through_flux2_and_through_the_stages(tmp_path, monkeypatch, capsys):
    tiny = REPO / "assets" / "tiny"
    (tmp_path / "dataset.toml").write_text(TOML.format(repo=REPO))
    paths = {"path/to/toml": "dataset.toml", "path/to/ae_model": str(tiny / "ae.safetensors"),
             "path/to/dit_model": str(tiny / "dit.safetensors"), "path/to/text_encoder": str(tiny / "text_encoder"),
             "path/to/output_dir": "out", "path/to/lora.safetensors": "out/name-of-lora.safetensors",
             "path/to/control_image.jpg": str(REPO / "assets/dataset/controls/edit_00.png"),
             "path/to/save/dir": "images"}
    cache_latents, cache_text, train, generate = (with_paths(translate(c), paths) for c in SEED_COMMANDS)
    monkeypatch.chdir(tmp_path)

    run_flux2(cache_latents)
    run_flux2(cache_text)
    capsys.readouterr()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "MLFLOW_TRACKING"))}
    env.update(PYTHONPATH=str(REPO), HF_HOME=str(tmp_path / "hf"), FLUX2_DEBUG="")
    out = subprocess.run([str(Path(sys.executable).parent / "accelerate"), *train[1:]], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # The options that mean nothing here are named once.
    assert out.stdout.count("note: ignoring --sdpa, --max_data_loader_n_workers, --persistent_data_loader_workers"
                            ": they mean nothing here") == 1
    summary = json.loads((tmp_path / "metrics/train.json").read_text())
    per_epoch = batches_per_epoch(tmp_path / "data/manifest.parquet", 8)  # the TOML's batch_size, honoured
    assert summary["steps"] == 16 * per_epoch
    lora = tmp_path / "out/name-of-lora.safetensors"
    # --save_every_n_epochs 1: a LoRA after every epoch but the last, named as musubi-tuner names them.
    assert sorted(p.name for p in (tmp_path / "out").glob("name-of-lora-*.safetensors")) == [
        f"name-of-lora-{e:06d}.safetensors" for e in range(1, 16)]
    with safe_open(str(lora), "pt") as f:
        down = [k for k in f.keys() if k.endswith("lora_down.weight")]
        assert f.get_slice(down[0]).get_shape()[0] == 32  # --network_dim 32

    run_flux2(generate)
    assert len(list((tmp_path / "images").glob("*.png"))) == 1

    # The same commands through the stage modules (params.yaml beside them; the command line overrides it).
    (tmp_path / "params.yaml").write_text(
        f"model: {{model_version: tiny, dit: {tiny / 'dit.safetensors'}, vae: {tiny / 'ae.safetensors'}, "
        f"text_encoder: {tiny / 'text_encoder'}}}\ndataset: {{toml: dataset.toml}}\n"
        f"tracking: {{tracking_uri: 'sqlite:///{tmp_path / 'mlflow.db'}'}}\n")
    run_stage("stages.cache_latents", cache_latents[2:], monkeypatch)
    run_stage("stages.cache_text", cache_text[2:], monkeypatch)
    printed = capsys.readouterr().out
    assert "cache_latents: encoded 0" in printed and "cache_text: encoded 0" in printed  # all reused
    one_epoch = [("1" if train[i - 1] == "--max_train_epochs" else a) for i, a in enumerate(train)]
    stage_args = one_epoch[one_epoch.index("train") + 1:] + ["--output_dir", "out_stage", "--checkpoint_dir", "ck"]
    run_stage("stages.train", stage_args, monkeypatch)
    assert json.loads((tmp_path / "metrics/train.json").read_text())["steps"] == per_epoch
    assert (tmp_path / "out_stage/name-of-lora.safetensors").is_file()
