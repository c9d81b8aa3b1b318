"""Lost or not reproducible: identical runs give identical LoRA bytes; a `dvc repro` that reruns training keeps
the loss history; a kill between the final checkpoint and the end loses no MLflow step; two trainings on one
checkpoint folder are refused by a lock that names the first, and a dead holder's lock is taken over."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flux2.atomic import sha256_file
from flux2.cli import main
from tests.reliability.helpers import copy_project, kill_after, metric_steps, start, subprocess_env, wait_for

pytestmark = pytest.mark.slow

TRAIN = ["--max_train_steps", "12", "--save_every_n_steps", "4"]
LORA = "outputs/lora/lora.safetensors"


def train(folder: Path, *extra: str) -> dict:
    assert main(["train", "--params", str(folder / "params.yaml"), *TRAIN, *extra]) == 0
    return json.loads((folder / "metrics/train.json").read_text())


@pytest.fixture(scope="module")
def reference(cached_pipeline, tmp_path_factory) -> tuple[Path, dict]:
    """One uninterrupted run of TRAIN: its folder and metrics/train.json."""
    folder = copy_project(cached_pipeline, tmp_path_factory.mktemp("reference") / "p")
    return folder, train(folder)


def test_identical_runs_write_identical_lora_files(reference, cached_pipeline, tmp_path):
    """Two clean runs with the same params, in folders at other paths and at other times: the same bytes (so the
    same sha256 and DVC md5: downstream stages do not rerun for nothing). The metadata names nothing that
    depends on the time, the path or the commit."""
    from flux2.safetensors_io import read_metadata

    ref, _ = reference
    other = copy_project(cached_pipeline, tmp_path / "elsewhere" / "p")
    train(other)
    assert sha256_file(other / LORA) == sha256_file(ref / LORA)
    meta = json.dumps(read_metadata(other / LORA))
    assert str(other) not in meta and str(tmp_path) not in meta and "commit" not in meta


def test_dvc_repro_after_a_damaged_lora_or_a_deleted_shard_keeps_the_loss_history(reference, cached_pipeline,
                                                                                   tmp_path):
    """DVC deletes a stage's declared outputs (the LoRA, metrics/train.json, plots/train_loss.csv) before it
    reruns the stage. After a damaged LoRA (or a deleted cache shard, which reruns cache_latents and then train)
    the rerun resumes from the final checkpoint, which carries the loss history: the CSV is whole again and
    final_loss is the uninterrupted run's, not NaN."""
    ref, summary = reference
    history = (ref / "plots/train_loss.csv").read_text()
    folder = copy_project(cached_pipeline, tmp_path / "p")
    env = subprocess_env(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
                         GIT_COMMITTER_EMAIL="t@t")
    dvc = str(Path(sys.executable).parent / "dvc")
    args = " ".join(["--params", "params.yaml", *TRAIN])
    (folder / "dvc.yaml").write_text(f"""stages:
  cache_latents:
    cmd: {sys.executable} -m flux2.cli cache-latents --params params.yaml
    deps: [data/manifest.parquet]
    outs:
      - cache/latents: {{persist: true, cache: false}}
  train:
    cmd: {sys.executable} -m flux2.cli train {args}
    deps: [cache/latents, cache/text]
    outs:
      - outputs/lora
      - checkpoints: {{persist: true, cache: false}}
    metrics:
      - metrics/train.json: {{cache: false}}
    plots:
      - plots/train_loss.csv: {{cache: false}}
""")

    def repro() -> str:
        out = subprocess.run([dvc, "repro"], cwd=folder, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        return out.stdout

    for cmd in (["git", "init", "-q"], [dvc, "init", "-q"]):
        subprocess.run(cmd, cwd=folder, env=env, check=True, capture_output=True)
    repro()
    assert (folder / "plots/train_loss.csv").read_text() == history

    lora = folder / LORA
    lora.chmod(0o644)  # DVC may have linked it read-only from its cache
    lora.write_bytes(lora.read_bytes()[:-8] + b"damaged!")
    assert "Running stage 'train'" in repro()
    assert (folder / "plots/train_loss.csv").read_text() == history
    got = json.loads((folder / "metrics/train.json").read_text())
    assert got["final_loss"] == summary["final_loss"] and got["steps"] == 12
    assert sha256_file(lora) == sha256_file(ref / LORA)

    next((folder / "cache/latents/shards").glob("*.safetensors")).unlink()
    out = repro()
    assert "Running stage 'cache_latents'" in out and "Running stage 'train'" in out
    assert (folder / "plots/train_loss.csv").read_text() == history
    assert json.loads((folder / "metrics/train.json").read_text())["final_loss"] == summary["final_loss"]


def test_kills_before_the_first_and_after_the_final_checkpoint_leave_one_mlflow_run_with_every_step_once(
        reference, cached_pipeline, tmp_path):
    """Killed before any checkpoint, the rerun starts from step 0 in the same, unfinished MLflow run (its id is
    kept beside the checkpoints). Killed again right after the final checkpoint (during the end-of-training
    samples and artifacts: MLflow was flushed before that checkpoint), the next rerun logs nothing twice. In the
    end: one MLflow run for the one training, every step exactly once, the uninterrupted run's values."""
    from mlflow.tracking import MlflowClient

    ref, summary = reference
    folder = copy_project(cached_pipeline, tmp_path / "p")
    # End-of-training samples make the window between the final checkpoint and metrics/train.json wide enough
    # for the kill to land in it on a loaded machine (they change no weight and no logged step).
    (folder / "prompts.txt").write_text("a red circle on a blue background --s 20\n", encoding="utf-8")
    samples = ("--sample_prompts", "prompts.txt")
    train_args = ("-m", "flux2.cli", "train", "--params", "params.yaml", *TRAIN, *samples)
    assert kill_after(folder, 0.0, *train_args,
                      marker=lambda: bool(list((folder / "checkpoints").glob("*/mlflow_run_id.txt"))))
    assert not list((folder / "checkpoints").glob("*/step-*"))
    killed = kill_after(folder, 0.0, *train_args,
                        marker=lambda: bool(list((folder / "checkpoints").glob("*/step-00000012"))))
    assert killed and not (folder / "metrics/train.json").exists(), "the kill came after the end of the run"
    got = train(folder, *samples)
    assert metric_steps(folder, got["mlflow_run_id"]) == metric_steps(ref, summary["mlflow_run_id"])
    runs = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_runs(["1"])
    assert [r.info.run_id for r in runs] == [got["mlflow_run_id"]] and runs[0].info.status == "FINISHED"


def test_a_second_training_on_the_same_folders_is_refused_naming_the_first(reference, cached_pipeline, tmp_path,
                                                                          capsys):
    """The second `flux2 train` is refused at once by the checkpoint folder's lock, with a message naming the
    first (pid, host, since when); the first finishes to the uninterrupted LoRA. A lock left by a killed holder
    is taken over."""
    ref, _ = reference
    folder = copy_project(cached_pipeline, tmp_path / "p")
    lock = folder / "checkpoints" / ".lock"
    first = start(folder, "-m", "flux2.cli", "train", "--params", "params.yaml", *TRAIN)
    wait_for(first, lambda: lock.is_file() and lock.stat().st_size > 0)
    assert main(["train", "--params", str(folder / "params.yaml"), *TRAIN]) == 2
    err = capsys.readouterr().err
    _, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err.decode()[-2000:]
    assert f"{folder / 'checkpoints'} is in use by another training right now: flux2 train (pid {first.pid} on " \
           f"host {os.uname().nodename} since " in err, err
    assert sha256_file(folder / LORA) == sha256_file(ref / LORA) and lock.stat().st_size == 0

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from flux2.locks import folder_lock\n"
                               "with folder_lock(sys.argv[1], command='flux2 train'):\n    time.sleep(600)",
                               str(folder / "checkpoints")], env=subprocess_env(), start_new_session=True)
    wait_for(holder, lambda: lock.stat().st_size > 0)
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait()
    assert json.loads(lock.read_text())["pid"] == holder.pid  # what a killed holder leaves: its name, no flock
    train(folder)
    assert f"taking over {lock} from flux2 train (pid {holder.pid}" in capsys.readouterr().out
