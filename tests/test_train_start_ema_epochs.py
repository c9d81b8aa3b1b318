"""Training from an existing LoRA (`train.network_weights`), the EMA of the LoRA weights (`train.ema_decay`),
epoch-based saving and sampling, and the per-variant sample defaults that training, evaluate and generate share."""
import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from flux2.cli import main
from flux2.ema import EMA
from flux2.params import ParamsError, parse_params
from flux2.safetensors_io import read_metadata
from flux2.variants import VARIANTS
from tests.datasets import copy_pipeline

# SGD at learning rate 0 leaves the weights exactly as they start: what a warm start loaded is what is saved.
FROZEN = ("--optimizer_type", "torch.optim.SGD", "--learning_rate", "0", "--max_train_steps", "1")


def train(pipeline: Path, *extra: str) -> dict:
    assert main(["train", "--params", str(pipeline / "params.yaml"), *extra]) == 0
    return json.loads((pipeline / "metrics" / "train.json").read_text())


def lora(pipeline: Path, name: str = "lora") -> dict[str, torch.Tensor]:
    return load_file(pipeline / "outputs" / "lora" / f"{name}.safetensors")


def mlflow_run(pipeline: Path, run_id: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{pipeline / 'mlflow.db'}").get_run(run_id)


def add_sample_prompts(pipeline: Path, line: str) -> None:
    (pipeline / "prompts.txt").write_text(line + "\n")
    params = pipeline / "params.yaml"
    params.write_text(params.read_text().replace("train:\n", "train:\n  sample_prompts: prompts.txt\n"))
    assert main(["cache-text", "--params", str(params)]) == 0  # the sample prompt joins the text cache


# ---------------------------------------------------------------------------------------------- EMA

def test_ema_follows_the_formula_and_swaps_in_and_out_exactly():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1, bias=False))
    net[0].bias.requires_grad_(False)  # frozen parameters are not averaged
    ema = EMA(net, decay=0.9)
    expected = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    assert set(ema.averages) == set(expected) and ema.nbytes == 4 * (6 + 2)
    for n_update in range(4):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        d = min(0.9, (1 + n_update) / (10 + n_update))
        ema.update(net)
        for name, p in net.named_parameters():
            if name in expected:
                expected[name] = d * expected[name] + (1 - d) * p.detach()
    assert all(torch.allclose(ema.averages[n], expected[n], atol=1e-6) for n in expected)
    trained = {n: p.detach().clone() for n, p in net.named_parameters()}
    with ema.applied(net):
        assert torch.equal(net[1].weight, ema.averages["1.weight"])
    assert all(torch.equal(p, trained[n]) for n, p in net.named_parameters())
    other = EMA(net, decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 4 and all(torch.equal(other.averages[n], ema.averages[n]) for n in expected)


def test_ema_is_saved_beside_the_lora_resumes_exactly_and_is_what_evaluate_scores(pipeline, tmp_path):
    other = copy_pipeline(pipeline, tmp_path / "other")
    run = ("--ema_decay", "0.9", "--save_every_n_steps", "4")
    summary = train(pipeline, *run, "--max_train_steps", "8")
    train(other, *run, "--max_train_steps", "4")
    assert [p.name for p in (other / "checkpoints").glob("*/step-00000004/ema.safetensors")] == ["ema.safetensors"]
    train(other, *run, "--max_train_steps", "8")  # resumes from step 4, the EMA with it
    raw, ema = lora(pipeline), lora(pipeline, "lora_ema")
    assert raw.keys() == ema.keys() and any(not torch.equal(raw[k], ema[k]) for k in raw if "lora_up" in k)
    for name in ("lora", "lora_ema"):
        a, b = lora(pipeline, name), lora(other, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    meta = read_metadata(pipeline / "outputs" / "lora" / "lora_ema.safetensors")
    assert meta["flux2.ema_decay"] == "0.9" and meta["ss_network_dim"] == "8" and meta["ss_steps"] == "8"
    assert summary["lora_ema"].endswith("lora_ema.safetensors")
    mlflow = mlflow_run(pipeline, summary["mlflow_run_id"])
    assert mlflow.data.params["train.ema_decay"] == "0.9"

    assert main(["evaluate", "--params", str(pipeline / "params.yaml"), "--infer_steps", "1", "--seeds", "0",
                 "--timesteps", "0.5", "--prompts"]) == 0
    assert json.loads((pipeline / "metrics" / "eval.json").read_text())["lora_weights"] == "ema"
    assert mlflow_run(pipeline, summary["mlflow_run_id"]).data.tags["flux2.eval_lora_weights"] == "ema"


# ---------------------------------------------------------------------------------------------- warm start

def test_warm_start_from_a_diffusers_file_is_a_new_tagged_run_starting_at_its_weights(pipeline, tmp_path, capsys):
    first = train(pipeline, "--save_every_n_steps", "5", "--max_train_steps", "10")
    trained = lora(pipeline)
    start = tmp_path / "start_diffusers.safetensors"
    assert main(["convert-lora", "--input", str(pipeline / "outputs" / "lora" / "lora.safetensors"),
                 "--output", str(start), "--target", "diffusers"]) == 0
    capsys.readouterr()

    second = train(pipeline, *FROZEN, "--network_weights", str(start))
    out = capsys.readouterr().out
    # The checkpoints of the first run are another configuration (the file's content is in the fingerprint): kept.
    assert "starting from step 0 (the checkpoints of other configurations" in out
    assert f"starting from {start} (diffusers layout, 20 modules, rank 8)" in out
    warm = lora(pipeline)
    assert warm.keys() == trained.keys() and all(torch.equal(warm[k], trained[k]) for k in warm)
    assert second["mlflow_run_id"] != first["mlflow_run_id"]
    sha = hashlib.sha256(start.read_bytes()).hexdigest()
    tags = mlflow_run(pipeline, second["mlflow_run_id"]).data.tags
    assert tags["flux2.warm_start"] == str(start) and tags["flux2.warm_start_sha256"] == sha
    assert read_metadata(pipeline / "outputs" / "lora" / "lora.safetensors")["flux2.warm_start_sha256"] == sha


def test_warm_start_errors_name_the_key(pipeline, tmp_path, capsys):
    params = str(pipeline / "params.yaml")
    assert main(["train", "--params", params, "--network_weights", "missing.safetensors"]) == 2
    assert "train.network_weights: missing.safetensors does not exist" in capsys.readouterr().err
    not_lora = tmp_path / "not_lora.safetensors"
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, not_lora)
    assert main(["train", "--params", params, "--network_weights", str(not_lora)]) == 2
    assert "train.network_weights: " in capsys.readouterr().err
    train(pipeline, "--save_every_n_steps", "0", "--max_train_steps", "1")
    start = tmp_path / "start.safetensors"
    (pipeline / "outputs" / "lora" / "lora.safetensors").rename(start)
    assert main(["train", "--params", params, *FROZEN, "--network_weights", str(start),
                 "--exclude_patterns", "single_blocks.*"]) == 2
    assert "exclude_patterns leave out: single_blocks." in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- epochs

def test_epoch_saving_and_sampling_with_the_variants_sample_defaults(pipeline):
    add_sample_prompts(pipeline, "a red circle on a blue background --d 3")  # no size, steps or guidance
    # 8 training items, batch 4: 2 steps per epoch, 3 epochs = 6 steps.
    summary = train(pipeline, "--max_train_steps", "null", "--max_train_epochs", "3", "--batch_size", "4",
                    "--save_every_n_steps", "0", "--save_every_n_epochs", "1", "--sample_every_n_epochs", "2",
                    "--ema_decay", "0.5")
    assert summary["steps"] == 6
    out = pipeline / "outputs" / "lora"
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "lora-000001.safetensors", "lora-000001_ema.safetensors", "lora-000002.safetensors",
        "lora-000002_ema.safetensors", "lora.safetensors", "lora_ema.safetensors"]
    assert read_metadata(out / "lora-000002.safetensors")["ss_epoch"] == "2"
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["lora_000004_00.png", "lora_000006_00.png"]
    with Image.open(out / "samples" / "lora_000006_00.png") as im:
        settings = json.loads(im.text["parameters"])
        assert im.size == (128, 128)  # the tiny variant's sample size
    assert settings["infer_steps"] == "20" and settings["guidance_scale"] == "4"


def test_sample_defaults_come_from_the_variant_table_for_generate_too():
    from flux2.generate import GenerateOptions, prompt_jobs

    want = {"dev": (1024, 1024, 50, 4.0), "klein-4b": (1024, 1024, 4, 1.0), "klein-base-4b": (1024, 1024, 50, 4.0),
            "klein-9b": (1024, 1024, 4, 1.0), "klein-base-9b": (1024, 1024, 50, 4.0), "tiny": (128, 128, 20, 4.0)}
    for name, variant in VARIANTS.items():
        s = variant.sample_settings()
        assert (s.height, s.width, s.steps, s.guidance) == want[name], name
        (job,) = prompt_jobs(GenerateOptions(name, "dit", None, None, prompt="x", seed=1), variant)
        assert (job.height, job.width, job.steps, job.guidance_scale) == want[name], name
    (job,) = prompt_jobs(GenerateOptions("tiny", "dit", None, None, prompt="x", seed=1, image_size=(64, 32),
                                         infer_steps=3, guidance_scale=2.0), VARIANTS["tiny"])
    assert (job.height, job.width, job.steps, job.guidance_scale) == (64, 32, 3, 2.0)


# ---------------------------------------------------------------------------------------------- options

def test_options_are_validated_by_key_and_listed_in_help(capsys):
    base = {"dataset": {"toml": "x.toml"}}
    for train, expected in (({"ema_decay": 1.0}, "train.ema_decay: must be in (0, 1)"),
                            ({"ema_decay": -0.5}, "train.ema_decay: must be in (0, 1)"),
                            ({"save_every_n_epochs": -1}, "train.save_every_n_epochs: must be 0 (off)"),
                            ({"sample_every_n_epochs": 2}, "train.sample_every_n_epochs: 2, but train.sample_prompts"),
                            ({"network_weights": 3}, "train.network_weights: expected str or null")):
        with pytest.raises(ParamsError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            parse_params({**base, "train": train})
    assert parse_params({**base, "train": {"ema_decay": 0}}).train.ema_decay == 0
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option, default in (("network_weights", "None"), ("ema_decay", "None"), ("save_every_n_epochs", "0"),
                            ("sample_every_n_epochs", "0")):
        help_of = text.split(f"--{option} {option.upper()} ", 1)[1].split(" --", 1)[0]  # its note, then default
        assert help_of.endswith(f"default: {default}"), (option, help_of)
