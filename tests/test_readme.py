"""The README's two commands, as written, work from a fresh clone on the default params.yaml, and CI runs the
README's test command. So the README cannot drift from the code."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, readme_block


def readme_commands() -> list[str]:
    """The commands of the README's first fenced block (comments stripped)."""
    block = readme_block()
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


def test_readme_starts_with_the_demo_and_the_test_command_and_ci_runs_the_latter():
    demo, test = readme_commands()
    assert demo.startswith("make") and "demo" in demo and test.startswith("make") and "test" in test
    ci = (ROOT / ".ci" / "run").read_text()
    assert test in [line.strip() for line in ci.splitlines()], ".ci/run must call the README's test command"


def fresh_clone(dst: Path) -> Path:
    """The tracked files of this working tree (not what is ignored or untracked), as a new git repository."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "clone"]):
        subprocess.run(cmd, cwd=dst, check=True, env=env, capture_output=True)
    return dst


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict[str, str], subprocess.CompletedProcess]:
    """`make demo` exactly as a newcomer runs it, on the default params.yaml, in a fresh clone (about 2 minutes on
    2 cores), once for the tests of this module: (the clone, its environment, the finished `make`)."""
    root = tmp_path_factory.mktemp("readme")
    clone = fresh_clone(root / "clone")
    demo_command, _ = readme_commands()
    venv = Path(sys.executable).parent.parent
    (clone / ".venv").symlink_to(venv)  # where `make` builds it, for the README's `source .venv/bin/activate`
    # The venv of this test run is the one `make` would build; -o keeps make from re-installing it.
    cmd = demo_command.split() + [f"VENV={venv}", "-o", f"{venv}/.base"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "MLFLOW_TRACKING"))}
    env.update(PYTHONPATH=str(clone), FLUX2_CACHE_STORE=str(root / "store"),  # the store of this test alone
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    out = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return clone, env, out


@pytest.mark.slow
def test_demo_command_runs_the_pipeline_in_a_fresh_clone_and_the_lora_learns_the_concept(demo):
    """Every stage's files, and the LoRA's samples show the concept (purple) that the base's never do."""
    clone, _, out = demo
    for path in ("data/manifest.parquet", "reports/ingest.json", "cache/latents/index.parquet",
                 "cache/text/index.parquet", "outputs/lora/lora.safetensors", "metrics/train.json",
                 "metrics/eval.json", "outputs/eval/grid.png", "plots/loss.png", "plots/val_loss.png", "dvc.lock",
                 "mlflow.db"):
        assert (clone / path).exists(), path
    assert "outputs/eval/grid.png" in out.stdout  # the closing summary says where to look

    m = json.loads((clone / "metrics" / "eval.json").read_text())
    # Measured on the default (1000 steps, seed 42): base 0.0002 of the pixels purple, LoRA 0.17, every LoRA
    # sample of a purple prompt shows it. The margins leave room for other CPUs' last bits.
    assert m["concept_score"]["base"] < 0.01 and m["concept_presence"]["base"] == 0.0, m["concept_score"]
    assert m["concept_score"]["lora"] > 0.05 and m["concept_presence"]["lora"] >= 0.5, m["concept_score"]
    assert m["val_loss"]["lora"] < m["val_loss"]["base"]


# The experiments of the README's block and the parameters each one changes (as MLflow stores them).
EXPERIMENTS = {"lr-3e-4": {"train.learning_rate": "0.0003"}, "dim-32": {"train.network_dim": "32"},
               "seed-1": {"train.seed": "1"}, "seed-2": {"train.seed": "2"}}


def run_block(block: str, clone: Path, env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    """Run a README block with bash -e in `clone`, its output in files rather than pipes, then stop what it left
    running there. `dvc queue start` leaves a daemon holding the output it inherited, and a celery worker of the
    queue can outlive its last task (a shutdown race of DVC's local queue, seen here: the worker logged "done"
    and stayed): reading pipes until every writer closed them would wait for those forever."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        try:
            done = subprocess.run(["bash", "-e", "-c", block], cwd=clone, env=env, stdout=out, stderr=err,
                                  text=True, timeout=timeout)
        finally:
            stop_processes_in(clone)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(done.args, done.returncode, out.read(), err.read())


def stop_processes_in(folder: Path) -> None:
    """Terminate the processes whose working directory is inside `folder` (Linux /proc; elsewhere nothing)."""
    import signal

    folder = folder.resolve()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cwd = Path(os.readlink(proc / "cwd"))
        except OSError:  # gone, or not ours to look at
            continue
        if cwd == folder or folder in cwd.parents:
            try:
                os.kill(int(proc.name), signal.SIGTERM)
            except ProcessLookupError:
                pass


def experiment_file(clone: Path, name: str, path: str) -> str:
    """A file as the DVC experiment `name` committed it (its ref is refs/exps/.../<name>)."""
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps/"], cwd=clone,
                          capture_output=True, text=True, check=True).stdout.split()
    (ref,) = [r for r in refs if r.endswith(f"/{name}")]
    return subprocess.run(["git", "show", f"{ref}:{path}"], cwd=clone, capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.slow
def test_experiment_block_gives_each_experiment_its_own_run_without_encoding_again(demo):
    """The README's "Try a change, compare runs" block, verbatim, after the demo: two --temp experiments and a
    queued pair run two at a time, then `dvc exp show`, `dvc metrics diff` and `flux2 compare` by experiment
    name. Each experiment is its own MLflow run with its own params (the demo's run is left as it was), no cache
    entry was encoded again (the experiments' own reports), params.yaml is unchanged, and the comparison names
    the parameters that differ."""
    from mlflow.tracking import MlflowClient

    clone, env, _ = demo
    params_before = (clone / "params.yaml").read_text()
    demo_run = json.loads((clone / "metrics" / "train.json").read_text())["mlflow_run_id"]
    out = run_block(readme_block("Try a change, compare runs"), clone, env, timeout=1200)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert (clone / "params.yaml").read_text() == params_before
    assert all(name in out.stdout for name in EXPERIMENTS)  # dvc exp show lists them
    assert "metrics/eval.json" in out.stdout and "val_loss.lora" in out.stdout  # dvc metrics diff

    client = MlflowClient(f"sqlite:///{clone / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("flux2").experiment_id
    for name, changed in EXPERIMENTS.items():
        (run,) = client.search_runs([experiment], filter_string=f"tags.`dvc.exp_name` = '{name}'")
        params = run.data.params
        assert {k: params[k] for k in changed} == changed and params["train.max_train_steps"] == "20", name
        assert run.info.run_name == name and run.info.status == "FINISHED"
        assert {"loss", "eval_val_loss_lora"} <= run.data.metrics.keys(), name
        assert max(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == 20
        for kind in ("latents", "text"):
            report = json.loads(experiment_file(clone, name, f"reports/cache_{kind}.json"))
            assert report["encoded"] == 0 and report["from_store"] == report["entries"], (name, report)
        assert json.loads(experiment_file(clone, name, "metrics/train.json"))["mlflow_run_id"] == run.info.run_id
        with tempfile.TemporaryDirectory() as tmp:  # the dvc.lock logged is the one of this run
            lock = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "dvc.lock", tmp)).read_text())
        logged = lock["stages"]["train"]["params"]["params.yaml"]["train"]
        assert logged["max_train_steps"] == 20, name
        assert all(str(logged[k.removeprefix("train.")]) == v for k, v in changed.items()), name
    baseline = client.get_run(demo_run)
    assert baseline.data.params["train.max_train_steps"] == "1000" and "dvc.exp_name" not in baseline.data.tags
    assert max(m.step for m in client.get_metric_history(demo_run, "loss")) == 1000

    page = (clone / "reports" / "compare.html").read_text()
    assert (clone / "reports" / "compare.png").is_file()
    for name in ["train.learning_rate", "train.network_dim", "train.seed", *EXPERIMENTS]:
        assert name in page, name
    assert "train.max_train_steps" not in page  # the same in all four: not a difference

    dvc = str(Path(sys.executable).parent / "dvc")
    plots = subprocess.run([dvc, "plots", "diff", "HEAD", "lr-3e-4", "--json"], cwd=clone, env=env,
                           capture_output=True, text=True, timeout=300)
    assert plots.returncode == 0, plots.stderr[-2000:]
    assert "plots/train_loss.csv" in plots.stdout and "lr-3e-4" in plots.stdout
