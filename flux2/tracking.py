"""MLflow tracking: one store per repository, wherever DVC runs the stage.

The default store is `sqlite:///<repo>/mlflow.db` with artifacts in `<repo>/mlartifacts`, both absolute: `dvc exp
run --temp/--queue` executes stages in `<repo>/.dvc/tmp/exps/...` copies, and a relative URI would scatter runs
into folders that are deleted afterwards.
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
        self._client, self._uri = client, uri
        db_log = logging.getLogger("mlflow.store.db.utils")
        if not any(isinstance(f, _NoTraceback) for f in db_log.filters):
            db_log.addFilter(_NoTraceback())

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            with store_errors(self._uri):
                return attr(*args, **kwargs)
        return call


class Run:
    """An MLflow run with batched metric logging (one log_batch per flush instead of a call per value)."""

    def __init__(self, uri: str, experiment: str, run_id: str | None = None, run_name: str | None = None,
                 flush_every: int = 50):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.tracking import MlflowClient

        check_server(uri)
        with store_errors(uri):
            init_store(uri)
        self.client = GuardedClient(MlflowClient(tracking_uri=uri), uri)
        if run_id is None:
            run_id = self.client.create_run(experiment_id(self.client, experiment, uri), run_name=run_name).info.run_id
        self.run_id = run_id
        self.flush_every = flush_every
        self.pending: list[Any] = []

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
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
