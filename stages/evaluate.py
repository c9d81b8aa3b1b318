"""DVC stage `evaluate`: the LoRA, the caches and params.yaml (model, eval) -> metrics/eval.json, plots/val_loss.csv,
plots/loss.png, plots/val_loss.png and the sample grid; logged to the training's MLflow run. Run from the
repository root: `python -m stages.evaluate`."""
import sys

from flux2.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", "--params", "params.yaml", *sys.argv[1:]]))
