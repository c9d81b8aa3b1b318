"""`flux2 compare RUN RUN ...`: trained LoRAs side by side, read back from the MLflow store.

One PNG (and a small self-contained HTML page beside it) with a column per run: the parameters that differ
between the runs, their metrics (the evaluate stage's and the last training loss) and their sample grids
(the `eval/grid.png` artifact the evaluate stage logs).
"""
from __future__ import annotations

import base64
import html
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from flux2 import plots
from flux2.atomic import atomic_write_text

GRID_ARTIFACT = "eval/grid.png"
MAX_GRID_WIDTH = 1100  # each run's grid is scaled down to this width in the picture
# Metrics shown (MLflow name -> label), in this order; the evaluate stage logs them flattened as `eval_*`.
METRICS = {
    "eval_val_loss_lora": "hold-out loss, LoRA",
    "eval_val_loss_base": "hold-out loss, base",
    "eval_val_loss_improvement": "hold-out loss, base - LoRA",
    "eval_train_loss_lora": "training-items loss, LoRA",
    "eval_train_loss_base": "training-items loss, base",
    "eval_clip_score_lora": "CLIP score, LoRA",
    "eval_clip_score_base": "CLIP score, base",
    "loss": "training loss, last step",
}


class CompareError(ValueError):
    """A run that cannot be found or compared; the message says which and why."""


@dataclass
class RunView:
    """What the comparison shows of one run."""

    run_id: str
    name: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    grid: Image.Image | None

    @property
    def label(self) -> str:
        return f"{self.name} ({self.run_id[:8]})"


def find_run(client, key: str, experiment: str):
    """The run with id `key`, else the latest run of DVC experiment `key` (tag dvc.exp_name, as `dvc exp show`
    names it), else the latest run named `key` in `experiment`."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(key)
    except MlflowException:
        pass
    exp = client.get_experiment_by_name(experiment)
    runs = []
    for where in (f"tags.`dvc.exp_name` = '{key}'", f"attributes.run_name = '{key}'"):
        if exp is not None and not runs and "'" not in key:
            runs = client.search_runs([exp.experiment_id], filter_string=where,
                                      order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        place = f"experiment {experiment!r}" if exp is not None else f"the store (no experiment {experiment!r})"
        raise CompareError(f"no MLflow run with id, DVC experiment name or run name {key!r} in {place}; list runs "
                           f"with `mlflow runs list --experiment-id ...` or `dvc exp show`, or give --tracking_uri "
                           f"/ --experiment")
    return runs[0]


def load_runs(keys: list[str], uri: str, experiment: str) -> list[RunView]:
    """The runs' parameters, latest metrics and sample grids from the MLflow store at `uri`."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    views = []
    for key in keys:
        run = find_run(client, key, experiment)
        grid = None
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = client.download_artifacts(run.info.run_id, GRID_ARTIFACT, tmp)
                with Image.open(path) as im:
                    grid = im.convert("RGB")
            except (MlflowException, OSError):
                print(f"note: run {run.info.run_id} has no {GRID_ARTIFACT} (run the evaluate stage for it)")
        views.append(RunView(run.info.run_id, run.info.run_name or run.info.run_id, run.info.status,
                             dict(run.data.params), dict(run.data.metrics), grid))
    return views


def differing_params(runs: list[RunView]) -> list[tuple[str, list[str]]]:
    """(parameter, value per run) for every parameter whose values are not all the same ('-' when unset)."""
    keys = sorted(set().union(*(r.params for r in runs)))
    rows = []
    for key in keys:
        values = [r.params.get(key, "-") for r in runs]
        if len(set(values)) > 1:
            rows.append((key, values))
    return rows


def metric_rows(runs: list[RunView]) -> list[tuple[str, list[str]]]:
    """(label, formatted value per run) for the METRICS any run has."""
    rows = []
    for name, label in METRICS.items():
        if any(name in r.metrics for r in runs):
            rows.append((label, [f"{r.metrics[name]:.4f}" if name in r.metrics else "-" for r in runs]))
    return rows


def render(runs: list[RunView]) -> Image.Image:
    """The comparison picture: a table (runs as columns) above the runs' grids side by side."""
    grids = []
    for r in runs:
        g = r.grid
        if g is not None and g.width > MAX_GRID_WIDTH:
            g = g.resize((MAX_GRID_WIDTH, round(g.height * MAX_GRID_WIDTH / g.width)), Image.LANCZOS)
        grids.append(g)
    col_width = max([260] + [g.width for g in grids if g is not None])
    params = differing_params(runs)
    rows = [["status"] + [r.status.lower() for r in runs]]
    rows += [[key] + values for key, values in params] or [["parameters"] + ["all the same"] * len(runs)]
    rows += [[label] + values for label, values in metric_rows(runs)]
    table = plots.text_table(["run"] + [r.label for r in runs], rows,
                             title=f"{len(runs)} runs: the parameters that differ, metrics and sample grids",
                             col_width=col_width)
    cells = []
    for r, g in zip(runs, grids):
        if g is None:
            g = plots.text_table([r.label], [["no sample grid: run the evaluate stage for this run"]],
                                 first_width=col_width)
        canvas = Image.new("RGB", (col_width, g.height), plots.BACKGROUND)
        canvas.paste(g, (0, 0))
        cells.append(canvas)
    # The grids start under their table column (the first column holds the row names).
    left = Image.new("RGB", (260 + plots.PAD, 1), plots.BACKGROUND)
    return plots.stack([table, plots.stack([left] + cells, "horizontal")])


def render_html(runs: list[RunView]) -> str:
    """A small self-contained page: the same table, and the grids embedded as PNG data."""
    def cell(text: str, tag: str = "td") -> str:
        return f"<{tag}>{html.escape(text)}</{tag}>"

    def image(im: Image.Image | None) -> str:
        if im is None:
            return "<td>no sample grid</td>"
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return f'<td><img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"></td>'

    lines = ["<!doctype html>", '<html><head><meta charset="utf-8"><title>flux2 compare</title>',
             "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
             "padding:4px 8px;vertical-align:top;text-align:left}img{max-width:1100px}</style></head><body>",
             f"<h1>{len(runs)} runs</h1>", "<table>",
             "<tr>" + cell("run", "th") + "".join(cell(r.label, "th") for r in runs) + "</tr>",
             "<tr>" + cell("run id") + "".join(cell(r.run_id) for r in runs) + "</tr>"]
    for key, values in differing_params(runs) + metric_rows(runs):
        lines.append("<tr>" + cell(key) + "".join(cell(v) for v in values) + "</tr>")
    lines.append("<tr>" + cell("sample grid") + "".join(image(r.grid) for r in runs) + "</tr>")
    lines += ["</table>", "</body></html>"]
    return "\n".join(lines) + "\n"


def compare(keys: list[str], tracking_uri: str | None = None, experiment: str = "flux2",
            out: str | Path = "reports/compare.png") -> tuple[Path, Path]:
    """Write the comparison of runs `keys` (ids or names) to `out` (PNG) and `out` with .html; returns both."""
    from flux2.tracking import tracking_uri as default_uri

    if len(keys) < 2:
        raise CompareError("give at least two runs to compare")
    runs = load_runs(keys, default_uri(tracking_uri), experiment)
    png = plots.save_image(render(runs), out)
    page = Path(out).with_suffix(".html")
    atomic_write_text(page, render_html(runs))
    print(f"compared {len(runs)} runs: wrote {png} and {page}")
    return png, page
