"""DVC stage `ingest`: the sources in params.yaml (dataset, eval.holdout_*) -> data/manifest.parquet and
reports/ingest.json. Run from the repository root: `python -m stages.ingest`."""
from flux2.ingest import ingest
from flux2.params import load_params

if __name__ == "__main__":
    try:
        params = load_params("params.yaml", check_paths=False)  # ingest needs no model files
        ingest(params.dataset, params.eval.holdout_fraction, holdout_min_items=params.eval.holdout_min_items)
    except ValueError as e:  # ParamsError, DatasetError, IngestError: one line a user can act on
        raise SystemExit(f"error: {e}") from None
