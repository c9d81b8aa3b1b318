"""Non-finite loss or gradients, made for real (no mocks): a latents cache entry full of inf, written with the
cache's own writer, and a learning rate that makes training diverge. A bad step is skipped and counted (MLflow
`bad_steps`) and never reaches the EMA; `train.max_bad_steps` bad steps in a row stop the run with a message
naming the step and the likely causes; a LoRA (or checkpoint) holding a non-finite value is never written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from flux2.cache_latents import read_item_map
from flux2.cache_store import CacheReader, ShardWriter, read_index, write_index
from flux2.cli import main
from flux2.ema import UPDATES_KEY
from flux2.train import TrainingError


def poison_latents(pipeline: Path, only_first: bool) -> int:
    """Replace train items' latents by inf tensors: a new shard from the cache's ShardWriter, and the index
    pointing those keys at it. Returns how many entries were replaced."""
    cache_dir = pipeline / "cache/latents"
    rows, meta = read_index(cache_dir)
    keys = sorted(v.latent_key for v in read_item_map(cache_dir).values() if v.split == "train")
    keys = keys[:1] if only_first else keys
    reader = CacheReader(cache_dir)
    writer = ShardWriter(cache_dir, meta, shard_mb=1, prefix="latents-poison")
    for key in keys:
        writer.add(key, torch.full_like(reader.get(key), float("inf")))
    new = {r["key"]: r for r in writer.rows()}
    write_index(cache_dir, [new.get(r["key"], r) for r in rows], meta)
    assert torch.isinf(CacheReader(cache_dir).get(keys[0])).all()  # the cache serves it, checksum and all
    return len(keys)


def mlflow_metric(pipeline: Path, run_id: str, name: str) -> list[tuple[int, float]]:
    client = MlflowClient(f"sqlite:///{pipeline / 'mlflow.db'}")
    return [(m.step, m.value) for m in client.get_metric_history(run_id, name)]


def latest_run_id(pipeline: Path) -> str:
    client = MlflowClient(f"sqlite:///{pipeline / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "flux2"]
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])[0].info.run_id


def test_an_inf_latent_makes_skipped_counted_steps_and_a_finite_lora(pipeline):
    poison_latents(pipeline, only_first=True)
    assert main(["train", "--params", str(pipeline / "params.yaml"), "--max_train_steps", "16",
                 "--ema_decay", "0.9"]) == 0
    summary = json.loads((pipeline / "metrics/train.json").read_text())
    # 8 train items at batch 1: the poisoned one comes once per epoch, two epochs in 16 steps.
    assert summary["steps"] == 16 and summary["bad_steps"] == 2
    bad = mlflow_metric(pipeline, summary["mlflow_run_id"], "bad_steps")
    assert [v for _, v in bad] == [1.0, 2.0]
    assert len(mlflow_metric(pipeline, summary["mlflow_run_id"], "loss")) == 14  # logged for good steps only
    for name in ("lora", "lora_ema"):
        assert all(torch.isfinite(t).all() for t in load_file(pipeline / f"outputs/lora/{name}.safetensors").values())
    (ema,) = pipeline.glob("checkpoints/*/step-00000016/ema.safetensors")
    assert int(load_file(ema)[UPDATES_KEY]) == 14  # the skipped steps never reached the EMA


def test_only_bad_steps_stop_the_run_naming_the_step_and_no_lora_is_written(pipeline, capsys):
    poison_latents(pipeline, only_first=False)
    assert main(["train", "--params", str(pipeline / "params.yaml"), "--max_train_steps", "16",
                 "--max_bad_steps", "3"]) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: step 2: 3 steps in a row had a non-finite loss or gradient")
    assert "learning_rate too high" in message and "corrupted cache entry" in message
    assert "checkpoints" in message  # where the last good checkpoint would be
    assert not (pipeline / "outputs/lora/lora.safetensors").exists()
    assert mlflow_metric(pipeline, latest_run_id(pipeline), "bad_steps") == [(0, 1.0), (1, 2.0), (2, 3.0)]


def test_a_diverging_learning_rate_stops_the_run_and_writes_no_non_finite_lora(pipeline):
    with pytest.raises(TrainingError, match=r"^step \d+: 3 steps in a row had a non-finite loss.*learning_rate "
                                            r"too high \(1e\+30\)"):
        with pytest.MonkeyPatch.context() as m:
            m.setenv("FLUX2_DEBUG", "1")  # the exception itself, not the CLI's one-line report
            main(["train", "--params", str(pipeline / "params.yaml"), "--max_train_steps", "30",
                  "--max_bad_steps", "3", "--save_every_n_steps", "1", "--learning_rate", "1e30"])
    assert not (pipeline / "outputs/lora/lora.safetensors").exists()
    for checkpoint in (pipeline / "checkpoints").glob("*/step-*"):  # whatever was saved holds finite weights
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "lora.safetensors").values())


def test_a_checkpoint_with_non_finite_weights_is_refused(tmp_path):
    from flux2.checkpoint import TrainState, save_checkpoint

    param = torch.nn.Parameter(torch.zeros(2, 2))
    optimizer = torch.optim.AdamW([param])
    with pytest.raises(ValueError, match=r"refusing to write .*step-00000003/lora.safetensors: 1 LoRA tensors hold "
                                         r"NaN or inf"):
        save_checkpoint(tmp_path, TrainState(step=3), {"w": torch.tensor([1.0, float("nan")])}, optimizer)
    assert not list(tmp_path.iterdir())
