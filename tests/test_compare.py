"""`flux2 compare` on two real MLflow runs: two trainings with different learning rates, each evaluated, in one
store."""
import json

import pytest
from PIL import Image

from flux2.cli import main
from flux2.compare import MAX_GRID_WIDTH, differing_params, load_runs
from flux2.plots import PAD
from tests.datasets import copy_pipeline


@pytest.fixture(scope="module")
def two_runs(cached_pipeline, tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare") / "pipeline"
    params = str(copy_pipeline(cached_pipeline, folder) / "params.yaml")
    ids = []
    for lr in ("0.01", "0.002"):
        assert main(["train", "--params", params, "--max_train_steps", "6", "--learning_rate", lr,
                     "--save_every_n_steps", "0"]) == 0
        assert main(["evaluate", "--params", params, "--infer_steps", "2"]) == 0
        ids.append(json.loads((folder / "metrics" / "train.json").read_text())["mlflow_run_id"])
    return folder, f"sqlite:///{folder / 'mlflow.db'}", ids


def test_compare_writes_the_picture_and_page(two_runs, tmp_path):
    folder, uri, ids = two_runs
    out = tmp_path / "report" / "compare.png"
    assert main(["compare", *ids, "--tracking_uri", uri, "--out", str(out)]) == 0
    with Image.open(out) as im:
        grid_width = Image.open(folder / "outputs" / "eval" / "grid.png").width
        # The row names, then a column per run holding its grid (scaled down to MAX_GRID_WIDTH).
        assert im.width == PAD + (260 + PAD) + 2 * (min(grid_width, MAX_GRID_WIDTH) + PAD)
    page = out.with_suffix(".html").read_text()
    for text in ids + ["train.learning_rate", "0.01", "0.002", "hold-out loss, LoRA"]:
        assert text in page
    assert page.count('<img src="data:image/png;base64,') == 2


def test_the_parameters_that_differ(two_runs):
    _, uri, ids = two_runs
    runs = load_runs(ids, uri, "flux2")
    assert differing_params(runs) == [("train.learning_rate", ["0.01", "0.002"])]
    assert all(r.grid is not None and "eval_val_loss_lora" in r.metrics for r in runs)
    # The higher learning rate went further in 6 steps.
    assert runs[0].metrics["eval_train_loss_lora"] < runs[1].metrics["eval_train_loss_lora"]


def test_runs_by_name_and_unknown_runs(two_runs, tmp_path, capsys):
    _, uri, ids = two_runs
    (latest,) = load_runs(["lora"], uri, "flux2")  # both runs are named after train.output_name
    assert latest.run_id == ids[1]
    assert main(["compare", ids[0], "no-such-run", "--tracking_uri", uri, "--out", str(tmp_path / "c.png")]) == 2
    assert "no MLflow run with id, DVC experiment name or run name 'no-such-run' in experiment 'flux2'" in capsys.readouterr().err
