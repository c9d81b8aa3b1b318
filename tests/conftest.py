"""Test-wide settings (offline, quiet, deterministic, CPU), the shared fixtures, and the helpers the test modules
import."""
import os
import re
from pathlib import Path

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

from flux2 import sampling  # noqa: E402
from flux2.model import Flux2Transformer  # noqa: E402
from flux2.variants import VARIANTS, Variant  # noqa: E402

TINY = VARIANTS["tiny"]
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------- helpers
# Plain functions the test modules import (`from tests.conftest import random_dit`), so each is written once.


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float32: the relative L2 error the tests' tolerances are stated in."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def random_dit(variant: Variant = TINY, seed: int = 0) -> Flux2Transformer:
    """A DiT with every weight drawn from N(0, 0.05), larger than the init, so every path (zero-init-like ones
    included) matters; in eval mode."""
    torch.manual_seed(seed)
    model = Flux2Transformer(variant)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval()


def dit_inputs(variant: Variant = TINY, batch: int = 1, h: int = 4, w: int = 4, txt: int = 8,
               refs: tuple[tuple[int, int], ...] = (), seed: int = 1) -> tuple[torch.Tensor, ...]:
    """Random DiT inputs (x, x_ids, t, ctx, ctx_ids): `batch` items of an h x w latent, with reference latents of
    the sizes `refs` ((h, w) each) appended to x, and `txt` text tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, h * w, variant.in_channels, generator=g)
    x_ids = sampling.latent_ids(batch, h, w)
    if refs:
        ref_latents = [torch.randn(batch, variant.in_channels, rh, rw, generator=g) for rh, rw in refs]
        ref_tokens, ref_ids = sampling.reference_tokens(ref_latents)
        x = torch.cat([x, ref_tokens], dim=1)
        x_ids = torch.cat([x_ids, ref_ids], dim=1)
    ctx = torch.randn(batch, txt, variant.context_in_dim, generator=g)
    return x, x_ids, torch.rand(batch, generator=g), ctx, sampling.text_ids(batch, txt)


def generate_args(files: dict, out: Path, *extra: str, model_version: str = "tiny") -> list[str]:
    """`flux2 generate` arguments for the model files `files` (tiny_model's mapping: dit, vae, text_encoder) on
    the CPU, writing into `out`, then `extra` (the prompt, size, steps and seed each test chooses)."""
    return ["generate", "--model_version", model_version, "--dit", str(files["dit"]), "--vae", str(files["vae"]),
            "--text_encoder", str(files["text_encoder"]), "--device", "cpu", "--save_path", str(out), *extra]


def readme_block(heading: str | None = None) -> str:
    """The first fenced block of README.md (of its `## heading` section when given)."""
    text = (ROOT / "README.md").read_text()
    if heading is not None:
        text = text.split(f"## {heading}\n", 1)[1]
    return re.search(r"```(?:bash|sh)?\n(.*?)```", text, re.S).group(1)


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
