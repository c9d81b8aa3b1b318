"""Fixtures of the reliability tests: a pipeline folder big enough to be interrupted, and its reference caches."""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flux2.cache_store import read_index
from flux2.cli import main
from tests.datasets import write_params, write_shapes_dataset
from tests.reliability.helpers import MAPPINGS, N_IMAGES, begun, cache_contents, copy_project, timed_run


@pytest.fixture(scope="session")
def project(tmp_path_factory, tiny_model) -> Path:
    """A pipeline folder after ingest: N_IMAGES small images with distinct captions, small cache batches."""
    folder = tmp_path_factory.mktemp("kill_project")
    write_shapes_dataset(folder / "ds", n=N_IMAGES, size=32)
    for i, caption in enumerate(sorted((folder / "ds").glob("*.txt"))):
        caption.write_text(f"{caption.read_text()}, picture {i}")  # distinct: one text entry per image
    write_params(folder, tiny_model, extra="cache:\n  batch_size: 2\n  shard_mb: 1\n", resolution=32)
    assert main(["ingest", "--params", str(folder / "params.yaml")]) == 0
    return folder


@pytest.fixture(scope="session")
def reference(project, tmp_path_factory) -> dict:
    """Each cache stage run once without interruption (a subprocess, as a kill run): the duration of its working
    part (from `begun`, after interpreter start and imports) and its outputs."""
    folder = copy_project(project, tmp_path_factory.mktemp("reference") / "p")
    out = {}
    for kind in ("latents", "text"):
        cache_dir = folder / "cache" / kind
        seconds = timed_run(folder, "-m", f"stages.cache_{kind}", marker=begun(cache_dir, kind))
        out[kind] = (seconds, cache_contents(cache_dir), pq.read_table(cache_dir / MAPPINGS[kind]))
    assert len(out["latents"][1]) == N_IMAGES and len(out["text"][1]) == N_IMAGES + 3  # + "" and 2 eval prompts
    assert len({r["shard"] for r in read_index(folder / "cache" / "text")[0]}) >= 2
    return out
