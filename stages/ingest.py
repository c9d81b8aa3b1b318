"""DVC stage `ingest`: the sources in params.yaml (dataset, eval.holdout_*) -> data/manifest.parquet and
reports/ingest.json. Run from the repository root: `python -m stages.ingest`. Extra options are passed on (see
`flux2 ingest --help`)."""
import sys

from flux2.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", "--params", "params.yaml", *sys.argv[1:]]))
