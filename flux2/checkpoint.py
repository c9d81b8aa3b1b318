"""Training checkpoints: everything a resumed run needs, in safetensors and JSON (nothing pickled).

A checkpoint is a folder `step-00000100/` holding `lora.safetensors` (network weights), `optimizer.safetensors`
(optimizer state tensors; param groups and scalars as JSON metadata), in runs with an EMA `ema.safetensors` (its
averages and update count) and `state.json` (step, data position, RNG, sha256 of the tensor files, and of the
record itself). It is written under a temporary name and renamed into place, so a folder named `step-*` is always
complete; the checksums catch later truncation or bit flips (in any of the files), and loading then falls back to
the previous good checkpoint.
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

from flux2.atomic import sha256_file
from flux2.lora_formats import check_finite
from flux2.safetensors_io import CheckpointError, load_file, read_metadata, save_file_atomic

FORMAT_VERSION = "1"
FILES = ("lora.safetensors", "optimizer.safetensors")
OPTIONAL_FILES = ("ema.safetensors",)  # the EMA of the weights (flux2.ema), in runs that keep one


@dataclass
class TrainState:
    """The loop position saved beside the weights."""

    step: int  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of the current epoch already consumed
    bad_steps: int = 0  # non-finite steps skipped so far
    rng: list[int] = field(default_factory=list)  # torch CPU RNG state bytes
    extra: dict[str, Any] = field(default_factory=dict)



def record_digest(record: dict) -> str:
    """sha256 of a state.json record without its own `record_sha256` (canonical JSON)."""
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten an optimizer state_dict: tensors by `state.<param>.<name>` (nested dicts, such as bitsandbytes'
    quantisation state, as `<name>/<inner name>`), everything else as JSON metadata."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}

    def walk(idx: int, path: str, value: Any) -> None:
        if isinstance(value, dict):
            for name, inner in value.items():
                walk(idx, f"{path}/{name}", inner)
        elif torch.is_tensor(value):
            # clone: bitsandbytes shares one qmap tensor between parameters, and safetensors refuses sharing
            tensors[f"state.{idx}.{path}"] = value.detach().cpu().clone()
        else:
            scalars[f"{idx}.{path}"] = value

    for idx, state in sd["state"].items():
        for name, value in state.items():
            walk(idx, name, value)
    meta = {"param_groups": json.dumps(sd["param_groups"]), "scalars": json.dumps(scalars)}
    return tensors, meta


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           meta: dict[str, str]) -> None:
    """The inverse of optimizer_tensors."""
    state: dict[int, dict[str, Any]] = {}

    def put(idx: int, path: str, value: Any) -> None:
        *outer, name = path.split("/")
        node = state.setdefault(idx, {})
        for part in outer:
            node = node.setdefault(part, {})
        node[name] = value

    for key, value in tensors.items():
        _, idx, path = key.split(".", 2)
        put(int(idx), path, value)
    for key, value in json.loads(meta["scalars"]).items():
        idx, path = key.split(".", 1)
        put(int(idx), path, value)
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})


def checkpoint_folder(folder: str | Path, step: int) -> Path:
    """Where the checkpoint after optimizer step `step` lives."""
    return Path(folder) / f"step-{step:08d}"


def save_checkpoint(folder: str | Path, state: TrainState, lora: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, keep_last: int = 2,
                    ema: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `folder/step-XXXXXXXX/` atomically and delete all but the newest `keep_last` checkpoints; `ema` (the
    EMA's state, if the run keeps one) goes into `ema.safetensors`. LoRA weights holding NaN or inf are refused
    (ValueError): such a checkpoint could only ruin a resumed run."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = checkpoint_folder(folder, state.step)
    check_finite(lora, final / "lora.safetensors")
    if ema is not None:
        check_finite(ema, final / "ema.safetensors")
    for stale in folder.glob(".tmp-step-*"):  # left by a run that was killed while writing (one writer per folder)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file_atomic({k: v.detach().cpu().contiguous() for k, v in lora.items()}, tmp / "lora.safetensors")
        opt_tensors, opt_meta = optimizer_tensors(optimizer)
        save_file_atomic(opt_tensors, tmp / "optimizer.safetensors", metadata=opt_meta)
        if ema is not None:
            save_file_atomic({k: v.detach().cpu().contiguous() for k, v in ema.items()}, tmp / "ema.safetensors")
        names = FILES + (("ema.safetensors",) if ema is not None else ())
        record = {"format_version": FORMAT_VERSION, **asdict(state),
                  "sha256": {name: sha256_file(tmp / name) for name in names}}
        record["record_sha256"] = record_digest(record)
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
    """state.json of a checkpoint whose record and files match their recorded sha256; CheckpointError otherwise."""
    state_file = path / "state.json"
    try:
        record = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{state_file} is unreadable ({e})") from None
    if not isinstance(record, dict) or record.get("record_sha256") != record_digest(record):
        raise CheckpointError(f"{state_file} is corrupted (checksum mismatch) or not a checkpoint record")
    digests = record.get("sha256")
    if not isinstance(digests, dict) or not set(FILES) <= set(digests) <= set(FILES + OPTIONAL_FILES):
        raise CheckpointError(f"{state_file} lacks the checksums of {' and '.join(FILES)}")
    for name in digests:
        file = path / name
        if not file.is_file() or sha256_file(file) != digests[name]:
            raise CheckpointError(f"{file} is missing or corrupted (checksum mismatch)")
    ints = ("step", "epoch", "batch_in_epoch", "bad_steps")
    if not (all(type(record.get(k, 0)) is int and record.get(k, 0) >= 0 for k in ints) and "step" in record
            and isinstance(record.get("rng", []), list) and isinstance(record.get("extra", {}), dict)):
        raise CheckpointError(f"{state_file} has malformed fields ({', '.join(ints)}, rng, extra)")
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
            try:
                load_optimizer_tensors(optimizer, load_file(opt_file), read_metadata(opt_file))
            except CheckpointError:
                raise
            except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:  # state of another optimizer
                raise CheckpointError(f"{opt_file} does not fit this optimizer ({type(e).__name__}: {e})") from None
        except CheckpointError as e:
            print(f"warning: skipping checkpoint {path.name}: {e}")
            continue
        fields = {k: record[k] for k in TrainState.__dataclass_fields__ if k in record}
        return TrainState(**fields), lora
    return None


def load_ema_state(folder: str | Path, state: TrainState) -> dict[str, torch.Tensor] | None:
    """The EMA state saved with the checkpoint that `load_latest_checkpoint` returned `state` from (it verified
    the file's checksum too), or None when that checkpoint holds none."""
    path = checkpoint_folder(folder, state.step) / "ema.safetensors"
    return load_file(path) if path.is_file() else None
