"""DVC stage `train`: the caches + params.yaml (model, train) -> the LoRA, checkpoints, metrics/train.json and
plots/train_loss.csv; logged to MLflow. Run from the repository root: `python -m stages.train`, or on several
GPUs with `accelerate launch --num_processes N -m stages.train`."""
import sys

from flux2.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "--params", "params.yaml", *sys.argv[1:]]))
