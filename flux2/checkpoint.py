"""Training checkpoints: everything a resumed run needs, in safetensors and JSON (nothing pickled).

A checkpoint is a folder `step-00000100/` holding `lora.safetensors` (network weights), `optimizer.safetensors`
(optimizer state tensors; param groups and scalars as JSON metadata) and `state.json` (step, data position, RNG,
sha256 of the two tensor files). It is written under a temporary name and renamed into place, so a folder named
`step-*` is always complete; `state.json`'s checksums catch later truncation or bit flips, and loading then
falls back to the previous good checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from flux2.safetensors_io import CheckpointError, load_file, read_metadata, save_file_atomic

FORMAT_VERSION = "1"


@dataclass
class TrainState:
    """The loop position saved beside the weights."""

    step: int  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of the current epoch already consumed
    bad_steps: int = 0  # non-finite steps skipped so far
    rng: list[int] = field(default_factory=list)  # torch CPU RNG state bytes
    extra: dict[str, Any] = field(default_factory=dict)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten an optimizer state_dict: tensors by `state.<param>.<name>`, everything else as JSON metadata."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    meta = {"param_groups": json.dumps(sd["param_groups"]), "scalars": json.dumps(scalars)}
    return tensors, meta


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           meta: dict[str, str]) -> None:
    """The inverse of optimizer_tensors."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in json.loads(meta["scalars"]).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})


def save_checkpoint(folder: str | Path, state: TrainState, lora: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, keep_last: int = 2) -> Path:
    """Write `folder/step-XXXXXXXX/` atomically and delete all but the newest `keep_last` checkpoints."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{state.step:08d}"
    tmp = folder / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file_atomic({k: v.detach().cpu().contiguous() for k, v in lora.items()}, tmp / "lora.safetensors")
        opt_tensors, opt_meta = optimizer_tensors(optimizer)
        save_file_atomic(opt_tensors, tmp / "optimizer.safetensors", metadata=opt_meta)
        record = {"format_version": FORMAT_VERSION, **asdict(state),
                  "sha256": {name: sha256_file(tmp / name) for name in ("lora.safetensors", "optimizer.safetensors")}}
        (tmp / "state.json").write_text(json.dumps(record))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(folder)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*") if p.is_dir() and (p / "state.json").is_file())


def verify_checkpoint(path: Path) -> dict:
    """state.json of a checkpoint whose files match their recorded sha256; CheckpointError otherwise."""
    try:
        record = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}/state.json is unreadable ({e})") from None
    for name, digest in record.get("sha256", {}).items():
        file = path / name
        if not file.is_file() or sha256_file(file) != digest:
            raise CheckpointError(f"{file} is missing or corrupted (checksum mismatch)")
    return record


def load_latest_checkpoint(folder: str | Path, optimizer: torch.optim.Optimizer
                           ) -> tuple[TrainState, dict[str, torch.Tensor]] | None:
    """The newest checkpoint that verifies: restores the optimizer, returns (state, lora weights). Corrupted
    ones are reported and skipped in favour of the previous good one; None when there is none."""
    for path in reversed(list_checkpoints(folder)):
        try:
            record = verify_checkpoint(path)
            lora = load_file(path / "lora.safetensors")
            opt_file = path / "optimizer.safetensors"
            load_optimizer_tensors(optimizer, load_file(opt_file), read_metadata(opt_file))
        except CheckpointError as e:
            print(f"warning: skipping checkpoint {path.name}: {e}")
            continue
        fields = {k: record[k] for k in TrainState.__dataclass_fields__ if k in record}
        return TrainState(**fields), lora
    return None
