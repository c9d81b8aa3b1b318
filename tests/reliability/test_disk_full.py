"""Disk full or a write error, simulated for real with a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored, so a
write past the limit fails with EFBIG) in the stage's subprocess: the stage stops with a clear error that names
the file it could not write, leaves nothing partial behind (no temporary file, no half shard, no index or
checkpoint naming what is not there), and the next run, with space again, succeeds."""
from __future__ import annotations

import resource
import signal
import sys
from pathlib import Path

import pytest

from flux2.cli import main
from tests.reliability.helpers import (assert_same_tensors, cache_contents, copy_project, leftovers, one_line_error,
                                      run_cli, subprocess_env)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE semantics are Linux's")


def file_size_limit(nbytes: int):
    """A preexec_fn: no file of the child may grow past `nbytes` (writes fail with EFBIG instead of SIGXFSZ)."""
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return limit


@pytest.mark.parametrize("kind", ["latents", "text"])
def test_cache_stage_on_a_full_disk_names_the_shard_leaves_nothing_and_reruns(cached_pipeline, tmp_path, kind):
    folder = copy_project(cached_pipeline, tmp_path / "p")
    cache_dir = folder / "cache" / kind
    expected = cache_contents(cache_dir)
    shard_bytes = max(p.stat().st_size for p in (cache_dir / "shards").iterdir())
    for p in (cache_dir / "shards").iterdir():
        p.unlink()
    (cache_dir / "index.parquet").unlink()

    done = run_cli(folder, f"cache-{kind}", "--params", "params.yaml", preexec_fn=file_size_limit(shard_bytes // 2))
    assert done.returncode == 2, done.stderr[-3000:]
    # The shard named relative to params.yaml, as configured.
    one_line_error(done.stderr, "error: could not write ", f"cache/{kind}/shards/{kind}-", "File too large")
    assert not leftovers(cache_dir), leftovers(cache_dir)
    assert not list((cache_dir / "shards").iterdir()) and not (cache_dir / "index.parquet").exists()

    assert main([f"cache-{kind}", "--params", str(folder / "params.yaml")]) == 0
    assert_same_tensors(cache_contents(cache_dir), expected, f"{kind} cache", exact=False)


def test_training_on_a_full_disk_names_the_checkpoint_leaves_nothing_and_reruns(cached_pipeline, tmp_path):
    """network_dim 64 makes a checkpoint's LoRA (3.3 MB) bigger than the limit, which leaves room for the MLflow
    database: the first checkpoint is the first write to fail."""
    folder = copy_project(cached_pipeline, tmp_path / "p")
    args = ["--max_train_steps", "4", "--save_every_n_steps", "2", "--network_dim", "64", "--network_alpha", "64"]
    done = run_cli(folder, "train", "--params", "params.yaml", *args, preexec_fn=file_size_limit(2_000_000))
    assert done.returncode == 2, done.stderr[-3000:]
    # The checkpoint's temporary folder, checkpoints/<fingerprint>/.tmp-step-00000002.
    one_line_error(done.stderr, "error: could not write ", "/.tmp-step-00000002", "File too large")
    assert not list((folder / "checkpoints").rglob("*step-*"))  # neither a step-* folder nor a temporary one
    assert not (folder / "outputs/lora/lora.safetensors").exists() and not leftovers(folder / "outputs")

    assert main(["train", "--params", str(folder / "params.yaml"), *args]) == 0
    assert (folder / "outputs/lora/lora.safetensors").is_file()


def test_atomic_writes_on_a_full_disk_name_the_file_and_leave_no_temporary(tmp_path):
    """The shared writers of every JSON, CSV and Parquet output (flux2.atomic): an OSError with the errno,
    naming the target, and no temporary file; the old content stays."""
    import subprocess

    script = """
import sys
from pathlib import Path
import os
import pyarrow as pa, pyarrow.parquet as pq
from flux2.atomic import atomic_path, atomic_write_json
out = Path(sys.argv[1])
for name, write in [("report.json", lambda p: atomic_write_json(p, {"x": "y" * 200_000})),
                    ("index.parquet", lambda p: pq.write_table(pa.table({"a": [os.urandom(200_000)]}), p))]:
    target = out / name
    target.write_text("old")
    try:
        if name.endswith(".parquet"):
            with atomic_path(target) as tmp:
                write(tmp)
        else:
            write(target)
    except OSError as e:
        print(e.errno, e)
"""
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=subprocess_env(), capture_output=True,
                          text=True, preexec_fn=file_size_limit(100_000), timeout=120)
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2, done.stdout + done.stderr
    for line, name in zip(lines, ["report.json", "index.parquet"]):
        assert line.startswith("27 ") and f"could not write {tmp_path / name}" in line and "File too large" in line
        assert (tmp_path / name).read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.parquet", "report.json"]


def test_limit_is_real(tmp_path):
    """The simulation itself: under the limit a plain write fails with EFBIG (errno 27), nothing is killed."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", "import sys; open(sys.argv[1], 'wb').write(b'x' * 10_000)",
                           str(tmp_path / "f")], capture_output=True, text=True, preexec_fn=file_size_limit(1000))
    assert done.returncode == 1 and "[Errno 27] File too large" in done.stderr
    assert Path(tmp_path / "f").stat().st_size == 1000
