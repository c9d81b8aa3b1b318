"""kill -9 at a random moment of cache_latents, cache_text and train (real subprocesses, tiny model on the CPU).

Each kill moment is drawn from a seeded RNG within the stage's measured duration (an uninterrupted run of the
same stage, which is also the reference). Right after the kill, everything a reader can see must be complete
(shards, index, mappings, checkpoints, the LoRA); the rerun must finish and give the uninterrupted outputs:
the same cache entries (keys and tensors, through CacheReader) and, for training, the same LoRA bit for bit and
the same loss history.
"""
from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from flux2.cache_store import INDEX_FILE, SHARD_DIR, read_index, verify_entries
from flux2.cli import main
from flux2.safetensors_io import read_header
from tests.reliability.helpers import (MAPPINGS, assert_same_tensors, begun, cache_contents, copy_project, kill_after,
                                      leftovers, metric_steps, shards_written, timed_run)

pytestmark = pytest.mark.slow


def assert_cache_readable(cache_dir: Path) -> None:
    """What a reader sees in a cache folder right after a kill: every shard complete, the index naming only
    complete shards whose entries pass their checksums, the mapping readable."""
    if not cache_dir.is_dir():
        return
    for shard in (cache_dir / SHARD_DIR).glob("[!.]*.safetensors"):
        read_header(shard)  # CheckpointError for a truncated or half-written file
    if (cache_dir / INDEX_FILE).exists():
        rows, _ = read_index(cache_dir)
        good, problems = verify_entries(cache_dir, rows)
        assert not problems and len(good) == len(rows), problems[:3]
    for name in MAPPINGS.values():
        if (cache_dir / name).exists():
            pq.read_table(cache_dir / name)


# ------------------------------------------------------------------------------------------------ caches


# Seeds: kills at 84%, 13% and 46% of the working part. "shard": the moment a shard is complete (the first of
# the latents, the second of the text cache), before the index names it: a window too short for random kills.
@pytest.mark.parametrize("when", [0, 1, 9, "shard"])
@pytest.mark.parametrize("kind", ["latents", "text"])
def test_killed_cache_stage_reruns_to_the_uninterrupted_cache(project, reference, tmp_path, kind, when):
    seconds, expected, mapping = reference[kind]
    folder = copy_project(project, tmp_path / "p")
    cache_dir = folder / "cache" / kind
    if when == "shard":
        delay, marker = 0.0, shards_written(cache_dir, 1 if kind == "latents" else 2)
    else:
        delay, marker = random.Random(when).uniform(0, seconds), begun(cache_dir, kind)
    killed = kill_after(folder, delay, "-m", f"stages.cache_{kind}", marker=marker)
    assert_cache_readable(cache_dir)
    shards = len(list((cache_dir / SHARD_DIR).glob("[!.]*"))) if cache_dir.is_dir() else 0
    print(f"killed at {delay:.2f} of {seconds:.2f}s ({killed=}): {shards} shards, index "
          f"{(cache_dir / INDEX_FILE).exists()}")

    assert main([f"cache-{kind}", "--params", str(folder / "params.yaml")]) == 0
    assert_same_tensors(cache_contents(cache_dir), expected, f"{kind} cache after a kill at {delay:.2f}s ({killed=})",
                        exact=False)
    assert pq.read_table(cache_dir / MAPPINGS[kind]).equals(mapping)
    assert not leftovers(cache_dir), leftovers(cache_dir)
    report = json.loads((folder / "reports" / f"cache_{kind}.json").read_text())
    assert report["encoded"] + report["reused"] == len(expected) and not report["problems"]
    if when == "shard":  # the killed run's complete shards are used, not encoded again
        assert report["recovered"] >= 1, report


def test_a_kill_inside_safetensors_own_write_leaves_nothing_after_the_rerun(project, tmp_path):
    """safetensors' save_file writes through its own `.tmpXXXXXX` before our rename: a kill in that window (too
    short to hit by timing, seen under load) leaves that file, and the rerun must remove it with ours."""
    folder = copy_project(project, tmp_path / "p")
    assert main(["cache-text", "--params", str(folder / "params.yaml")]) == 0
    stray = folder / "cache" / "text" / SHARD_DIR / ".tmpQw3rTy"
    stray.write_bytes(b"half a shard")
    assert main(["cache-text", "--params", str(folder / "params.yaml")]) == 0
    assert not leftovers(folder / "cache" / "text"), leftovers(folder / "cache" / "text")


# ------------------------------------------------------------------------------------------------ training

TRAIN = ["--max_train_steps", "12", "--save_every_n_steps", "2"]


@pytest.fixture(scope="module")
def trained(cached_pipeline, tmp_path_factory) -> tuple[float, dict, str, dict]:
    """An uninterrupted training run as a subprocess: (seconds, LoRA tensors, loss history, MLflow metrics)."""
    folder = copy_project(cached_pipeline, tmp_path_factory.mktemp("trained") / "p")
    seconds = timed_run(folder, "-m", "flux2.cli", "train", "--params", "params.yaml", *TRAIN)
    run_id = json.loads((folder / "metrics/train.json").read_text())["mlflow_run_id"]
    return (seconds, load_file(folder / "outputs/lora/lora.safetensors"),
            (folder / "plots/train_loss.csv").read_text(), metric_steps(folder, run_id))


def assert_training_outputs_readable(folder: Path) -> None:
    """Right after a kill: every checkpoint folder verifies, the LoRA (if any) is complete, the JSON parses."""
    from flux2.checkpoint import list_checkpoints, verify_checkpoint
    from flux2.lora_formats import read_lora

    for path in [c for d in (folder / "checkpoints").glob("*/") for c in list_checkpoints(d)]:
        verify_checkpoint(path)
    lora = folder / "outputs/lora/lora.safetensors"
    if lora.exists():
        read_lora(lora)
    if (folder / "metrics/train.json").exists():
        json.loads((folder / "metrics/train.json").read_text())


@pytest.mark.parametrize("seed", [1, 5])  # kills at 58% and 88% of the measured duration
def test_killed_training_resumes_to_the_same_lora_bit_for_bit(pipeline, trained, seed):
    seconds, expected, history, metrics = trained
    delay = random.Random(100 + seed).uniform(0, seconds)
    killed = kill_after(pipeline, delay, "-m", "flux2.cli", "train", "--params", "params.yaml", *TRAIN)
    assert_training_outputs_readable(pipeline)
    print(f"killed at {delay:.2f} of {seconds:.2f}s ({killed=}): checkpoints "
          f"{sorted(p.name for p in (pipeline / 'checkpoints').glob('*/*'))}")

    for declared in ("plots/train_loss.csv", "metrics/train.json"):  # what `dvc repro` deletes before the rerun
        (pipeline / declared).unlink(missing_ok=True)
    assert main(["train", "--params", str(pipeline / "params.yaml"), *TRAIN]) == 0
    got = load_file(pipeline / "outputs/lora/lora.safetensors")
    assert_same_tensors(got, expected, f"LoRA after a kill at {delay:.2f}s ({killed=})")
    assert (pipeline / "plots/train_loss.csv").read_text() == history
    summary = json.loads((pipeline / "metrics/train.json").read_text())
    assert summary["steps"] == 12 and summary["final_loss"] == float(history.splitlines()[-1].split(",")[1])
    assert metric_steps(pipeline, summary["mlflow_run_id"]) == metrics  # every step once, the same values
    assert not leftovers(pipeline / "checkpoints") and not leftovers(pipeline / "outputs")


def test_no_checkpoint_is_ever_ahead_of_the_loss_history(pipeline, trained, capsys):
    """A checkpoint says "resume from here"; if it could exist before the loss history (and MLflow) held its
    steps, a kill (or a write error) between the two writes would lose those rows for good. Here the history
    write fails for real (its path is a folder): no checkpoint may be left that the history does not cover, and
    once the path is fixed the rerun gives the uninterrupted history and LoRA."""
    _, expected, history, _ = trained
    blocker = pipeline / "plots" / "train_loss.csv"
    (blocker / "x").mkdir(parents=True)
    assert main(["train", "--params", str(pipeline / "params.yaml"), *TRAIN]) == 2
    assert "train_loss.csv" in capsys.readouterr().err  # one line naming the file
    assert not list((pipeline / "checkpoints").glob("*/step-*"))
    shutil.rmtree(blocker)
    assert main(["train", "--params", str(pipeline / "params.yaml"), *TRAIN]) == 0
    assert (pipeline / "plots/train_loss.csv").read_text() == history
    assert_same_tensors(load_file(pipeline / "outputs/lora/lora.safetensors"), expected, "LoRA")


MAKE_RUN = "import sys; from flux2.tracking import Run, open_store; Run.create(open_store(sys.argv[1]), 'flux2').end()"


def test_tracking_database_killed_while_created_is_whole_or_absent(tmp_path):
    """MLflow builds a new sqlite database in dozens of migration steps; a kill among them must not leave a
    database that every later run refuses."""
    from mlflow.tracking import MlflowClient

    from flux2.tracking import Run, open_store

    def database_begun(folder: Path) -> Callable[[], bool]:
        return lambda: any(folder.iterdir())  # the database (or its temporary file) has been created

    (tmp_path / "ref").mkdir()
    uri = f"sqlite:///{tmp_path / 'ref' / 'mlflow.db'}"
    seconds = timed_run(tmp_path, "-c", MAKE_RUN, uri, marker=database_begun(tmp_path / "ref"))
    for seed in (3, 7):  # kills at 24% and 32% of the time after the database file appears: mid-migration
        folder = tmp_path / str(seed)
        folder.mkdir()
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        delay = random.Random(seed).uniform(0, seconds)
        kill_after(tmp_path, delay, "-c", MAKE_RUN, uri, marker=database_begun(folder))
        if (folder / "mlflow.db").exists():
            MlflowClient(uri).search_experiments()
        Run.create(open_store(uri), "flux2").end()  # the rerun
        assert [e.name for e in MlflowClient(uri).search_experiments() if e.name == "flux2"] == ["flux2"]


def test_temporaries_left_by_killed_writes_are_removed_by_the_rerun(pipeline):
    """What a kill in the middle of a write leaves: a hidden temporary file beside the target (shard, index,
    mapping, LoRA) or a `.tmp-step-*` checkpoint folder. They are invisible to readers, and the next run of the
    stage deletes them, so they never pile up in an output folder (or in what DVC stores of it)."""
    stale = [pipeline / "cache/latents/.index.0123456789ab.tmp.parquet",
             pipeline / "cache/latents/.items.0123456789ab.tmp.parquet",
             pipeline / "cache/latents/shards/.latents-x-r0-0000.safetensors.0123456789ab.tmp",
             pipeline / "outputs/lora/.lora.safetensors.0123456789ab.tmp",
             pipeline / "checkpoints/.tmp-step-00000010-99999/lora.safetensors"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a file")
    assert main(["cache-latents", "--params", str(pipeline / "params.yaml")]) == 0
    assert main(["train", "--params", str(pipeline / "params.yaml"), *TRAIN]) == 0
    assert not any(p.exists() for p in stale) and not (pipeline / "checkpoints/.tmp-step-00000010-99999").exists()
    assert not leftovers(pipeline)
