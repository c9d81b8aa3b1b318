"""Corruption: a truncated or bit-flipped shard, index or checkpoint is caught by its checksum when read, named
in the error, and then remade (the cache stage re-encodes the damaged entries) or skipped for the previous good
checkpoint. Nothing damaged is ever trained on: training stops at a damaged cache entry, and a damaged
checkpoint is never resumed from (the resumed run ends bit-equal to an uninterrupted one)."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from flux2.cache_store import INDEX_FILE, CacheCorruptError, CacheReader, read_index
from flux2.cli import main
from tests.reliability.helpers import assert_same_tensors, cache_contents


def flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def entry_offset(cache_dir: Path, key: str) -> tuple[Path, int]:
    """The shard holding `key` and the file offset of the middle of its data."""
    from flux2.safetensors_io import read_header

    row = next(r for r in read_index(cache_dir)[0] if r["key"] == key)
    shard = cache_dir / row["shard"]
    header, data_offset = read_header(shard)
    begin, end = header[row["tensor"]]["data_offsets"]
    return shard, data_offset + (begin + end) // 2


def train_item_key(pipeline: Path) -> str:
    from flux2.cache_latents import read_item_map

    return next(v.latent_key for v in read_item_map(pipeline / "cache/latents").values() if v.split == "train")


def test_bit_flipped_latent_is_named_never_trained_on_and_reencoded(pipeline, capsys):
    cache_dir = pipeline / "cache/latents"
    before = cache_contents(cache_dir)
    key = train_item_key(pipeline)
    shard, offset = entry_offset(cache_dir, key)
    flip_bit(shard, offset)

    with pytest.raises(CacheCorruptError, match=rf"{shard}: entry {key} fails its checksum.*rerun cache_latents"):
        CacheReader(cache_dir).get(key)
    # Training reads every train item within its first epoch: it must stop there, naming the shard.
    assert main(["train", "--params", str(pipeline / "params.yaml"), "--max_train_steps", "12"]) == 2
    err = capsys.readouterr().err
    assert str(shard) in err and key in err and "rerun cache_latents" in err
    assert not (pipeline / "outputs/lora/lora.safetensors").exists()

    assert main(["cache-latents", "--params", str(pipeline / "params.yaml")]) == 0
    report = json.loads((pipeline / "reports/cache_latents.json").read_text())
    assert report["damaged"] == 1 and report["encoded"] == 1 and report["encoded_labels"]
    assert any(str(shard) in p and key in p for p in report["problems"])
    assert_same_tensors(cache_contents(cache_dir), before, "latents after re-encoding", exact=False)


def test_truncated_text_shard_is_named_and_its_entries_reencoded(pipeline):
    cache_dir = pipeline / "cache/text"
    before = cache_contents(cache_dir)
    shard = cache_dir / read_index(cache_dir)[0][0]["shard"]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    with pytest.raises(CacheCorruptError, match=rf"{shard} is truncated.*rerun cache_text"):
        for key in before:
            CacheReader(cache_dir).get(key)
    assert main(["cache-text", "--params", str(pipeline / "params.yaml")]) == 0
    report = json.loads((pipeline / "reports/cache_text.json").read_text())
    assert report["damaged"] >= 1 and report["encoded"] == report["damaged"]
    assert_same_tensors(cache_contents(cache_dir), before, "text cache after re-encoding", exact=False)
    assert not shard.exists()  # the damaged shard is gone, not kept beside its replacement


def test_damaged_index_is_named_and_rebuilt_from_the_shards(pipeline):
    cache_dir = pipeline / "cache/latents"
    before = cache_contents(cache_dir)
    index = cache_dir / INDEX_FILE
    index.write_bytes(index.read_bytes()[:-100])

    with pytest.raises(CacheCorruptError, match=rf"{index} cannot be read"):
        CacheReader(cache_dir)
    assert main(["cache-latents", "--params", str(pipeline / "params.yaml")]) == 0
    report = json.loads((pipeline / "reports/cache_latents.json").read_text())
    assert report["encoded"] == 0 and report["recovered"] == len(before)  # every entry recovered, none re-encoded
    assert_same_tensors(cache_contents(cache_dir), before, "latents after rebuilding the index")
    pq.read_table(index)


TRAIN = ["--max_train_steps", "12", "--save_every_n_steps", "2"]


def run_train(pipeline: Path) -> dict:
    assert main(["train", "--params", str(pipeline / "params.yaml"), *TRAIN]) == 0
    return load_file(pipeline / "outputs/lora/lora.safetensors")


def damage(checkpoint: Path, how: str) -> Path:
    """Damage one file of a checkpoint folder; returns the file."""
    if how == "lora bit flip":
        file = checkpoint / "lora.safetensors"
        flip_bit(file, file.stat().st_size - 7)
    elif how == "optimizer truncated":
        file = checkpoint / "optimizer.safetensors"
        file.write_bytes(file.read_bytes()[:1000])
    else:  # a bit flip in state.json that still parses: the step 12 becomes 13
        file = checkpoint / "state.json"
        text = file.read_text()
        assert '"step": 12' in text
        file.write_text(text.replace('"step": 12', '"step": 13'))
    return file


def test_damaged_checkpoints_are_skipped_for_the_previous_good_one(pipeline, capsys):
    """After a complete run (checkpoints at steps 10 and 12), damage step 12 three ways, then both: each rerun
    names the damaged file, resumes from the newest good checkpoint (or from scratch) and ends with the LoRA of
    the uninterrupted run, bit for bit: the damaged weights were never used."""
    expected = run_train(pipeline)
    (folder,) = (pipeline / "checkpoints").glob("*/")  # one configuration: checkpoints/<fingerprint>/
    last, previous = folder / "step-00000012", folder / "step-00000010"
    for how in ("lora bit flip", "optimizer truncated", "state.json step changed"):
        file = damage(last, how)
        capsys.readouterr()
        assert_same_tensors(run_train(pipeline), expected, f"LoRA after a damaged checkpoint ({how})")
        out = capsys.readouterr().out
        assert f"warning: skipping checkpoint step-00000012: {file}" in out, out
        assert "resuming from" in out and "step-00000010" in out

    damage(last, "lora bit flip")
    damage(previous, "optimizer truncated")
    capsys.readouterr()
    assert_same_tensors(run_train(pipeline), expected, "LoRA after both checkpoints were damaged")
    out = capsys.readouterr().out
    assert "skipping checkpoint step-00000012" in out and "skipping checkpoint step-00000010" in out
    assert "resuming from" not in out
