"""Training options of the seed: accumulation, epochs, optimizers, bf16, fp8 base, samples during training."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flux2.cli import main

SGD = ("--optimizer_type", "torch.optim.SGD", "--learning_rate", "0.5", "--save_every_n_steps", "0")


def train(pipeline: Path, *extra: str) -> dict:
    assert main(["train", "--params", str(pipeline / "params.yaml"), *extra]) == 0
    return json.loads((pipeline / "metrics" / "train.json").read_text())


def lora(pipeline: Path) -> dict[str, torch.Tensor]:
    return load_file(pipeline / "outputs" / "lora" / "lora.safetensors")


def copy_of(pipeline: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(pipeline, dst)
    (dst / "params.yaml").write_text((pipeline / "params.yaml").read_text().replace(str(pipeline), str(dst)))
    return dst


def test_gradient_accumulation_equals_the_larger_batch(pipeline, tmp_path):
    other = copy_of(pipeline, tmp_path / "other")
    train(pipeline, *SGD, "--max_train_steps", "2", "--batch_size", "2")
    train(other, *SGD, "--max_train_steps", "2", "--batch_size", "1", "--gradient_accumulation_steps", "2")
    a, b = lora(pipeline), lora(other)
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_epochs_set_the_number_of_steps(pipeline):
    # 8 training items, batch 2 -> 4 batches per epoch; 3 epochs with accumulation 2 -> 6 optimizer steps.
    summary = train(pipeline, *SGD, "--max_train_steps", "null", "--max_train_epochs", "3", "--batch_size", "2",
                    "--gradient_accumulation_steps", "2")
    assert summary["steps"] == 6


@pytest.mark.parametrize("optimizer", ["adamw8bit", "adafactor"])
def test_other_optimizers_train_and_resume_exactly(pipeline, tmp_path, optimizer):
    """Their state (bitsandbytes' nested quantisation state included) survives a checkpoint bit for bit."""
    other = copy_of(pipeline, tmp_path / "other")
    run = ("--optimizer_type", optimizer, "--save_every_n_steps", "2")
    assert train(pipeline, *run, "--max_train_steps", "4")["steps"] == 4
    train(other, *run, "--max_train_steps", "2")
    train(other, *run, "--max_train_steps", "4")
    a, b = lora(pipeline), lora(other)
    assert any(t.abs().sum() > 0 for k, t in a.items() if "lora_up" in k)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_mixed_precision_and_fp8_base(pipeline):
    summary = train(pipeline, "--mixed_precision", "bf16", "--fp8_base", "--fp8_scaled", "--max_train_steps", "3",
                    "--save_every_n_steps", "0")
    assert summary["steps"] == 3 and summary["final_loss"] == pytest.approx(summary["final_loss"])  # finite
    assert all(torch.isfinite(t).all() for t in lora(pipeline).values())


def test_samples_during_training_are_written_and_logged(pipeline):
    from mlflow.tracking import MlflowClient

    (pipeline / "prompts.txt").write_text("a red circle on a blue background --w 64 --h 64 --s 2 --d 3\n")
    params = pipeline / "params.yaml"
    params.write_text(params.read_text().replace("train:\n", "train:\n  sample_prompts: prompts.txt\n"))
    assert main(["cache-text", "--params", str(params)]) == 0  # the sample prompt joins the text cache
    summary = train(pipeline, "--max_train_steps", "4", "--sample_every_n_steps", "2", "--save_every_n_steps", "0")
    samples = sorted(p.name for p in (pipeline / "outputs" / "lora" / "samples").glob("*.png"))
    assert samples == ["lora_000002_00.png", "lora_000004_00.png"]
    client = MlflowClient(f"sqlite:///{pipeline / 'mlflow.db'}")
    logged = [a.path for a in client.list_artifacts(summary["mlflow_run_id"], "samples")]
    assert len(logged) == 2


def test_a_sample_prompt_missing_from_the_text_cache_is_a_clear_error(pipeline, capsys):
    (pipeline / "prompts.txt").write_text("a prompt nobody cached --s 1\n")
    assert main(["train", "--params", str(pipeline / "params.yaml"), "--max_train_steps", "2",
                 "--sample_prompts", "prompts.txt", "--sample_every_n_steps", "1"]) == 2
    assert "is not in cache/text: rerun cache_text" in capsys.readouterr().err
