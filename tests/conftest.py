"""Test-wide settings: offline, quiet, deterministic, CPU."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# On 2 shared cores, OpenMP threads that spin while waiting make tiny-model work several times slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The shared cache store (flux2/cache_store.py) is off unless a test turns it on with a folder of its own: tests
# count what a cache stage encodes, and must never write into the user's ~/.cache.
os.environ.setdefault("FLUX2_CACHE_STORE", "off")

import torch  # noqa: E402

# Under `make test` two xdist workers share the cores: one thread each.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The tiny variant's model files (DiT, AE, text encoder folder), written once per test session."""
    from flux2.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_model"), seed=0)


@pytest.fixture(scope="session")
def cached_pipeline(tmp_path_factory, tiny_model):
    """A folder with a shapes dataset, params.yaml, and the ingest + cache stages already run (in-process).

    Tests that train or evaluate copy it (`copy_pipeline`) rather than changing it."""
    from flux2.cli import main
    from tests.datasets import write_params, write_shapes_dataset

    folder = tmp_path_factory.mktemp("pipeline")
    write_shapes_dataset(folder / "ds", n=12)
    params = write_params(folder, tiny_model)
    for command in ("ingest", "cache-latents", "cache-text"):
        assert main([command, "--params", str(params)]) == 0, command
    return folder


@pytest.fixture
def pipeline(cached_pipeline, tmp_path):
    """A private copy of cached_pipeline for one test."""
    from tests.datasets import copy_pipeline

    return copy_pipeline(cached_pipeline, tmp_path / "pipeline")


def pytest_collection_modifyitems(items):
    """The longest module first (tests/test_readme.py: a fresh clone running `make demo`, then the experiment
    block): under `make test`'s `-n 2 --dist loadscope --no-loadscope-reorder` (modules in this order) the other
    worker takes the rest of the suite meanwhile."""
    items.sort(key=lambda item: item.module.__name__ != "tests.test_readme")
