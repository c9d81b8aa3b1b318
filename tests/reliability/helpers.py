"""Shared helpers of the reliability tests: clear-error checks, memory peaks, subprocess stages, cache contents."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from flux2.cache_store import SHARD_DIR

ROOT = Path(__file__).resolve().parents[2]

N_IMAGES = 128  # at 32 px, cache.batch_size 2: a second or two of encoding; the text cache spans 4 shards
MAPPINGS = {"latents": "items.parquet", "text": "prompts.parquet"}


def assert_clear_error(error: BaseException, *names: object) -> None:
    """`error` is one of our errors: a ValueError (subclass) whose message names one of `names` (a file)."""
    assert isinstance(error, ValueError), f"{type(error).__name__} escaped: {error!r}"
    message = str(error)
    assert any(str(n) in message for n in names), f"the message does not name {names}: {message}"


def _peak_rss_kib() -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(r"VmHWM:\s+(\d+)", status)
    return int(m.group(1)) if m else None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
        return True
    except OSError:
        return False


@contextmanager
def bounded_memory(limit_mb: float) -> Iterator[None]:
    """Fail if the block allocates more than `limit_mb`: Python/numpy allocations by tracemalloc, everything else
    (torch, Rust) by the process's peak resident memory (reset before the block where Linux allows it)."""
    rss_before = _peak_rss_kib() if _reset_peak_rss() else None
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit_mb * 1e6, f"{peak / 1e6:.1f} MB allocated by Python"
    if rss_before is not None:
        grown = (_peak_rss_kib() - rss_before) * 1024
        assert grown < limit_mb * 1e6, f"resident memory grew by {grown / 1e6:.1f} MB"


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a stage run as a real subprocess: this checkout on PYTHONPATH, offline, quiet."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true",
               TOKENIZERS_PARALLELISM="false", **extra)
    env.pop("FLUX2_DEBUG", None)
    return env


def run_cli(folder: Path, *args: str, preexec_fn=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m flux2.cli ARGS` in `folder` as a subprocess; returns the finished process (text output)."""
    return subprocess.run([sys.executable, "-m", "flux2.cli", *args], cwd=folder, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn)


def cache_contents(cache_dir: Path) -> dict[str, torch.Tensor]:
    """Every entry of a cache folder by key, read (and checksum-verified) through CacheReader. Copies: a tensor
    from safetensors is a view of the shard's memory map, which a test that damages the shard in place would
    pull from under it (SIGBUS)."""
    from flux2.cache_store import CacheReader

    reader = CacheReader(cache_dir)
    return {key: reader.get(key).clone() for key in sorted(reader.keys())}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str,
                        exact: bool = True) -> None:
    """The same keys and tensors: bit for bit, or (`exact=False`, for cache entries that were encoded again) up
    to float rounding. The encoders' CPU kernels round differently for a batch of one than for a bigger batch,
    so an entry re-encoded in another batch may differ in its last bits (about 1e-6)."""
    assert a.keys() == b.keys(), f"{what}: keys differ ({len(a)} vs {len(b)})"

    def same(x: torch.Tensor, y: torch.Tensor) -> bool:
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        return torch.equal(x, y) or (not exact and torch.allclose(x.float(), y.float(), rtol=1e-4, atol=1e-5))

    differ = [k for k in a if not same(a[k], b[k])]
    assert not differ, f"{what}: {len(differ)} tensors differ, e.g. {differ[:3]}"


def leftovers(folder: Path) -> list[str]:
    """Temporary files of interrupted atomic writes (`.name.<hex>.tmp...`) and checkpoint folders (`.tmp-*`)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*")
                  if ".tmp" in p.name and ".dvc" not in p.parts and ".git" not in p.parts)


def copy_project(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    params = dst / "params.yaml"
    params.write_text(params.read_text().replace(str(src), str(dst)))
    return dst


def start(folder: Path, *args: str) -> subprocess.Popen:
    """`python ARGS` in `folder`, in a session of its own (so the kill reaches only it and its children)."""
    return subprocess.Popen([sys.executable, *args], cwd=folder, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)


def wait_for(proc: subprocess.Popen, marker: Callable[[], bool] | None) -> None:
    """Until `marker()` holds (the stage has begun writing) or the process has ended."""
    while marker is not None and not marker() and proc.poll() is None:
        time.sleep(0.005)


def timed_run(folder: Path, *args: str, marker: Callable[[], bool] | None = None) -> float:
    """Seconds from the start of `python ARGS` (or from when `marker()` holds) to its successful end."""
    proc = start(folder, *args)
    wait_for(proc, marker)
    t0 = time.perf_counter()
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-3000:]
    return time.perf_counter() - t0


def kill_after(folder: Path, delay: float, *args: str, marker: Callable[[], bool] | None = None) -> bool:
    """Start `python ARGS`, SIGKILL it `delay` seconds after its start (or after `marker()` holds); False if it
    had finished by then."""
    proc = start(folder, *args)
    wait_for(proc, marker)
    try:
        proc.wait(timeout=delay)
        assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True
    finally:
        proc.stderr.close()


def shards_written(cache_dir: Path, n: int) -> Callable[[], bool]:
    return lambda: len(list((cache_dir / SHARD_DIR).glob("[!.]*.safetensors"))) >= n


def begun(cache_dir: Path, kind: str) -> Callable[[], bool]:
    """When a cache stage has begun its real work: the latents stage once its shard folder exists (it then
    encodes all images into one shard), the text stage once its first shard is written (before that it loads
    the text encoder, and a kill there leaves nothing to see)."""
    if kind == "latents":
        return (cache_dir / SHARD_DIR).exists
    return shards_written(cache_dir, 1)


def one_line_error(stderr: str, *names: object) -> str:
    """A failed run's stderr holds exactly one error line, no traceback, and it names each of `names`."""
    assert "Traceback" not in stderr, stderr[-3000:]
    # A progress bar may share the line (tqdm redraws with \r): the message starts at "error: ".
    lines = [line[line.index("error: "):] for line in stderr.splitlines() if "error: " in line]
    assert len(lines) == 1, stderr[-3000:]
    for name in names:
        assert str(name) in lines[0], f"{name} not in: {lines[0]}"
    return lines[0]


@contextmanager
def within(seconds: float) -> Iterator[None]:
    """Fail (TimeoutError) if the block runs longer than `seconds`: a hang becomes a failure, not a stuck suite.
    SIGALRM interrupts blocking system calls too, such as opening a FIFO that has no writer."""
    def expire(*_: object) -> None:
        raise TimeoutError(f"still running after {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def metric_steps(folder: Path, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every logged (step, value) of an MLflow run's deterministic training metrics (the store in `folder`), in
    step order: a step logged twice shows up twice."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            for key in ("loss", "lr", "grad_norm")}
