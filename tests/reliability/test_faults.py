"""Faults, round two: full disks under the MLflow store and under ingest's outputs, and a bit flip in the latent
cache's items.parquet. Each is one error line naming the file and what to do, with nothing partial left behind;
the next run, with the fault gone, works. Full disks are simulated as in test_disk_full.py (RLIMIT_FSIZE, SIGXFSZ
ignored, so a write past the limit fails with EFBIG as on a full disk)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flux2.cache_store import ROWS_SHA_KEY
from flux2.cli import main
from tests.datasets import copy_pipeline
from tests.reliability.helpers import leftovers, one_line_error, subprocess_env

# One process for the three full disks (imports and the store's migrations are the slow part): each step sets the
# file-size limit (the soft one, so that the next step can lift it), runs the CLI's main and prints its result.
FULL_DISKS = """
import resource, signal, sys
from pathlib import Path
from mlflow.tracking import MlflowClient
from flux2.cli import main
from flux2.tracking import experiment_id, init_store

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
db = Path(sys.argv[1])
uri = f"sqlite:///{db}"
train = ["train", "--params", "params.yaml", "--max_train_steps", "2", "--save_every_n_steps", "0"]


def step(name, limit, args):
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    rc = main(args)
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    print(f"== step {name}", file=sys.stderr, flush=True)  # ends the step's part of stderr
    print(name.replace(" ", "_"), rc, db.exists(), flush=True)


step("ingest", 1000, ["ingest", "--params", "params.yaml"])
step("ingest again", resource.RLIM_INFINITY, ["ingest", "--params", "params.yaml"])
step("new store", 50_000, train)
init_store(uri)
experiment_id(MlflowClient(uri), "flux2", uri)
step("existing store", db.stat().st_size, train)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE semantics are Linux's")
def test_full_disks_under_ingest_outputs_and_the_mlflow_store_are_one_line_naming_the_file(cached_pipeline, tmp_path):
    """ingest: its manifest and report are written together or not at all, and the rerun with space works. The
    MLflow store: a new one cannot be created (its tables take ~1 MB), then an existing one cannot grow by a
    page: one line naming the database each time, no half-made database, no LoRA, and not MLflow's own logged
    traceback."""
    folder = copy_pipeline(cached_pipeline, tmp_path / "p")
    for output in ("data/manifest.parquet", "reports/ingest.json"):
        (folder / output).unlink()
    db = Path(re.search(r"sqlite:///(\S+)", (folder / "params.yaml").read_text())[1])
    done = subprocess.run([sys.executable, "-c", FULL_DISKS, str(db)], cwd=folder, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = {"ingest": "2 False", "ingest_again": "0 False", "new_store": "2 False", "existing_store": "2 True"}
    got = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.split(" ")[0] in steps)
    assert got == steps, done.stdout + done.stderr[-3000:]  # return code, and whether the database exists
    parts = re.split(r"== step .*\n", done.stderr)
    one_line_error(parts[0], "could not write", "data/manifest.parquet", "File too large")
    for part in parts[2:4]:
        one_line_error(part, f"could not write the MLflow store {db}", "free disk space")
    assert not leftovers(folder) and not (folder / "outputs/lora/lora.safetensors").exists()


def flip_in_string(path: Path, value: str) -> None:
    """Flip one bit inside `value` where the Parquet file stores it (a bit flip that Parquet itself reads as
    another, valid value)."""
    data = bytearray(path.read_bytes())
    at = data.index(value.encode()) + len(value) // 2
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["bit flip in a key", "rows changed, checksum kept", "truncated"])
def test_a_damaged_items_parquet_is_named_and_rebuilt_by_cache_latents(cached_pipeline, tmp_path, capsys, damage):
    folder = copy_pipeline(cached_pipeline, tmp_path / "p")
    items = folder / "cache/latents/items.parquet"
    table = pq.read_table(items)
    if damage == "bit flip in a key":
        flip_in_string(items, table.column("latent_key")[3].as_py())
    elif damage == "rows changed, checksum kept":
        widths = table.column("bucket_width").to_pylist()
        changed = table.set_column(table.schema.get_field_index("bucket_width"), "bucket_width",
                                   pa.array([w + 16 for w in widths], pa.int32()))
        pq.write_table(changed.replace_schema_metadata(table.schema.metadata), items)
    else:
        items.write_bytes(items.read_bytes()[:-50])
    assert main(["train", "--params", str(folder / "params.yaml"), "--max_train_steps", "1"]) == 2
    one_line_error(capsys.readouterr().err, str(items), "rerun cache_latents")
    assert not (folder / "outputs").exists()

    assert main(["cache-latents", "--params", str(folder / "params.yaml")]) == 0
    assert json.loads((folder / "reports/cache_latents.json").read_text())["encoded"] == 0  # only the map is remade
    rebuilt = pq.read_table(items)
    assert rebuilt.to_pylist() == table.to_pylist() and ROWS_SHA_KEY in rebuilt.schema.metadata


def test_no_bit_flip_in_a_mapping_file_is_read_as_other_rows(cached_pipeline, tmp_path):
    """Single-bit flips all over items.parquet (every 31st byte, two bits each): read_mapping returns the rows
    that were written or a CacheCorruptError naming the file, never other rows (Parquet alone reads ~5% of such
    flips back as other valid values)."""
    from flux2.cache_store import CacheCorruptError, read_mapping

    items = cached_pipeline / "cache/latents/items.parquet"
    data, rows = items.read_bytes(), read_mapping(items, "cache_latents")
    flipped = tmp_path / "items.parquet"
    outcomes = {"same": 0, "named": 0}
    for offset in range(0, len(data), 31):
        for bit in (0x01, 0x80):
            damaged = bytearray(data)
            damaged[offset] ^= bit
            flipped.write_bytes(bytes(damaged))
            try:
                assert read_mapping(flipped, "cache_latents") == rows, f"byte {offset} bit {bit:#x}: other rows"
                outcomes["same"] += 1
            except CacheCorruptError as e:
                assert str(flipped) in str(e) and "rerun cache_latents" in str(e)
                outcomes["named"] += 1
    assert outcomes["named"] > outcomes["same"] > 0, outcomes
