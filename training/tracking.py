"""Metrics logging: one small interface, a local JSON-lines file always, MLflow when reachable (main process only)."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
import warnings
from contextlib import closing
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
REPLACED_METRICS_FILE = "metrics.replaced.jsonl"  # records of steps a continued run trained again
LOCAL_STORE = "mlflow.db"  # a run folder's own MLflow store (SQLite) ...
LOCAL_ARTIFACTS = "mlartifacts"  # ... and the folder of its artifacts
# After a failed request, do not try the tracking server again for this long (training keeps going meanwhile).
RETRY_AFTER_S = 60.0
ARTIFACT_ATTEMPTS = 3  # uploads of one artifact tried before it is given up
# Metrics kept for sending once the server is back; older ones stay in metrics.jsonl only.
MAX_BACKLOG = 10000


class MetricLogger:
    """The interface the trainer logs through; this base class drops everything (non-main processes)."""

    run_id: str | None = None
    tracking_uri: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        """Record run parameters (the resolved config)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Record scalar metrics at an optimizer step."""

    def log_artifact(self, path: str | os.PathLike, folder: str | None = None) -> None:
        """Attach a file to the run."""

    def close(self, status: str = "FINISHED") -> None:
        """Mark the run finished (FINISHED, FAILED or KILLED)."""


class LocalLogger(MetricLogger):
    """Appends every metric record to RUN_DIR/metrics.jsonl (kept whatever the tracking server does).

    A run that continues from the checkpoint of step `from_step` first moves the records past that step to
    RUN_DIR/metrics.replaced.jsonl (a crash after the checkpoint, or a run taken back to an earlier checkpoint): the
    steps they name are trained and logged again, so metrics.jsonl holds the run as it went on, each step once.
    """

    def __init__(self, run_dir: str | os.PathLike, from_step: int = 0):
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._replace_after(from_step)
        self._file = open(self.path, "a", buffering=1)

    def _replace_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        kept, replaced = [], []
        for line in self.path.read_text(errors="replace").splitlines(keepends=True):
            try:
                record_step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):  # a line cut short when the run was killed
                record_step = None
            (kept if record_step is not None and record_step <= step else replaced).append(line.rstrip("\n") + "\n")
        if not replaced:
            return
        from data_prep.shards import write_bytes_atomic

        aside = self.path.with_name(REPLACED_METRICS_FILE)
        with open(aside, "a") as f:  # first, so that a kill in between loses nothing
            f.writelines(replaced)
            f.flush()
            os.fsync(f.fileno())
        write_bytes_atomic(self.path, "".join(kept).encode())
        log.warning("%s: moved %d record(s) past step %d to %s; the run continues from the checkpoint of step %d and "
                    "logs those steps again", self.path, len(replaced), step, aside.name, step)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._file.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")

    def close(self, status: str = "FINISHED") -> None:
        self._file.close()


def default_tracking_uri(uri: str, run_dir: str | os.PathLike) -> str:
    """The tracking URI: the config's, else $MLFLOW_TRACKING_URI, else a SQLite store in the run folder."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return local_store_uri(run_dir)


def local_store_uri(run_dir: str | os.PathLike) -> str:
    """The URI of the run folder's own store, RUN_DIR/mlflow.db."""
    return f"sqlite:///{Path(run_dir).resolve() / LOCAL_STORE}"


def is_moved_local_store(saved_uri: str | None, run_dir: str | os.PathLike) -> bool:
    """Whether `saved_uri` (a checkpoint's) names a run folder's own store elsewhere, and this run folder has its
    own: the folder was moved or copied, and its store came with it."""
    if not saved_uri or not saved_uri.startswith("sqlite:///") or saved_uri == local_store_uri(run_dir):
        return False
    return Path(saved_uri).name == LOCAL_STORE and (Path(run_dir) / LOCAL_STORE).is_file()


def relocate_local_artifacts(run_dir: str | os.PathLike) -> int:
    """Point the artifacts of the run folder's own store at RUN_DIR/mlartifacts; returns how many experiments it
    changed. The store records them as absolute URIs, fixed when its experiment was created under RUN_DIR/
    mlartifacts; after the folder moved (or was copied), artifacts would go on landing at the old place. Experiments
    whose artifacts are elsewhere (not a folder named mlartifacts) are left alone."""
    db = Path(run_dir).resolve() / LOCAL_STORE
    if not db.is_file():
        return 0
    here = (db.parent / LOCAL_ARTIFACTS).as_uri()
    changed, runs = 0, []
    try:
        with closing(sqlite3.connect(db, timeout=30)) as con, con:
            tables = {name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not {"experiments", "runs"} <= tables:
                return 0
            for exp_id, old in con.execute("SELECT experiment_id, artifact_location FROM experiments").fetchall():
                old = (old or "").rstrip("/")
                if old == here or not old.endswith("/" + LOCAL_ARTIFACTS):
                    continue
                con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?", (here, exp_id))
                runs += [r for (r,) in con.execute("SELECT run_uuid FROM runs WHERE experiment_id = ?", (exp_id,))]
                con.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) "
                            "WHERE experiment_id = ? AND substr(artifact_uri, 1, ?) = ?",
                            (here, len(old) + 1, exp_id, len(old), old))
                changed += 1
    except sqlite3.Error as e:  # tracking must never stop training or evaluation
        log.warning("could not point the artifacts of %s at %s: %s", db, here, e)
        return 0
    if changed:
        log.warning("%s: run folder moved; its artifacts now go to %s", db, here)
        try:  # this process may have logged to these runs before: mlflow keeps each run's artifact place
            from mlflow.tracking._tracking_service import utils

            for run in runs:
                utils._artifact_repos_cache.pop(run, None)
        except (ImportError, AttributeError):
            pass
    return changed


class MLflowLogger(MetricLogger):
    """Logs to an MLflow tracking store; a store that fails is skipped for a while, never fatal.

    Metrics that could not be sent are queued (up to MAX_BACKLOG) and sent when the store answers again. `params`
    and `artifacts` are recorded in a run this logger starts (not in one it continues).

    Continuing the run `run_id` from the checkpoint of step `from_step`, the run may already hold later steps
    (`step_key` is a metric logged at every step that logs), which MLflow cannot remove:
    - after a crash (`branch` false: the newest checkpoint, the same settings) they are the steps trained again,
      with the same values, so they are not sent again;
    - a run continued with settings that change what is trained, or from a chosen checkpoint (`branch` true), logs
      to a new MLflow run, tagged with the run and step it continues, so that no step holds points of two different
      trainings.
    """

    def __init__(self, uri: str, run_dir: str | os.PathLike, experiment: str, run_name: str,
                 run_id: str | None = None, timeout_s: float = 10.0, from_step: int = 0, step_key: str = "loss",
                 branch: bool = False, params: dict[str, Any] | None = None,
                 artifacts: list[str | os.PathLike] = ()):
        # A tracking server that went away must cost seconds, not mlflow's default minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(1, timeout_s))))
        from mlflow.tracking import MlflowClient

        self.tracking_uri = uri
        self.run_dir = Path(run_dir)
        if uri == local_store_uri(run_dir):
            relocate_local_artifacts(run_dir)
        try:
            self.client = MlflowClient(tracking_uri=uri)
        except Exception as e:  # a store that cannot even be set up now (a SQLite path it cannot create)
            log.warning("MLflow tracking at %s cannot be set up (%s: %s)", uri, type(e).__name__, str(e)[:200])
            self.client = None
        self._down_since: float | None = None
        self._closed = False
        self._backlog: list = []
        self._pending_params: list = []
        self._pending_artifacts: list = []  # [path, folder, failed attempts]
        self._open_args = (experiment, run_name, run_id)
        self._from_step, self._step_key, self._branch = from_step, step_key, branch
        self._start_records = (dict(params or {}), [str(a) for a in artifacts])
        self._logged_through = 0  # steps up to this one are in the run already
        self.run_id = self._call("open the run", self._open_run, *self._open_args)
        if self.run_id is not None:
            self._flush()
        else:
            warnings.warn(f"MLflow tracking at {uri} is unavailable; metrics go to {self.run_dir / METRICS_FILE} only",
                          stacklevel=2)

    def _open_run(self, experiment: str, run_name: str, run_id: str | None) -> str:
        from mlflow.exceptions import MlflowException

        if self.client is None:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=self.tracking_uri)
        tags = {}
        if run_id:
            try:
                run = self.client.get_run(run_id)
            except MlflowException as e:  # the checkpoint may come from another store; other errors: store down
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning("MLflow run %s not found at %s; starting a new run", run_id, self.tracking_uri)
                run = None
            if run is not None:
                logged = max((m.step for m in self.client.get_metric_history(run_id, self._step_key)), default=0)
                if logged <= self._from_step or not self._branch:
                    if logged > self._from_step:
                        self._logged_through = logged
                        log.warning("MLflow run %s holds steps up to %d; the run continues from the checkpoint of "
                                    "step %d with the same settings, so the steps it trains again go to %s only",
                                    run_id, logged, self._from_step, self.run_dir / METRICS_FILE)
                    if run.info.status != "RUNNING":
                        self.client.update_run(run_id, status="RUNNING")
                    return run_id
                tags = {"catseg.continues_run": run_id, "catseg.continues_from_step": str(self._from_step)}
                run_name = f"{run_name}-from-step-{self._from_step}"
                log.warning("MLflow run %s holds steps up to %d, and this run continues from the checkpoint of step "
                            "%d with settings that change what is trained, or from a chosen checkpoint; it logs to "
                            "a new MLflow run, %r",
                            run_id, logged, self._from_step, run_name)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            location = None
            if self.tracking_uri.startswith("sqlite:"):
                location = (self.run_dir.resolve() / LOCAL_ARTIFACTS).as_uri()
            exp_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            exp_id = found.experiment_id
        new_id = self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
        from mlflow.entities import Param

        params, artifacts = self._start_records  # sent first by the flush that follows
        self._pending_params[:0] = [Param(k, str(v)) for k, v in params.items()]
        self._pending_artifacts[:0] = [[path, None, 0] for path in artifacts]
        return new_id

    def _call(self, what: str, fn, *args, **kwargs):
        if self._down_since is not None and time.monotonic() - self._down_since < RETRY_AFTER_S:
            return None
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # any failure of the tracking store must not stop training
            if self._down_since is None:
                warnings.warn(f"MLflow tracking at {self.tracking_uri} failed to {what} ({type(e).__name__}: "
                              f"{str(e)[:200]}); training continues, metrics are kept in "
                              f"{self.run_dir / METRICS_FILE} and retried every {RETRY_AFTER_S:.0f} s", stacklevel=3)
            self._down_since = time.monotonic()
            return None
        if self._down_since is not None:
            log.warning("MLflow tracking at %s answers again", self.tracking_uri)
        self._down_since = None
        return True if result is None else result

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self._pending_params.extend(Param(k, str(v)) for k, v in params.items())
        self._flush()

    def _flush(self) -> None:
        if self.run_id is None:
            self.run_id = self._call("open the run", self._open_run, *self._open_args)
            if self.run_id is None:
                return
            self._backlog = [m for m in self._backlog if m.step > self._logged_through]  # queued while it was down
        while self._pending_params:
            chunk = self._pending_params[:100]  # the store takes at most 100 params per batch
            if self._call("log params", self.client.log_batch, self.run_id, params=chunk) is None:
                return
            del self._pending_params[:len(chunk)]
        while self._backlog:
            chunk = self._backlog[:1000]
            if self._call("log metrics", self.client.log_batch, self.run_id, metrics=chunk) is None:
                return
            del self._backlog[:len(chunk)]
        while self._pending_artifacts:
            item = self._pending_artifacts[0]
            path, folder = item[0], item[1]
            if Path(path).exists():  # a checkpoint pruned meanwhile is not uploaded any more
                if self._call(f"upload {path}", self.client.log_artifact, self.run_id, path, folder) is None:
                    item[2] += 1
                    if item[2] >= ARTIFACT_ATTEMPTS:
                        log.warning("giving up uploading %s to MLflow after %d attempts", path, item[2])
                        self._pending_artifacts.pop(0)
                    return
            self._pending_artifacts.pop(0)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if step <= self._logged_through:
            return
        now = int(time.time() * 1000)
        self._backlog.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        self._backlog = self._backlog[-MAX_BACKLOG:]
        self._flush()

    def log_artifact(self, path: str | os.PathLike, folder: str | None = None) -> None:
        # queued like metrics: a store that is down now (at the start, say) still gets it when it answers
        self._pending_artifacts.append([str(path), folder, 0])
        self._flush()

    def close(self, status: str = "FINISHED") -> None:
        if self._closed:  # the run's end is recorded once
            return
        self._closed = True
        self._down_since = None  # one last try: open the run if it never opened, then what is queued, the status
        self._flush()
        if self.run_id is not None:
            self._call("finish the run", self.client.set_terminated, self.run_id, status)


class MultiLogger(MetricLogger):
    """Fans every call out to several loggers; run_id/tracking_uri come from the first that has them."""

    def __init__(self, *loggers: MetricLogger):
        self.loggers = loggers

    @property
    def run_id(self) -> str | None:
        # Read live: a tracking store that was down at the start may open its run later.
        return next((lg.run_id for lg in self.loggers if lg.run_id), None)

    @property
    def tracking_uri(self) -> str | None:
        return next((lg.tracking_uri for lg in self.loggers if lg.tracking_uri), None)

    def log_params(self, params):
        for lg in self.loggers:
            lg.log_params(params)

    def log_metrics(self, metrics, step):
        for lg in self.loggers:
            lg.log_metrics(metrics, step)

    def log_artifact(self, path, folder=None):
        for lg in self.loggers:
            lg.log_artifact(path, folder)

    def close(self, status="FINISHED"):
        for lg in self.loggers:
            lg.close(status)
