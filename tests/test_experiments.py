"""The experiment loop without the README's full run: every params.yaml key survives `dvc exp run -S` (DVC's own
params writer), one MLflow run per training run (resumed, continued with more steps, an evaluation of other
settings), the caches shared across workspaces through the store, and `flux2 compare` by DVC experiment name."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from flux2.cli import main
from flux2.params import CHOICES, Params, load_params
from tests.datasets import copy_pipeline

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ params


def override_value(value: Any) -> str:
    """A value as a user types it after `-S key=` (Hydra's override grammar, which DVC parses)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    """params.yaml's leaf keys as DVC names them (`dataset.sources.0.resolution`) -> value."""
    if isinstance(data, dict) and data:
        return {k: v for key, value in data.items() for k, v in leaves(value, f"{prefix}{key}.").items()}
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        return {k: v for i, value in enumerate(data) for k, v in leaves(value, f"{prefix}{i}.").items()}
    return {prefix[:-1]: data}


def set_params(path: Path, overrides: list[str]) -> Params:
    """What `dvc exp run -S ...` does to params.yaml (dvc.utils.hydra.apply_overrides rewrites the file: quotes
    dropped, nulls empty, lists in block style), then the validation every stage runs."""
    from dvc.utils.hydra import apply_overrides

    apply_overrides(path, overrides)
    return load_params(path, check_paths=False)


def test_every_params_key_survives_dvc_exp_run_set_param(tmp_path):
    """Every key of the project's params.yaml set to its own value, then every choice of every enum and both
    values of every bool, through DVC's params writer: each time the file still validates and holds the values
    set. So no `dvc exp run -S key=value` (workspace, --temp or --queue) can leave params.yaml unreadable."""
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    original = load_params(path, check_paths=False)
    keys = leaves(yaml.safe_load(path.read_text()))
    assert len(keys) > 90 and "train.mixed_precision" in keys and "dataset.sources.1.control_directory" in keys
    assert set_params(path, [f"{k}={override_value(v)}" for k, v in keys.items()]) == original
    text = path.read_text()
    assert "mixed_precision: no" in text and '"no"' not in text  # as DVC writes it: YAML reads the bool False

    def value_of(p: Params, key: str) -> Any:
        group, name = key.split(".", 1)
        return getattr(getattr(p, group), name)

    for i in range(max(map(len, CHOICES.values()))):  # the i-th choice of every enum at once
        chosen = {key: choices[i % len(choices)] for key, choices in CHOICES.items()}
        p = set_params(path, [f"{k}={v}" for k, v in chosen.items()])
        assert {k: value_of(p, k) for k in chosen} == chosen
    bools = [f"{g.name}.{f.name}" for g in dataclasses.fields(Params)
             for f in dataclasses.fields(getattr(original, g.name)) if f.type in ("bool", bool)]
    # model.fp8_matmul is an fp8 of its own, refused beside fp8_base: it is set alone, after the rest.
    together = [k for k in bools if k != "model.fp8_matmul"]
    enums_back = [f"{k}={value_of(original, k)}" for k in CHOICES]  # no quantisation mode beside fp8_base
    for flag in (True, False):
        p = set_params(path, [f"{k}={str(flag).lower()}" for k in together] + enums_back)
        assert all(value_of(p, k) is flag for k in together), together
    assert set_params(path, ["model.fp8_matmul=true"]).model.fp8_matmul is True


# ------------------------------------------------------------------------------------------------ shared caches


def workspace(cached_pipeline: Path, folder: Path) -> Path:
    """A copy of the pipeline folder without its caches: another clone (or a DVC temporary copy)."""
    copy_pipeline(cached_pipeline, folder)
    shutil.rmtree(folder / "cache")
    return folder


def test_two_workspaces_share_the_store_concurrently_and_a_third_encodes_nothing(cached_pipeline, tmp_path,
                                                                                 monkeypatch, capsys):
    """Two workspaces build their latents caches at the same time through one store (each its own folder, no lock
    between them): both end complete and equal. A third workspace then gets every latent and text entry from the
    store, loads no model and encodes nothing. One cache folder shared by two workspaces (an absolute
    cache.latents_dir) is still built by one at a time: the second is refused, naming the holder."""
    import subprocess
    import sys

    from flux2.cache_store import cache_lock
    from tests.reliability.helpers import assert_same_tensors, cache_contents, subprocess_env

    store = tmp_path / "store"
    a, b, c = (workspace(cached_pipeline, tmp_path / name) for name in "abc")
    env = subprocess_env(FLUX2_CACHE_STORE=str(store))
    procs = [subprocess.Popen([sys.executable, "-m", "flux2.cli", "cache-latents", "--params", "params.yaml"],
                              cwd=w, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for w in (a, b)]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-2000:]
    reference = cache_contents(cached_pipeline / "cache/latents")
    for w in (a, b):
        assert_same_tensors(cache_contents(w / "cache/latents"), reference, f"{w.name}'s latents", exact=False)
    assert list((store / "latents").glob("latents-*.safetensors"))

    monkeypatch.setenv("FLUX2_CACHE_STORE", str(store))
    assert main(["cache-text", "--params", str(a / "params.yaml")]) == 0  # the store gets the text entries too
    for kind in ("latents", "text"):
        assert main([f"cache-{kind}", "--params", str(c / "params.yaml")]) == 0
        report = json.loads((c / "reports" / f"cache_{kind}.json").read_text())
        assert report["encoded"] == 0 and report["from_store"] == report["entries"] > 0, report
        assert report["seconds_model_load"] == 0  # the model was never loaded
        assert_same_tensors(cache_contents(c / "cache" / kind), cache_contents(a / "cache" / kind), kind)
    assert "from the shared store" in capsys.readouterr().out

    with cache_lock(a / "cache/latents", "flux2 cache-latents"):  # workspace a is building its folder ...
        assert main(["cache-latents", "--params", str(b / "params.yaml"), "--cache_dir",
                     str(a / "cache/latents")]) == 2  # ... which workspace b is pointed at
    err = capsys.readouterr().err
    assert f"{a / 'cache/latents'} is being built by another process right now: flux2 cache-latents (pid " \
           f"{os.getpid()} on host" in err, err


# ------------------------------------------------------------------------------------------------ MLflow runs


def train(folder: Path, *extra: str) -> dict:
    assert main(["train", "--params", str(folder / "params.yaml"), "--save_every_n_steps", "5", *extra]) == 0
    return json.loads((folder / "metrics" / "train.json").read_text())


def test_more_steps_from_a_checkpoint_is_a_new_run_tagged_with_its_parent_and_an_evaluation_a_child(
        pipeline, monkeypatch):
    """The same settings trained longer (constant LR: the same configuration) continue from the checkpoint but as
    a new MLflow run tagged with its parent, which keeps its own params and metrics; the new run holds the whole
    curve, each step once, and is found by its DVC experiment name. Evaluating its LoRA with other eval settings
    is a child run, leaving the training run's evaluation as it was."""
    from mlflow.tracking import MlflowClient

    from flux2.compare import load_runs

    uri = f"sqlite:///{pipeline / 'mlflow.db'}"
    client = MlflowClient(uri)
    first = train(pipeline, "--max_train_steps", "10")["mlflow_run_id"]
    monkeypatch.setenv("DVC_EXP_NAME", "longer")  # as `dvc exp run -n longer` sets it
    second = train(pipeline, "--max_train_steps", "16")["mlflow_run_id"]
    assert second != first
    parent, child = client.get_run(first), client.get_run(second)
    assert parent.data.params["train.max_train_steps"] == "10" and "dvc.exp_name" not in parent.data.tags
    assert [m.step for m in client.get_metric_history(first, "loss")] == list(range(1, 11))
    assert child.data.params["train.max_train_steps"] == "16" and child.data.tags["dvc.exp_name"] == "longer"
    assert child.data.tags["flux2.parent_run_id"] == first and child.data.tags["flux2.parent_step"] == "10"
    assert sorted(m.step for m in client.get_metric_history(second, "loss")) == list(range(1, 17))
    assert [r.run_id for r in load_runs(["longer"], uri, "flux2")] == [second]

    assert main(["evaluate", "--params", str(pipeline / "params.yaml"), "--infer_steps", "2"]) == 0
    evaluated = client.get_run(second).data.metrics["eval_val_loss_lora"]
    monkeypatch.setenv("DVC_EXP_NAME", "more-sampling-steps")
    assert main(["evaluate", "--params", str(pipeline / "params.yaml"), "--infer_steps", "3"]) == 0
    assert client.get_run(second).data.metrics["eval_val_loss_lora"] == evaluated
    (own,) = load_runs(["more-sampling-steps"], uri, "flux2")
    assert own.run_id not in (first, second) and own.params["eval.infer_steps"] == "3"
    assert client.get_run(own.run_id).data.tags["mlflow.parentRunId"] == second


def test_fewer_steps_than_a_checkpoint_give_the_lora_at_that_step(pipeline):
    """After a 16-step run (checkpoints at 15 and 16 kept), asking for 8 steps neither returns the 16-step LoRA
    nor deletes the longer run's checkpoints: it trains from step 0 to step 8 (the 16-step run's first 8 steps,
    as every draw is a function of the seed and step)."""
    from flux2.safetensors_io import read_metadata

    train(pipeline, "--max_train_steps", "16")
    longer = (pipeline / "plots/train_loss.csv").read_text().splitlines()
    assert train(pipeline, "--max_train_steps", "8")["steps"] == 8
    assert (pipeline / "plots/train_loss.csv").read_text().splitlines() == longer[:9]  # the header and 8 steps
    assert read_metadata(pipeline / "outputs/lora/lora.safetensors")["ss_steps"] == "8"
    (folder,) = (pipeline / "checkpoints").glob("*/")
    assert sorted(p.name for p in folder.glob("step-*")) == ["step-00000005", "step-00000008", "step-00000015",
                                                              "step-00000016"]


def test_a_moved_project_logs_into_its_own_artifact_folder(pipeline, tmp_path):
    """MLflow records absolute artifact locations; after the project (with mlflow.db and mlartifacts/) is moved,
    the old runs' artifacts are found in the new folder and new runs write there, never into the old one."""
    from mlflow.tracking import MlflowClient

    first = train(pipeline, "--max_train_steps", "2")["mlflow_run_id"]
    moved = copy_pipeline(pipeline, tmp_path / "moved")
    shutil.rmtree(pipeline)
    second = train(moved, "--max_train_steps", "3")["mlflow_run_id"]
    client = MlflowClient(f"sqlite:///{moved / 'mlflow.db'}")
    for run_id in (first, second):
        assert client.get_run(run_id).info.artifact_uri.startswith((moved / "mlartifacts").as_uri())
        assert "lora" in {a.path for a in client.list_artifacts(run_id)}
    assert not pipeline.exists()  # nothing was written into the old folder
