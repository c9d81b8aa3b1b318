"""params.yaml is validated before any work: each problem is one line naming the key."""
import pytest

from flux2.cli import main
from flux2.params import ParamsError, load_params, parse_params

ROOT_PARAMS = __import__("pathlib").Path(__file__).resolve().parents[1] / "params.yaml"


def error(data) -> str:
    with pytest.raises(ParamsError) as e:
        parse_params(data)
    return str(e.value)


def test_project_params_are_valid_and_complete():
    import dataclasses

    import yaml

    params = load_params(ROOT_PARAMS, check_paths=False)
    assert params.model.model_version == "tiny"
    # Every key is written out in the project's params.yaml (DVC interpolates only keys that are written).
    data = yaml.safe_load(ROOT_PARAMS.read_text())
    for group in dataclasses.fields(params):
        written = set(data[group.name])
        assert written == {f.name for f in dataclasses.fields(getattr(params, group.name))}, group.name


@pytest.mark.parametrize("data,expected", [
    ({"train": {"learning_rat": 1e-4}}, "train.learning_rat: unknown key; did you mean train.learning_rate?"),
    ({"trian": {}}, "trian: unknown key; did you mean train?"),
    ({"train": {"learning_rate": "fast"}}, "train.learning_rate: expected float, got 'fast'"),
    ({"train": {"network_dim": 1.5}}, "train.network_dim: expected int, got 1.5"),
    ({"train": {"gradient_checkpointing": "yes"}}, "train.gradient_checkpointing: expected bool, got 'yes'"),
    ({"model": {"model_version": "klein-4"}}, "model.model_version: 'klein-4' is not one of"),
    ({"train": {"lr_scheduler": "cosine_annealing"}}, "train.lr_scheduler: 'cosine_annealing' is not one of"),
    ({"dataset": {"sources": [{"image_directory": "x", "resolutoin": 64}]}},
     "dataset.sources[0].resolutoin: unknown key; did you mean dataset.sources[0].resolution?"),
    ({"dataset": {"sources": []}}, "dataset.sources: empty"),
    ({"model": {"fp8_scaled": True}}, "model.fp8_scaled: needs model.fp8_base: true"),
    ({"model": {"model_version": "klein-base-4b", "blocks_to_swap": 20}}, "model.blocks_to_swap: 20 is outside 0..13"),
    ({"eval": {"image_size": [100, 128]}}, "eval.image_size: [height, width], multiples of 16"),
])
def test_one_line_errors_name_the_key(data, expected):
    data.setdefault("dataset", {"sources": [{"image_directory": "x"}]})
    message = error(data)
    assert expected in message and "\n" not in message


@pytest.mark.parametrize("group,key,least", [("train", "network_dim", 1), ("train", "batch_size", 1),
                                             ("train", "gradient_accumulation_steps", 1), ("train", "max_bad_steps", 1),
                                             ("cache", "shard_mb", 1), ("cache", "batch_size", 1),
                                             ("eval", "holdout_min_items", 0)])
def test_counts_below_their_least_value_name_the_key(group, key, least):
    data = {"dataset": {"sources": [{"image_directory": "x"}]}, group: {key: least - 1}}
    assert error(data) == f"params.yaml: {group}.{key}: must be at least {least}, got {least - 1}"
    assert getattr(getattr(parse_params({**data, group: {key: least}}), group), key) == least


def test_missing_paths_and_wrong_text_encoder(tmp_path, tiny_model):
    p = tmp_path / "params.yaml"
    p.write_text("model:\n  dit: nowhere.safetensors\ndataset:\n  sources: [{image_directory: x}]\n")
    with pytest.raises(ParamsError, match="model.dit: nowhere.safetensors does not exist"):
        load_params(p)
    p.write_text(f"model:\n  model_version: dev\n  dit: {tiny_model['dit']}\n  vae: {tiny_model['vae']}\n"
                 f"  text_encoder: {tiny_model['text_encoder']}\ndataset:\n  sources: [{{image_directory: x}}]\n")
    with pytest.raises(ParamsError, match="model.text_encoder: .* is a 'qwen3' model, but dev needs mistral3"):
        load_params(p)


def test_cli_reports_params_errors_in_one_line(tmp_path, capsys):
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  max_train_step: 10\ndataset:\n  sources: [{image_directory: x}]\n")
    assert main(["train", "--params", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.max_train_step: unknown key; did you mean train.max_train_steps?" in err


def test_help_lists_every_option_with_its_default(capsys):
    for command in ("generate", "train", "ingest", "cache-latents", "cache-text", "convert-lora",
                    "make-tiny-model"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert "--" in out and "default" in out, command
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    for name in ("--model_version", "--dit", "--vae", "--text_encoder", "--infer_steps", "--embedded_cfg_scale",
                 "--fp8_scaled", "--blocks_to_swap"):
        assert name in out
