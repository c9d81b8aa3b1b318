"""Security: nothing is ever unpickled (the package is scanned, and a booby-trapped pickle is fed to every reader);
paths from manifests and prompt files stay inside their roots; the documented MLflow UI listens on 127.0.0.1."""
from __future__ import annotations

import ast
import json
import os
import pickle
import re
import sys
from pathlib import Path

import pytest
import torch

from tests.reliability.helpers import ROOT

PACKAGES = [ROOT / "flux2", ROOT / "stages"]
UNPICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def python_files() -> list[Path]:
    return sorted(p for folder in PACKAGES for p in folder.rglob("*.py"))


def dotted(node: ast.AST) -> str:
    """`torch.load` for the expression torch.load, '' for anything that is not a plain dotted name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else node.attr
    return ""


def keyword(call: ast.Call, name: str) -> object:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expression>"
    return None


def unpickling_sites() -> list[str]:
    problems = []
    for path in python_files():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            where = f"{path}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                problems += [f"{where}: import {a.name}" for a in node.names
                             if a.name.split(".")[0] in UNPICKLING_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLING_MODULES:
                problems.append(f"{where}: from {node.module} import ...")
            elif isinstance(node, ast.Call):
                name = dotted(node.func)
                if name in ("torch.load", "torch.serialization.load") and keyword(node, "weights_only") is not True:
                    problems.append(f"{where}: {name} without weights_only=True")
                elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
                    problems.append(f"{where}: {name} (use yaml.safe_load)")
                elif name.endswith(("np.load", "numpy.load")) and keyword(node, "allow_pickle") is not None:
                    problems.append(f"{where}: {name} with allow_pickle")
                elif name.endswith("read_pickle"):
                    problems.append(f"{where}: {name}")
    return problems


def test_the_package_never_unpickles():
    assert python_files() and not unpickling_sites(), unpickling_sites()


def test_the_scan_finds_what_it_looks_for(tmp_path, monkeypatch):
    """The scanner itself: each forbidden form in a scratch package is reported."""
    bad = tmp_path / "flux2"
    bad.mkdir()
    (bad / "bad.py").write_text("import pickle\nfrom dill import loads\nimport torch, yaml, numpy as np\n"
                                "torch.load('x')\ntorch.load('x', weights_only=False)\ntorch.load('x', weights_only=True)\n"
                                "yaml.load('a')\nnp.load('x', allow_pickle=True)\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGES", [bad])
    found = unpickling_sites()
    assert len(found) == 6, found


def test_hugging_face_models_are_read_from_safetensors_only():
    """from_pretrained of a model (not a tokenizer, config or processor) must say use_safetensors=True, or a
    folder holding only pytorch_model.bin would be unpickled."""
    problems = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and dotted(node.func).endswith(".from_pretrained"):
                owner = dotted(node.func).rsplit(".", 1)[0]
                if not re.search(r"Tokenizer|Config|Processor", owner) and keyword(node, "use_safetensors") is not True:
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: {owner}.from_pretrained")
    assert not problems, problems


class Trap:
    """Unpickling this creates a marker file: proof that something was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_booby_trapped_pickle_is_refused_by_every_reader(tmp_path):
    from flux2.cache_store import CacheCorruptError, CacheReader, ShardWriter, write_index
    from flux2.checkpoint import TrainState, load_latest_checkpoint, save_checkpoint
    from flux2.loading import check_ae, check_dit, load_dit
    from flux2.lora_formats import read_lora
    from flux2.safetensors_io import load_file

    marker = tmp_path / "unpickled"
    trap = tmp_path / "model.safetensors"
    trap.write_bytes(pickle.dumps({"w": Trap(marker)}))
    torch.save({"w": Trap(marker)}, tmp_path / "zip.safetensors")  # torch's zip format: starts with PK
    for file in (trap, tmp_path / "zip.safetensors"):
        for read in (load_file, read_lora, lambda p: check_dit(p, "tiny"), lambda p: check_ae(p, "tiny"),
                     lambda p: load_dit(p, "tiny")):
            with pytest.raises(ValueError, match="pickle"):
                read(file)
    # A checkpoint whose LoRA was replaced by the pickle (its checksum updated too): skipped, never loaded.
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param])
    path = save_checkpoint(tmp_path / "ckpt", TrainState(step=1), {"w": param.detach()}, optimizer)
    os.replace(trap, path / "lora.safetensors")
    assert load_latest_checkpoint(tmp_path / "ckpt", optimizer) is None
    # A cache shard replaced by the pickle.
    writer = ShardWriter(tmp_path / "cache", {"kind": "latents"}, 1, "latents-x")
    writer.add("k", torch.zeros(2))
    write_index(tmp_path / "cache", writer.rows(), {"kind": "latents"})
    (tmp_path / "cache/shards/latents-x-0000.safetensors").write_bytes(pickle.dumps(Trap(marker)))
    with pytest.raises(CacheCorruptError, match="pickle"):
        CacheReader(tmp_path / "cache").get("k")
    assert not marker.exists()


def test_manifest_paths_stay_inside_the_dataset_root(tmp_path):
    from PIL import Image

    from flux2.ingest import ingest
    from flux2.params import DatasetParams, SourceParams

    root, outside = tmp_path / "data", tmp_path / "secret"
    root.mkdir()
    outside.mkdir()
    for folder in (root, outside):
        Image.new("RGB", (64, 64), (9, 9, 9) if folder == root else (200, 1, 1)).save(folder / "im.png")
    (root / "link.png").symlink_to(outside / "im.png")
    rows = [{"image_path": "../secret/im.png", "caption": "up and out"},
            {"image_path": str(outside / "im.png"), "caption": "absolute"},
            {"image_path": "link.png", "caption": "a link that leaves"},
            {"image_path": "im.png", "caption": "good, but its control leaves", "control_path": "../secret/im.png"},
            {"image_path": "im.png", "caption": "the one good row"}]
    (root / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dataset = DatasetParams(sources=[SourceParams(manifest=str(root / "m.jsonl"), resolution=64)], min_side=32)
    result = ingest(dataset, 0.0, base=tmp_path, progress=False)
    assert [i.caption for i in result.items] == ["the one good row"]
    assert [r.reason for r in result.rejected] == ["path_outside_root"] * 4


def test_prompt_file_control_images_stay_inside_its_folder(tmp_path):
    from flux2.prompts import PromptFileError, read_prompt_file

    folder = tmp_path / "prompts"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs/a.png").touch()
    (tmp_path / "secret.png").touch()
    (folder / "refs/link.png").symlink_to(tmp_path / "secret.png")
    file = folder / "sample.txt"
    file.write_text("an edit --ci refs/a.png --ci ./refs/../refs/a.png\n")
    assert read_prompt_file(file)[0].control_images == [str((folder / "refs/a.png").resolve())] * 2
    for value in ("../secret.png", str(tmp_path / "secret.png"), "refs/link.png", "~/x.png"):
        file.write_text(f"a prompt\nan edit --ci {value}\n")
        with pytest.raises(PromptFileError, match=rf"{re.escape(str(file))}:2: --ci .* outside the prompt file's"):
            read_prompt_file(file)


def test_docs_start_the_mlflow_ui_on_localhost_only():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    text = {p: p.read_text(encoding="utf-8") for p in docs if p.is_file()}
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1" in text[ROOT / "docs/reliability.md"]
    for path, content in text.items():
        for line in content.splitlines():
            if re.search(r"mlflow (ui|server)", line) and "--host" in line:
                assert "--host 127.0.0.1" in line, f"{path}: {line}"
            assert "0.0.0.0" not in line, f"{path}: {line}"
