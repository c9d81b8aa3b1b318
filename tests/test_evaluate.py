"""The evaluate stage: a LoRA trained on the dataset lowers the loss on its training items, reruns (through the
stage script) give identical metrics, the outputs for DVC and MLflow, the CLIP score, and edit-LoRA grids."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from flux2.cli import main
from flux2.evaluate import clip_scores
from flux2.plots import PAD
from tests.datasets import COLOURS, copy_pipeline, write_params, write_shapes_dataset

REPO = Path(__file__).resolve().parents[1]
EVAL_ARGS = ["--infer_steps", "4", "--clip_model", "clip", "--concept",
             '{"colour": [220, 40, 40], "tolerance": 80, "word": "red"}']
CELL = 256  # plots.image_grid's default cell and label widths
LABEL = 260


def write_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A random CLIP in Hugging Face layout: word-level tokenizer, tiny text and vision towers, image processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, PreTrainedTokenizerFast

    words = "a on of red blue green yellow circle square background".split()
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<bos>", "<eos>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                       special_tokens=[("<bos>", 2), ("<eos>", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                            eos_token="<eos>").save_pretrained(folder)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def evaluated(cached_pipeline, tmp_path_factory):
    """A LoRA trained 40 steps at a high learning rate, evaluated once (in-process) with the tiny CLIP."""
    folder = tmp_path_factory.mktemp("evaluate") / "pipeline"
    params = copy_pipeline(cached_pipeline, folder) / "params.yaml"
    write_tiny_clip(folder / "clip")
    assert main(["train", "--params", str(params), "--max_train_steps", "40", "--learning_rate", "0.01",
                 "--save_every_n_steps", "0"]) == 0
    assert main(["evaluate", "--params", str(params), *EVAL_ARGS]) == 0
    return folder


def read_metrics(folder):
    return json.loads((folder / "metrics" / "eval.json").read_text())


def test_lora_lowers_the_loss_on_its_training_items(evaluated):
    m = read_metrics(evaluated)
    # Measured: training items 1.3740 (base) -> 1.1544 (LoRA), hold-out 1.3604 -> 1.1484. The tiny DiT is random,
    # so the LoRA mostly learns what all the shapes images share, and the hold-out items gain as much.
    assert m["train_loss"]["lora"] < m["train_loss"]["base"] - 0.1
    assert m["val_loss"]["lora"] < m["val_loss"]["base"]


def test_concept_score_of_the_prompts_that_ask_for_it(evaluated):
    from flux2.concept import Concept, concept_score

    m = read_metrics(evaluated)
    for which in ("base", "lora"):
        assert 0.0 <= m["concept_score"][which] <= 1.0 and 0.0 <= m["concept_presence"][which] <= 1.0
    # Only the "a red circle ..." row counts: its LoRA images are the first row's LoRA cells of the grid.
    assert concept_score([Image.new("RGB", (8, 8), (220, 40, 40))], Concept((220, 40, 40))) == 1.0


def test_metrics_table(evaluated):
    m = read_metrics(evaluated)
    assert m["items"] == {"holdout": 4, "train": 8}
    by_t = m["val_loss_by_t"]
    assert list(by_t) == [f"t0.{i}" for i in range(1, 10)]
    for which in ("base", "lora"):
        assert m["val_loss"][which] == pytest.approx(sum(v[which] for v in by_t.values()) / 9, rel=1e-12)
    assert m["val_loss"]["improvement"] == pytest.approx(m["val_loss"]["base"] - m["val_loss"]["lora"])
    rows = (evaluated / "plots" / "val_loss.csv").read_text().splitlines()
    assert rows[0] == "t,base,lora,base_train,lora_train" and len(rows) == 10
    assert float(rows[1].split(",")[2]) == by_t["t0.1"]["lora"]


def test_grid_plots_and_mlflow(evaluated):
    from mlflow.tracking import MlflowClient

    with Image.open(evaluated / "outputs" / "eval" / "grid.png") as grid:
        # A label column and base + LoRA for each of the 2 seeds; 2 prompt rows.
        assert grid.width == PAD + LABEL + 4 * (CELL + PAD)
        assert grid.height > 2 * (CELL + PAD)
    for name in ("loss.png", "val_loss.png"):
        with Image.open(evaluated / "plots" / name) as im:
            assert im.format == "PNG" and im.width > 400

    run_id = json.loads((evaluated / "metrics" / "train.json").read_text())["mlflow_run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{evaluated / 'mlflow.db'}")
    metrics = client.get_run(run_id).data.metrics
    m = read_metrics(evaluated)
    assert metrics["eval_val_loss_lora"] == m["val_loss"]["lora"]
    assert metrics["eval_val_loss_by_t_t0.5_base"] == m["val_loss_by_t"]["t0.5"]["base"]
    assert metrics["eval_clip_score_base"] == m["clip_score"]["base"]
    assert {a.path for a in client.list_artifacts(run_id, "eval")} == {"eval/eval.json", "eval/grid.png"}
    assert {a.path for a in client.list_artifacts(run_id, "plots")} == {"plots/loss.png", "plots/val_loss.png"}


def test_clip_score(evaluated):
    scores = read_metrics(evaluated)["clip_score"]
    assert set(scores) == {"base", "lora"}
    assert all(0.0 <= s <= 100.0 for s in scores.values())
    red = Image.new("RGB", (64, 64), COLOURS["red"])
    a = clip_scores(evaluated / "clip", [red, red], ["a red circle", "a red circle"], torch.device("cpu"))
    assert a[0] == pytest.approx(a[1], rel=1e-5)  # the same pair scores the same (up to batch rounding)


def test_rerun_gives_identical_metrics(evaluated):
    before = (evaluated / "metrics" / "eval.json").read_bytes()
    assert main(["evaluate", "--params", str(evaluated / "params.yaml"), *EVAL_ARGS]) == 0
    assert (evaluated / "metrics" / "eval.json").read_bytes() == before


@pytest.mark.slow
def test_stage_script_in_a_subprocess_gives_identical_metrics(evaluated):
    before = (evaluated / "metrics" / "eval.json").read_bytes()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(torch.get_num_threads()))
    done = subprocess.run([sys.executable, "-m", "stages.evaluate", *EVAL_ARGS], cwd=evaluated, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (evaluated / "metrics" / "eval.json").read_bytes() == before


def test_evaluate_before_training_is_a_clear_error(pipeline, capsys):
    assert main(["evaluate", "--params", str(pipeline / "params.yaml")]) == 2
    assert "metrics/train.json not found: run the train stage first" in capsys.readouterr().err


def test_edit_lora_grid_shows_control_and_target(tiny_model, tmp_path):
    write_shapes_dataset(tmp_path / "ds", n=8, controls=True)
    params = str(write_params(tmp_path, tiny_model, controls=True))
    for command in ("ingest", "cache-latents", "cache-text"):
        assert main([command, "--params", params]) == 0
    assert main(["train", "--params", params, "--max_train_steps", "2", "--save_every_n_steps", "0"]) == 0
    assert main(["evaluate", "--params", params, "--infer_steps", "1", "--seeds", "0"]) == 0
    m = read_metrics(tmp_path)
    assert m["items"]["holdout"] == 2 and m["val_loss"]["lora"] > 0  # the loss ran with reference latents

    with Image.open(tmp_path / "outputs" / "eval" / "grid.png") as grid:
        grid = grid.convert("RGB")
    # Columns: control image, hold-out target, base, LoRA; rows: 2 prompts, then the 2 hold-out edit items.
    assert grid.width == PAD + LABEL + 4 * (CELL + PAD)
    top = grid.height - 2 * (CELL + PAD)  # the first edit row

    def colours(column):
        x = PAD + LABEL + column * (CELL + PAD)
        return {c for _, c in grid.crop((x, top, x + CELL, top + CELL)).getcolors(CELL * CELL)}

    grey = (128, 128, 128)
    assert grey in colours(0)  # the control: the scene with the shape in grey
    assert grey not in colours(1) and len(colours(1) & set(COLOURS.values())) == 2  # the target, in colour
