"""Bad input, round two: files, rows, settings and model files that used to end in a traceback, a hang or a silent
wrong result. Each now ends in a listed skip (reports/ingest.json, with its reason code) or in one error line that
names the file or key and the fix, and leaves nothing partial behind. Stages are called through the CLI's
`main([...])` in-process where a subprocess is not essential; `within` turns a hang into a failure."""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from flux2.cli import main
from tests.conftest import generate_args
from tests.datasets import copy_pipeline
from tests.reliability.helpers import leftovers, one_line_error, within

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="FIFOs, /dev/zero and byte file names are Linux's")


def write_image(path: Path | bytes, colour: tuple[int, int, int], caption: str | None = None,
                size: tuple[int, int] = (64, 48)) -> None:
    Image.new("RGB", size, colour).save(path, format="PNG")
    if caption is not None:
        caption_path = (os.fsencode(path)[:-4] + b".txt") if isinstance(path, bytes) else path.with_suffix(".txt")
        with open(caption_path, "w", encoding="utf-8") as f:
            f.write(caption)


def params_text(sources: str, extra: str = "") -> str:
    return f"dataset:\n  min_side: 32\n  sources:\n{sources}{extra}eval:\n  holdout_fraction: 0.0\n"


# ------------------------------------------------------------------------------------------------ ingest

@contextmanager
def capped_heap(extra: int) -> Iterator[None]:
    """RLIMIT_DATA (heap and anonymous maps) at this process's current size plus `extra` bytes, for the block."""
    now = int(re.search(r"VmData:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (now + extra if hard == resource.RLIM_INFINITY else min(now + extra, hard),
                                              hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def write_bad_dataset(folder: Path) -> dict[str, str]:
    """A folder and three manifests, each with good items and the bad ones of this round; returns the expected
    {name in the report: reason}."""
    ds = folder / "ds"
    ds.mkdir(parents=True)
    for i in range(3):
        write_image(ds / f"good{i}.png", (60 * i, 90, 30), f"good picture {i}")
    os.mkfifo(ds / "x.png")  # opening it for reading would block for ever
    write_image(os.fsencode(ds) + b"/caf\xe9.png", (9, 9, 9), "a Latin-1 file name")
    write_image(ds / "zero.png", (200, 9, 9))
    (ds / "zero.txt").symlink_to("/dev/zero")  # reading it whole never ends
    write_image(ds / "long.png", (9, 200, 9))
    (ds / "long.txt").write_text("word " * 300_000)  # 1.5 MB
    Image.new("RGB", (64, 48), (1, 2, 250)).save(ds / "anim.gif")
    (ds / "anim.txt").write_text("a gif")
    m = folder / "m"
    m.mkdir()
    for i, name in enumerate(["c0", "c1", "c2", "j0", "j1", "p0", "p1"]):
        write_image(m / f"{name}.png", (30, 30 * i, 200))
    (m / "bad.csv").write_text("image_path,caption\nc0.png,a red, big thing\nc1.png," + "a" * 200_000 +
                               "\nc2.png,fine\n")
    rows = [{"image_path": "j0.png", "caption": "two columns for one control", "control_path_1": "c0.png",
             "control_path_01": ["c1.png"]}, {"image_path": "j1.png", "caption": "fine"}]
    (m / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.table({"image_path": ["p0.png", "p1.png"], "caption": ["a", "b"], "control_path": [3, None]}),
                   m / "bad.parquet")
    sources = "".join(f"    - {kind}: {path}\n      resolution: 64\n" for kind, path in
                      (("image_directory", "ds"), ("manifest", "m/bad.csv"), ("manifest", "m/bad.jsonl"),
                       ("manifest", "m/bad.parquet")))
    (folder / "params.yaml").write_text(params_text(sources))
    return {"ds/x.png": "unreadable", "ds/caf\\xe9.png": "bad_file_name", "ds/zero.png": "caption_missing",
            "ds/long.png": "caption_too_long", "ds/anim.gif": "unsupported_format", "bad.csv row 1": "bad_row",
            "m/c1.png": "caption_too_long", "bad.jsonl row 1": "bad_row", "bad.parquet row 1": "control_missing"}


def test_bad_files_and_rows_are_listed_skips_and_the_rest_is_ingested(tmp_path, capsys, monkeypatch):
    """The ingest stage's main, with its heap capped (1 GB more than now), so that reading /dev/zero whole would
    fail fast instead of filling the machine, and a time limit that turns a FIFO's hang into a failure."""
    expected = write_bad_dataset(tmp_path)
    monkeypatch.chdir(tmp_path)
    with within(60), capped_heap(1 << 30):
        assert main(["ingest", "--params", "params.yaml"]) == 0
    report = json.loads((tmp_path / "reports/ingest.json").read_text(encoding="utf-8"))
    got = {r["path"]: reason for reason, rows in report["rejected"].items() for r in rows}
    assert got == expected, report["rejected"]
    details = {r["path"]: r["detail"] for rows in report["rejected"].values() for r in rows}
    assert "named pipe (FIFO)" in details["ds/x.png"] and "/dev/zero" in details["ds/zero.png"]
    assert "rename it" in details["ds/caf\\xe9.png"] and "convert it to PNG" in details["ds/anim.gif"]
    assert "quote a value that holds a comma" in details["bad.csv row 1"]
    assert "control_path_1 and control_path_01" in details["bad.jsonl row 1"]
    assert "control_path is 3, expected a path" in details["bad.parquet row 1"]
    used = sorted(r["image_path"] for r in pq.read_table(tmp_path / "data/manifest.parquet").to_pylist())
    assert used == ["ds/good0.png", "ds/good1.png", "ds/good2.png", "m/c2.png", "m/j1.png", "m/p1.png"]
    assert "caf\\xe9.png" in capsys.readouterr().out  # the printed summary names it too


def test_masks_whose_names_are_not_utf8_are_listed_skips_like_such_images(tmp_path, monkeypatch):
    """A musubi TOML in a Latin-1 folder, its mask_directory beside it: the masks' names are not UTF-8 (their
    images' are). Those items are bad_file_name skips (they used to stop ingest with a UnicodeEncodeError when the
    manifest was written), and so are the items of an image_directory beside it."""
    for name, colour in (("ds", (9, 90, 9)), ("plain", (9, 9, 90))):
        (tmp_path / name).mkdir()
        write_image(tmp_path / name / "a.png", colour, "a picture", (64, 64))  # dataset.min_side is 64
    cfg = os.fsencode(tmp_path) + b"/cfg\xe9"
    os.makedirs(cfg + b"/masks")
    os.makedirs(cfg + b"/images")
    Image.new("L", (64, 64), 255).save(cfg + b"/masks/a.png")
    write_image(cfg + b"/images/b.png", (90, 9, 9), "a picture in the Latin-1 folder", (64, 64))
    with open(cfg + b"/ds.toml", "w") as f:
        f.write(f'[general]\nresolution = 64\n[[datasets]]\nimage_directory = "{tmp_path / "ds"}"\n'
                f'mask_directory = "masks"\n[[datasets]]\nimage_directory = "images"\n'
                f'[[datasets]]\nimage_directory = "{tmp_path / "plain"}"\n')
    monkeypatch.chdir(tmp_path)
    assert main(["ingest", "--dataset_config", os.fsdecode(cfg + b"/ds.toml"), "--holdout_fraction", "0"]) == 0
    report = json.loads((tmp_path / "reports/ingest.json").read_text(encoding="utf-8"))
    assert {r["path"]: reason for reason, rows in report["rejected"].items() for r in rows} == {
        "ds/a.png": "bad_file_name", "cfg\\xe9/images/b.png": "bad_file_name"}
    assert "cfg\\xe9/masks/a.png is not valid UTF-8" in report["rejected"]["bad_file_name"][0]["detail"]
    assert report["sources"][0]["masks"].endswith("cfg\\xe9/masks")
    assert [r["image_path"] for r in pq.read_table(tmp_path / "data/manifest.parquet").to_pylist()] == ["plain/a.png"]


@pytest.mark.parametrize("case, names", [
    ("  report: /proc/no/such/ingest.json\n", ["dataset.report", "/proc/no/such/ingest.json"]),
    ("  report: ds/good0.png/ingest.json\n", ["dataset.report", "good0.png is a file, not a folder"]),
    ("  manifest: ds\n", ["dataset.manifest", "it is a folder"]),
    ("resolution: 100000", ["dataset.sources[0].resolution", "dataset.max_pixels", "a typo?"]),
])
def test_settings_that_cannot_work_stop_ingest_before_it_writes_anything(tmp_path, capsys, case, names):
    ds = tmp_path / "ds"
    ds.mkdir()
    write_image(ds / "good0.png", (1, 2, 3), "a picture")
    source = "    - image_directory: ds\n      resolution: 64\n"
    if case.startswith("resolution"):
        text = params_text(source.replace("resolution: 64", case))
    else:
        text = params_text(source, case)
    (tmp_path / "params.yaml").write_text(text)
    assert main(["ingest", "--params", str(tmp_path / "params.yaml")]) == 2
    one_line_error(capsys.readouterr().err, *names)
    assert not (tmp_path / "data").exists() and not (tmp_path / "reports").exists()


# ------------------------------------------------------------------------------------------------ params.yaml

COMMANDS = ["ingest", "cache-latents", "cache-text", "train", "evaluate"]


@pytest.fixture
def project(tmp_path, tiny_model) -> Path:
    """A folder with a valid params.yaml for the tiny model (nothing ingested: every case fails before)."""
    from tests.datasets import write_params

    (tmp_path / "ds").mkdir()
    write_params(tmp_path, tiny_model)
    return tmp_path


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name, edit, message", [
    ("a YAML syntax error", lambda t: t + "train: [\n", r"params\.yaml:\d+:\d+: not valid YAML"),
    ("a python tag", lambda t: "model: !!python/object/apply:os.system ['touch pwned']\n",
     r"params\.yaml:1:8: .*python/object/apply:os\.system.*no !!python or other tags"),
    ("a list at the top", lambda t: "- 1\n- 2\n", r"params\.yaml: expected a mapping of groups"),
    ("a duplicated key", lambda t: t.replace("  learning_rate: 0.002\n", "  learning_rate: 0.002\n  seed: 3\n"
                                             "  learning_rate: 0.5\n"),
     r"params\.yaml:\d+:3: learning_rate is given twice \(lines \d+ and \d+\); keep one"),
    ("a group that is not a mapping", lambda t: t + "cache: 5\n", r"params\.yaml: cache: expected a mapping"),
])
def test_a_broken_params_file_is_one_line_from_every_stage(project, capsys, monkeypatch, command, name, edit,
                                                            message):
    params = project / "params.yaml"
    params.write_text(edit(params.read_text()))
    monkeypatch.chdir(project)
    assert main([command, "--params", "params.yaml"]) == 2, name
    assert re.search(message, one_line_error(capsys.readouterr().err)), name
    assert not (project / "pwned").exists()


def test_a_dataset_group_that_is_not_a_mapping_beside_a_dataset_config_is_one_line(project, capsys, monkeypatch):
    import yaml

    params = project / "params.yaml"
    params.write_text(yaml.safe_dump({**yaml.safe_load(params.read_text()), "dataset": 5}))
    (project / "data.toml").write_text("[general]\nresolution = [64, 64]\n")
    monkeypatch.chdir(project)
    assert main(["train", "--params", "params.yaml", "--dataset_config", "data.toml"]) == 2
    assert re.search(r"params\.yaml: dataset: expected a mapping", one_line_error(capsys.readouterr().err))


def write_trap_module(folder: Path) -> Path:
    """A module whose import leaves a marker file: proof that optimizer_type imported it."""
    marker = folder / "imported"
    (folder / "flux2_trap.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Opt:\n    pass\n")
    return marker


@pytest.mark.parametrize("setting, names", [
    ("max_train_steps: 0", ["train.max_train_steps: must be at least 1, got 0"]),
    ("max_train_steps: -5", ["train.max_train_steps: must be at least 1, got -5"]),
    ("max_train_epochs: 0", ["train.max_train_epochs: must be at least 1"]),
    ("log_every_n_steps: 0", ["train.log_every_n_steps: must be at least 1, got 0"]),
    ("learning_rate: .nan", ["train.learning_rate: expected a finite number, got nan"]),
    ("optimizer_args: {betas1: [0.9, 0.99]}", ["train.optimizer_args.betas1", "did you mean betas?"]),
    ("optimizer_args: {betas: '0.9'}", ["train.optimizer_args.betas: expected a list of 2 numbers"]),
    ("optimizer_args: {weight_decay: [1]}", ["train.optimizer_args.weight_decay: expected a finite number"]),
    ("optimizer_args: {betas: [2.0, 0.9]}", ["train.optimizer_args: AdamW refuses", "Invalid beta parameter"]),
    ("optimizer_args: {lr: 0.1}", ["train.optimizer_args.lr: set train.learning_rate instead"]),
    ("optimizer_type: os.system", ["train.optimizer_type: 'os.system' is not an optimizer", "torch.optim"]),
    ("optimizer_type: flux2_trap.Opt", ["train.optimizer_type: 'flux2_trap.Opt' is not an optimizer"]),
    ("optimizer_type: torch.optim.lr_scheduler.LambdaLR", ["is not a torch.optim.Optimizer"]),
    ("optimizer_type: torch.optim.Adamm", ["train.optimizer_type: 'torch.optim.Adamm' cannot be imported"]),
    ("optimizer_type: prodigyopt.Prodigy", ["needs prodigyopt, which is not installed"]),
    ("device: gpu", ["model.device: 'gpu' is not a device; use auto, cpu, cuda or cuda:N"]),
])
def test_settings_that_cannot_train_are_one_line_naming_the_key(project, capsys, monkeypatch, setting, names):
    if "prodigyopt" in setting and __import__("importlib").util.find_spec("prodigyopt"):
        pytest.skip("prodigyopt is installed here")
    marker = write_trap_module(project)
    monkeypatch.syspath_prepend(str(project))
    params = project / "params.yaml"
    data = yaml.safe_load(params.read_text())
    data["model" if setting.startswith("device") else "train"].update(yaml.safe_load(setting))
    params.write_text(yaml.safe_dump(data))
    assert main(["train", "--params", str(params)]) == 2
    one_line_error(capsys.readouterr().err, *names)
    assert not marker.exists(), "optimizer_type imported a module that is no optimizer package"
    assert not (project / "outputs").exists() and not (project / "mlflow.db").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("command", ["train", "cache-latents"])
def test_cuda_on_a_machine_without_it_is_one_line(cached_pipeline, tmp_path, capsys, command):
    folder = copy_pipeline(cached_pipeline, tmp_path / "p")
    params = folder / "params.yaml"
    params.write_text(params.read_text().replace("model:\n", "model:\n  device: cuda\n", 1))
    shutil.rmtree(folder / "cache/latents")  # so that cache-latents has work to do
    assert main([command, "--params", str(params)]) == 2
    one_line_error(capsys.readouterr().err, "device 'cuda': no CUDA device is available here", "use auto or cpu")


def test_a_tracking_server_that_is_down_fails_in_seconds(project, capsys):
    with socket.socket() as s:  # a port on this machine where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    params = project / "params.yaml"
    params.write_text(re.sub(r"tracking_uri: .*", f"tracking_uri: http://127.0.0.1:{port}", params.read_text()))
    with within(20):  # MLflow alone retries for minutes
        assert main(["train", "--params", str(params)]) == 2
    one_line_error(capsys.readouterr().err, f"http://127.0.0.1:{port}", "tracking.tracking_uri", "no server answers",
                   "Connection refused")


# ------------------------------------------------------------------------------------------------ text encoder


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage, names", [
    (lambda te: truncate(te / "model.safetensors"), ["model.safetensors is truncated", "download it again"]),
    (lambda te: (te / "config.json").write_text("[1, 2]"), ["config.json", "must be a JSON object, got list"]),
    (lambda te: truncate(te / "config.json"), ["config.json", "is not valid JSON"]),
    (lambda te: (te / "config.json").write_text("{}"), ["config.json: no model_type"]),
    (lambda te: truncate(te / "tokenizer.json"), ["tokenizer.json", "is not valid JSON", "copy it again"]),
    (lambda te: truncate(te / "tokenizer_config.json"), ["tokenizer_config.json", "is not valid JSON"]),
])
def test_a_damaged_text_encoder_folder_is_named_by_cache_text(cached_pipeline, tiny_model, tmp_path, capsys, damage,
                                                              names):
    folder = copy_pipeline(cached_pipeline, tmp_path / "p")
    te = shutil.copytree(tiny_model["text_encoder"], tmp_path / "te")
    params = folder / "params.yaml"
    params.write_text(params.read_text().replace(str(tiny_model["text_encoder"]), str(te)))
    damage(te)
    before = sorted(p.name for p in (folder / "cache/text").rglob("*"))
    assert main(["cache-text", "--params", str(params), "--prompt", "a prompt that is not cached yet"]) == 2
    one_line_error(capsys.readouterr().err, *names)
    assert sorted(p.name for p in (folder / "cache/text").rglob("*")) == before  # nothing written or removed


# ------------------------------------------------------------------------------------------------ models


@pytest.fixture(scope="module")
def bad_models(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """A DiT whose weights are all NaN, and kohya LoRA files for the tiny DiT: finite, with a NaN, with an inf."""
    from flux2.loading import load_dit
    from flux2.lora import create_network

    folder = tmp_path_factory.mktemp("bad_models")
    dit = load_file(tiny_model["dit"])
    save_file({k: torch.full_like(v, float("nan")) for k, v in dit.items()}, folder / "nan_dit.safetensors")
    torch.manual_seed(0)
    network = create_network(load_dit(tiny_model["dit"], "tiny", dtype=torch.float32), 4, 4.0)
    sd = {k: (torch.randn_like(v) * 0.01 if "lora_up" in k else v) for k, v in network.kohya_state_dict().items()}
    files = {"nan_dit": folder / "nan_dit.safetensors"}
    for name, value in (("lora", None), ("nan_lora", float("nan")), ("inf_lora", float("inf"))):
        damaged = dict(sd)
        if value is not None:
            key = next(k for k in sd if "lora_down" in k)
            damaged[key] = sd[key].clone()
            damaged[key][0, 0] = value
        files[name] = folder / f"{name}.safetensors"
        save_file(damaged, files[name])
    return files


SMALL_IMAGE = ("--prompt", "a red circle", "--image_size", "64", "64", "--infer_steps", "2", "--seed", "1")


@pytest.mark.parametrize("case, extra, names", [
    ("nan dit", [], ["hold NaN or inf, so no image was written", "nan_dit.safetensors"]),
    ("nan lora", ["--lora_weight", "{nan_lora}"], ["nan_lora.safetensors", "hold NaN or inf",
                                                   "use an earlier checkpoint"]),
    ("inf lora", ["--lora_weight", "{inf_lora}"], ["inf_lora.safetensors", "hold NaN or inf"]),
    ("nan multiplier", ["--lora_weight", "{lora}", "--lora_multiplier", "nan"],
     ["--lora_multiplier nan: must be a finite number"]),
    ("inf guidance", ["--embedded_cfg_scale", "inf"], ["--embedded_cfg_scale inf: must be a finite number"]),
    ("bad pattern", ["--lora_weight", "{lora}", "--include_patterns", "("],
     ["--include_patterns '(' is not a valid regular expression"]),
    ("merge a nan lora", ["--lora_weight", "{nan_lora}", "--save_merged_model", "{out}/merged.safetensors"],
     ["nan_lora.safetensors", "hold NaN or inf"]),
    ("merge into a nan dit", ["--lora_weight", "{lora}", "--save_merged_model", "{out}/merged.safetensors"],
     ["refusing to write", "merged.safetensors", "tensors of the merged DiT hold NaN or inf"]),
])
def test_non_finite_models_and_options_make_no_black_image(tiny_model, bad_models, tmp_path, capsys, case, extra,
                                                           names):
    out = tmp_path / "out"
    files = dict(tiny_model, dit=bad_models["nan_dit"]) if "nan dit" in case else tiny_model
    args = generate_args(files, out, *SMALL_IMAGE, *[a.format(out=out, **bad_models) for a in extra])
    assert main(args) == 2, case
    one_line_error(capsys.readouterr().err, *names)
    assert not out.exists() or not [p for p in out.iterdir()], sorted(out.iterdir())  # no image, no model
    assert not leftovers(tmp_path)


def test_the_finite_lora_of_these_cases_generates(tiny_model, bad_models, tmp_path):
    """The control case: the same command with the good LoRA writes an image."""
    out = tmp_path / "out"
    assert main(generate_args(tiny_model, out, *SMALL_IMAGE, "--lora_weight", str(bad_models["lora"]))) == 0
    assert len(list(out.glob("*.png"))) == 1
