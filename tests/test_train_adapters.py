"""LoKr, LoHa, LoRA+ and per-block ranks / learning rates through the stages on the tiny pipeline: `flux2 train`
with the peers' names, bit-exact resume, MLflow, `flux2 generate` mixing them with a LoRA, evaluate, compare, and
the options' errors."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flux2.cli import main
from flux2.safetensors_io import read_metadata
from tests.datasets import copy_pipeline

# The musubi-tuner / LyCORIS spelling of a LoKr run, with the dropouts that apply and LoRA+.
LOKR = ("--network_module", "lycoris.kohya", "--network_args", "algo=lokr", "factor=4", "--rank_dropout", "0.2",
        "--module_dropout", "0.1", "--loraplus_lr_ratio", "4")
SGD_STEP = ("--optimizer_type", "torch.optim.SGD", "--learning_rate", "0.5", "--max_grad_norm", "0",
            "--max_train_steps", "1", "--save_every_n_steps", "0")


def train(pipeline: Path, *extra: str) -> dict:
    assert main(["train", "--params", str(pipeline / "params.yaml"), *extra]) == 0
    return json.loads((pipeline / "metrics" / "train.json").read_text())


def adapter(pipeline: Path, name: str = "lora") -> dict[str, torch.Tensor]:
    return load_file(pipeline / "outputs" / "lora" / f"{name}.safetensors")


def test_lokr_by_the_peers_names_resumes_bit_exact_is_logged_and_warm_starts(pipeline, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    other = copy_pipeline(pipeline, tmp_path / "other")
    summary = train(pipeline, *LOKR, "--max_train_steps", "8", "--save_every_n_steps", "3")
    train(other, *LOKR, "--max_train_steps", "4", "--save_every_n_steps", "3")  # stops at 4 ...
    assert train(other, *LOKR, "--max_train_steps", "8", "--save_every_n_steps", "3")["steps"] == 8  # ... goes on
    a, b = adapter(pipeline), adapter(other)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "lora_unet_single_blocks_1_linear1.lokr_w1" in a and not any("lora_down" in k for k in a)
    assert any(t.abs().sum() > 0 for k, t in a.items() if k.endswith(".lokr_w2_b"))  # trained from zero
    meta = read_metadata(pipeline / "outputs" / "lora" / "lora.safetensors")
    assert meta["flux2.network_type"] == "lokr" and json.loads(meta["ss_network_args"])["factor"] == "4"
    run = MlflowClient(f"sqlite:///{pipeline / 'mlflow.db'}").get_run(summary["mlflow_run_id"])
    assert run.data.params["network.type"] == "lokr" and run.data.params["train.network_module"] == "lycoris.kohya"
    assert run.data.params["train.loraplus_lr_ratio"] == "4.0"
    assert int(run.data.params["network.parameters"]) == sum(t.numel() for k, t in a.items() if "alpha" not in k)

    # A warm start from the LoKr file (train.network_weights) begins at its weights; a LoRA run refuses it.
    start = tmp_path / "lokr.safetensors"
    start.write_bytes((pipeline / "outputs" / "lora" / "lora.safetensors").read_bytes())
    frozen = ("--optimizer_type", "torch.optim.SGD", "--learning_rate", "0", "--max_train_steps", "1",
              "--save_every_n_steps", "0", "--network_weights", str(start))
    train(other, "--network_type", "lokr", *frozen)
    warm = adapter(other)
    assert warm.keys() == a.keys() and all(torch.equal(warm[k], a[k]) for k in a)
    assert main(["train", "--params", str(other / "params.yaml"), *frozen]) == 2
    assert "holds lokr modules but this run trains lora" in capsys.readouterr().err


def test_loraplus_and_per_block_rates_and_ranks_scale_the_first_step(pipeline, tmp_path):
    """One SGD step from zero-initialised up weights: their change is -lr x grad, so LoRA+'s ratio 4 and a double
    block rate of half learning_rate show as exact factors; down weights do not move (their gradient is 0)."""
    other = copy_pipeline(pipeline, tmp_path / "other")
    train(pipeline, *SGD_STEP)
    train(other, *SGD_STEP, "--loraplus_lr_ratio", "4", "--network_args", "double_lr=0.25", "single_dim=[8, 0]",
          "double_alpha=4")
    plain, scaled = adapter(pipeline), adapter(other)
    assert not any(k.startswith("lora_unet_single_blocks_1_") for k in scaled)
    for key, value in scaled.items():
        if key.endswith(".lora_up.weight"):
            # double blocks: ratio 4 x rate 0.25 / 0.5, and alpha 4 of rank 8 halves the scale (and the gradient)
            factor = 4 * 0.5 * 0.5 if "double_blocks" in key else 4
            assert torch.equal(value, factor * plain[key]) and value.abs().sum() > 0, key
        elif key.endswith(".lora_down.weight"):
            assert torch.equal(value, plain[key]), key
    assert scaled["lora_unet_double_blocks_0_img_attn_qkv.alpha"] == 4.0


@pytest.fixture(scope="module")
def adapters(cached_pipeline, tiny_model, tmp_path_factory):
    """A LoHa and a LoKr trained for 6 steps (each its own MLflow run), the LoKr evaluated (small settings), and a
    random LoRA for the tiny DiT: the files by type, and the runs."""
    from flux2.loading import load_dit
    from flux2.variants import VARIANTS
    from tests.test_lora import random_network

    folder = copy_pipeline(cached_pipeline, tmp_path_factory.mktemp("adapters") / "pipeline")
    args = ("--max_train_steps", "6", "--save_every_n_steps", "0", "--learning_rate", "0.01")
    files, runs = {}, {}
    for kind in ("loha", "lokr"):  # lokr last: evaluate reads train.output_name's file
        runs[kind] = train(folder, *args, "--network_type", kind, "--checkpoint_dir", f"checkpoints/{kind}")
        files[kind] = folder / f"{kind}.safetensors"
        files[kind].write_bytes((folder / "outputs" / "lora" / "lora.safetensors").read_bytes())
    assert main(["evaluate", "--params", str(folder / "params.yaml"), "--infer_steps", "1", "--seeds", "0",
                 "--timesteps", "0.5", "--prompts", "a red circle on a blue background"]) == 0
    files["lora"] = folder / "lora.safetensors"
    random_network(load_dit(tiny_model["dit"], VARIANTS["tiny"], device="cpu", dtype=torch.float32)).save(
        files["lora"])
    return folder, files, runs


def test_generate_mixes_them_with_a_lora_merged_equal_to_attached(adapters, tiny_model, tmp_path):
    from tests.test_generate_lora import generate, one

    _, files, _ = adapters
    mixed = ("--lora_weight", str(files["lora"]), str(files["lokr"]), str(files["loha"]),
             "--lora_multiplier", "1.0", "0.8", "1.2")
    base = one(generate(tiny_model, tmp_path / "base"))
    merged = one(generate(tiny_model, tmp_path / "merged", *mixed))
    attached = one(generate(tiny_model, tmp_path / "attached", *mixed, "--no-lora_merge"))
    assert (merged - base).norm() / base.norm() > 1e-3
    torch.testing.assert_close(attached, merged, rtol=1e-5, atol=1e-5)


def test_evaluate_and_compare_treat_them_like_any_lora(adapters):
    from flux2.compare import differing_params, load_runs

    folder, _, runs = adapters
    metrics = json.loads((folder / "metrics" / "eval.json").read_text())
    assert metrics["train_loss"]["lora"] < metrics["train_loss"]["base"]  # the LoKr learned its items
    loaded = load_runs([runs["loha"]["mlflow_run_id"], runs["lokr"]["mlflow_run_id"]],
                       f"sqlite:///{folder / 'mlflow.db'}", "flux2")
    differ = dict(differing_params(loaded))
    assert differ["train.network_type"] == ["loha", "lokr"] and differ["network.type"] == ["loha", "lokr"]
    assert "eval_val_loss_lora" in loaded[1].metrics


def test_adapter_settings_are_in_the_run_fingerprint():
    import dataclasses

    from flux2.params import parse_params
    from flux2.train import run_fingerprint

    base = parse_params({"dataset": {"toml": "x"}})
    prints = {run_fingerprint(dataclasses.replace(base, train=dataclasses.replace(base.train, **change)), "sha",
                              {}, {}, 1)
              for change in ({}, {"network_type": "lokr"}, {"network_args": {"double_dim": 4}},
                             {"loraplus_lr_ratio": 4.0}, {"network_module": "networks.loha"})}
    assert len(prints) == 5


@pytest.mark.parametrize("extra,message", [
    (("--network_type", "lycoris"), "train.network_type: 'lycoris' is not one of lora, lokr, loha"),
    (("--network_module", "networks.lora_wan"), "train.network_module: 'networks.lora_wan' is not one of"),
    (("--network_type", "loha", "--network_module", "networks.lokr"), "the adapter type is given twice"),
    (("--network_args", "factr=8"), "train.network_args.factr: unknown; did you mean factor?"),
    (("--network_args", "factor=4"), "train.network_args.factor: applies to LoKr only"),
    (("--network_args", "double_dim=[1, 2, 3]"), "train.network_args.double_dim: one value for all 2 blocks"),
    (("--network_args", "single_lr=-1"), "train.network_args.single_lr: every value must be positive"),
    (("--network_args", "exclude_patterns=['.*']"), "set train.exclude_patterns"),
    (("--network_type", "loha", "--network_dropout", "0.1"), "train.network_dropout: LoKr and LoHa have no"),
    (("--loraplus_lr_ratio", "0"), "train.loraplus_lr_ratio: must be positive"),
    (("--network_args", "loraplus_lr_ratio=2", "--loraplus_lr_ratio", "4"), "differs from train.loraplus_lr_ratio"),
    (("--network_args", "factor"), "is not key=value"),
])
def test_option_errors_name_the_key(pipeline, capsys, extra, message):
    args = ["train", "--params", str(pipeline / "params.yaml"), *extra]
    if "key=value" in message:  # argparse's own error
        with pytest.raises(SystemExit):
            main(args)
    else:
        assert main(args) == 2
    assert message in capsys.readouterr().err
