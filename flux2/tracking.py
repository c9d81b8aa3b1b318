"""MLflow tracking: one store per repository, wherever DVC runs the stage.

The default store is `sqlite:///<repo>/mlflow.db` with artifacts in `<repo>/mlartifacts`, both absolute: `dvc exp
run --temp/--queue` executes stages in `<repo>/.dvc/tmp/exps/...` copies, and a relative URI would scatter runs
into folders that are deleted afterwards. MLflow records each experiment's and run's artifact folder as an
absolute URI; when the project (with mlflow.db and mlartifacts/) is moved or copied, `relocate_store` points
those records at the new folder, so a moved project never writes into (or reads from) the old one.

A command opens the store once (`open_store`: the server checked, the database made and relocated) and its runs
share that client. One MLflow run per training run: a resumed run (same checkpoint lineage, exactly the same
parameters) continues its run and never logs a step twice (`Run.reopen`); anything else is a new run.
"""
from __future__ import annotations

import functools
import logging
import os
import secrets
import socket
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

EXPS_MARKER = f"{os.sep}.dvc{os.sep}tmp{os.sep}exps{os.sep}"


def repo_root(start: str | Path | None = None) -> Path:
    """The repository the run belongs to: the original one for DVC temp experiment copies."""
    cwd = str(Path(start or os.getcwd()).resolve())
    if EXPS_MARKER in cwd + os.sep:
        return Path((cwd + os.sep).split(EXPS_MARKER)[0])
    return Path(os.environ.get("DVC_ROOT") or cwd)


def tracking_uri(configured: str | None = None) -> str:
    """params tracking.tracking_uri, else $MLFLOW_TRACKING_URI, else the repository's sqlite file."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{repo_root() / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """For a sqlite store, `mlartifacts/` beside the database file (absolute); servers choose their own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


def init_store(uri: str) -> None:
    """Create a missing sqlite tracking database whole or not at all. MLflow builds its tables in dozens of
    migration steps, and a run killed among them leaves a database that every later run refuses ("table ...
    already exists"); so the database is built under a temporary name and then linked into place."""
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    if db.exists():
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    tmp = db.with_name(f".{db.name}.{secrets.token_hex(6)}.tmp")
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        SqlAlchemyStore(f"sqlite:///{tmp}", artifact_location(uri)).engine.dispose()
        try:
            os.link(tmp, db)  # not os.replace: a database that another process made meanwhile is kept
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


def relocate_store(uri: str) -> int:
    """Point the artifact locations recorded in a sqlite store at `mlartifacts/` beside it, where they point at
    the `mlartifacts/` of another folder (the project was moved or copied); returns how many records changed.
    Only locations this module made (ending in /mlartifacts) are touched."""
    if not uri.startswith("sqlite:///") or not Path(uri.removeprefix("sqlite:///")).is_file():
        return 0
    import sqlalchemy

    here = artifact_location(uri)
    engine = sqlalchemy.create_engine(uri)
    try:
        with engine.begin() as con:
            old = {row[0] for row in con.execute(sqlalchemy.text(
                "SELECT artifact_location FROM experiments WHERE artifact_location LIKE '%/mlartifacts' "
                "AND artifact_location != :here"), {"here": here})}
            changed = 0
            for root in old:
                changed += con.execute(sqlalchemy.text(
                    "UPDATE experiments SET artifact_location = :here || substr(artifact_location, :n) "
                    "WHERE substr(artifact_location, 1, :n - 1) = :root"),
                    {"here": here, "root": root, "n": len(root) + 1}).rowcount
                changed += con.execute(sqlalchemy.text(
                    "UPDATE runs SET artifact_uri = :here || substr(artifact_uri, :n) "
                    "WHERE substr(artifact_uri, 1, :n - 1) = :root"),
                    {"here": here, "root": root, "n": len(root) + 1}).rowcount
    finally:
        engine.dispose()
    if changed:
        print(f"note: the MLflow store moved: {changed} artifact locations now point at {here}")
    return changed


def experiment_id(client: Any, name: str, uri: str) -> str:
    """Get or create the experiment, with an absolute artifact location beside a sqlite store."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(uri))


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds when an http(s) tracking server is down: MLflow itself retries for minutes (7 retries,
    backoff factor 2) before it says anything. A short TCP connect to the server's port decides."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    where = f"the MLflow tracking URI {uri} (tracking.tracking_uri, or $MLFLOW_TRACKING_URI)"
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((host, port), timeout=timeout).close()
    except ValueError as e:  # a port that is not a number
        raise ValueError(f"{where}: {e}") from None
    except OSError as e:
        raise ValueError(f"{where}: no server answers at {host}:{port} ({e.strerror or e}); start the MLflow "
                         f"server, or set tracking.tracking_uri: null to use the sqlite store in the repository"
                         ) from None


@contextmanager
def store_errors(uri: str) -> Iterator[None]:
    """A store that cannot be written (a full disk, a read-only folder, a locked or damaged database) as one
    OSError naming it, instead of SQLAlchemy's traceback from inside MLflow."""
    try:
        yield
    except Exception as e:
        cause: BaseException | None = e
        while cause is not None and type(cause).__module__.split(".")[0] not in ("sqlalchemy", "sqlite3"):
            cause = cause.__cause__ or cause.__context__
        if cause is None or isinstance(e, OSError):
            raise
        reason = " ".join(str(getattr(cause, "orig", None) or cause).split("\n")[0].split())
        store = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else uri
        raise OSError(f"could not write the MLflow store {store}: {reason}; free disk space there (or fix its "
                      "permissions) and rerun") from e


class _NoTraceback(logging.Filter):
    """MLflow logs the whole traceback of a failed database write and then raises it; `store_errors` says it in
    one line instead (FLUX2_DEBUG=1 keeps MLflow's log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None or bool(os.environ.get("FLUX2_DEBUG"))


class GuardedClient:
    """An MlflowClient whose every call runs under `store_errors`."""

    def __init__(self, client: Any, uri: str):
        self._client, self.uri = client, uri
        db_log = logging.getLogger("mlflow.store.db.utils")
        if not any(isinstance(f, _NoTraceback) for f in db_log.filters):
            db_log.addFilter(_NoTraceback())

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            with store_errors(self.uri):
                return attr(*args, **kwargs)
        return call


def open_store(uri: str) -> GuardedClient:
    """The client of the MLflow store at `uri`, ready to write: an http(s) server that answers (`check_server`),
    a sqlite database made whole (`init_store`) with its artifact locations beside it (`relocate_store`)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    check_server(uri)
    with store_errors(uri):
        init_store(uri)
        relocate_store(uri)
    return GuardedClient(MlflowClient(tracking_uri=uri), uri)


def exp_name() -> str | None:
    """The DVC experiment this process runs in (`dvc exp run` sets DVC_EXP_NAME), else None."""
    return os.environ.get("DVC_EXP_NAME") or None


def param_strings(params: dict[str, Any]) -> dict[str, str]:
    """Parameters as MLflow stores them (strings of at most 6000 characters)."""
    return {k: str(v)[:6000] for k, v in params.items()}


class Run:
    """An MLflow run with batched metric logging (one log_batch per flush instead of a call per value), in a store
    opened by `open_store`."""

    def __init__(self, client: GuardedClient, run_id: str, flush_every: int = 50):
        self.client = client
        self.run_id = run_id
        self.flush_every = flush_every
        self.pending: list[Any] = []
        self.logged_upto: dict[str, int] = {}  # metric -> last step already in the store (a reopened run)

    @classmethod
    def create(cls, client: GuardedClient, experiment: str, run_name: str | None = None) -> "Run":
        """A new run in `experiment` (created when missing)."""
        exp = experiment_id(client, experiment, client.uri)
        return cls(client, client.create_run(exp, run_name=run_name).info.run_id)

    @classmethod
    def reopen(cls, client: GuardedClient, run_id: str, params: dict[str, Any], unfinished_only: bool = False
               ) -> "Run | None":
        """The existing run `run_id` to continue, if it is in the store and has exactly these parameters (and,
        with `unfinished_only`, was killed or failed), else None: the caller starts a new run. Steps it already
        holds are not logged again (`log_metrics`)."""
        from mlflow.exceptions import MlflowException

        try:
            info = client.get_run(run_id)
        except MlflowException:
            return None
        if info.data.params != param_strings(params) or (unfinished_only and info.info.status == "FINISHED"):
            return None
        run = cls(client, run_id)
        for key in info.data.metrics:
            run.logged_upto[key] = max(m.step for m in client.get_metric_history(run_id, key))
        return run

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in param_strings(params).items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metrics of `step` (flushed in batches); a step the store already holds for a metric is skipped."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()
                         if step > self.logged_upto.get(k, -1)]
        if len(self.pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self.pending), 1000):
            self.client.log_batch(self.run_id, metrics=self.pending[i : i + 1000])
        self.pending = []

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status=status)


def evaluation_run(uri: str, experiment: str, train_run_id: str, digest: str, params: dict[str, Any]) -> Run:
    """Where an evaluation is logged: the training's run, unless that run already holds an evaluation of other
    inputs (another model/eval setting: `digest`), as when a DVC experiment changes only eval params and reuses
    the baseline's LoRA. Then it is a run of its own, a child of the training run (`mlflow.parentRunId`), found
    again by its digest; an experiment never writes into another's record."""
    client = open_store(uri)
    run = Run(client, train_run_id)
    train_run = client.get_run(train_run_id)
    tags = train_run.data.tags
    if tags.get("flux2.eval_digest", digest) == digest:
        run.set_tags({"flux2.eval_digest": digest})
        return run
    exp = train_run.info.experiment_id
    same = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{train_run_id}' and "
                                                   f"tags.`flux2.eval_digest` = '{digest}'", max_results=1)
    if same:
        return Run(client, same[0].info.run_id)
    child = Run.create(client, experiment, run_name=exp_name() or f"{tags.get('mlflow.runName', train_run_id)}-eval")
    child.log_params(params)
    child.set_tags({"mlflow.parentRunId": train_run_id, "flux2.kind": "evaluation", "flux2.eval_digest": digest,
                    **({"dvc.exp_name": exp_name()} if exp_name() else {})})
    print(f"MLflow run {train_run_id} was evaluated with other settings before: this evaluation is run "
          f"{child.run_id}, its child")
    return child
