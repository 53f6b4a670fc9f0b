"""The evaluation service: score every new complete checkpoint of a run and log the numbers into its MLflow run.

Usage:
    python -m evaluation.service --watch RUN_DIR --benchmarks ade150,pc59 --shards data/shards \
        [--interval 60] [--tracking-uri URI] [--limit N] [--rule present] [--cpu] [--once]

It polls ``RUN_DIR/checkpoints`` for complete checkpoints (training writes ``.tmp-step_N`` and renames it, so a
checkpoint still being written is never listed), evaluates each once with the paper's patch inference and logs
``miou/<benchmark>`` (and ``macc/``, ``pacc/``, ``fwiou/``) at the checkpoint's step into the MLflow run named in its
meta.json, with the report folder (JSON, per-class CSV, confusion matrices) as artifacts under
``evaluation/<checkpoint>``. Class names never become metric keys.

What it has done is kept in ``RUN_DIR/eval/service-state.json``; a restarted service carries on from there, and
metrics already in MLflow at a checkpoint's step are not logged again, so each checkpoint is scored once. A failed
evaluation is logged and retried once at the next poll, then recorded as failed (also as a tag on the MLflow run)
and skipped. SIGTERM or SIGINT stops it cleanly: an evaluation in progress is abandoned (and redone after a restart).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from evaluation.benchmarks import BENCHMARKS, parse_benchmarks
from evaluation.evaluate import (
    PRECISIONS,
    EvalConfig,
    EvaluationInterrupted,
    parse_shard_dirs,
    process_state,
    resolve_checkpoint,
    run_evaluation,
)
from evaluation.metrics import DEFAULT_RULE, RULES
from training.checkpoint import read_meta
from training.tracking import is_moved_local_store, local_store_uri, relocate_local_artifacts

log = logging.getLogger("evaluation.service")

STATE_FILE = "service-state.json"
LOCK_FILE = "service.lock"
LOG_FILE = "service.log"
OWNER_FILE = ".service-run"  # in a reports root: the run folder whose reports it holds
LOGGED_METRICS = ("miou", "macc", "pacc", "fwiou")
# MLflow's rule for metric keys; anything else is rejected by the tracking server.
_METRIC_KEY = re.compile(r"^[A-Za-z0-9_\-./ :]{1,250}$")


def metric_key(metric: str, benchmark: str) -> str:
    """Return the MLflow metric key ``<metric>/<benchmark>``, refusing a key MLflow would reject."""
    key = f"{metric}/{benchmark}"
    if not _METRIC_KEY.match(key) or "//" in key or key.startswith("/"):
        raise ValueError(
            f"metric key {key!r} is not a legal MLflow key (letters, digits, '_-./: ' only); per-class figures "
            f"belong in the report artifact"
        )
    return key


@dataclass
class ServiceConfig:
    """What the service watches, what it evaluates and where it logs."""

    watch: Path  # the run folder: RUN_DIR/checkpoints/step_N/{model.safetensors,meta.json}
    benchmarks: tuple[str, ...]  # registry names
    shards: Path | None = None  # shards root; a benchmark reads <shards>/<dataset>/val
    shard_dirs: dict[str, Path] = field(default_factory=dict)  # per-benchmark shard folder
    interval: float = 60.0  # seconds between polls of the checkpoint folder
    tracking_uri: str | None = None  # overrides meta.json's URI (e.g. another machine's view of the server)
    limit: int | None = None  # evaluate only the first N images of each benchmark
    rule: str = DEFAULT_RULE  # metric rule, named in every report
    cpu: bool = False  # evaluate on CPU even when a GPU is present
    precision: str = "fp32"  # fp32 or bf16 (bf16 autocast and weights: the fast path on a GPU)
    compile: bool = False  # torch.compile the aggregation, decoder and image encoders
    fused_kernels: bool = False  # the Swin blocks as Triton kernels (CUDA)
    once: bool = False  # evaluate what is there (with retries), then exit instead of watching
    retries: int = 1  # further attempts after a failed evaluation
    out: Path | None = None  # report folders go to <out>/<checkpoint>; None: RUN_DIR/eval (state, lock, log stay there)

    def __post_init__(self):
        self.watch = Path(self.watch)
        if not self.watch.is_dir():
            raise ValueError(f"ServiceConfig.watch: run folder {self.watch} does not exist")
        if isinstance(self.benchmarks, str):
            self.benchmarks = tuple(b.name for b in parse_benchmarks(self.benchmarks))
        if not self.interval > 0:
            raise ValueError(f"ServiceConfig.interval must be > 0 seconds, got {self.interval!r}")
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"ServiceConfig.retries must be an integer >= 0, got {self.retries!r}")
        self.out = Path(self.out) if self.out is not None else self.state_dir
        # Validates benchmarks, shard folders, limit and rule with the evaluation's own messages; each benchmark's
        # shards are checked now rather than at every checkpoint's evaluation.
        self.eval_config(self.watch).check_all_shards()

    @property
    def state_dir(self) -> Path:
        """The run's service folder, RUN_DIR/eval: state, lock and log, whatever the reports root."""
        return self.watch / "eval"

    def eval_config(self, checkpoint: Path) -> EvalConfig:
        """The evaluation of one checkpoint."""
        return EvalConfig(
            checkpoint=checkpoint,
            benchmarks=tuple(self.benchmarks),
            shards=self.shards,
            shard_dirs=dict(self.shard_dirs),
            out=self.out / Path(checkpoint).name,
            limit=self.limit,
            rule=self.rule,
            cpu=self.cpu,
            progress=False,
            precision=self.precision,
            compile=self.compile,
            fused_kernels=self.fused_kernels,
        )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Ledger:
    """What the service has done per checkpoint, kept in a JSON file replaced atomically on every change."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, dict] = {}
        if path.is_file():
            try:
                self.entries = json.loads(path.read_text())["checkpoints"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path} is not a service state file ({e}); move it away to start afresh") from e

    def get(self, name: str) -> dict:
        """The entry of checkpoint ``name`` ({} when never seen)."""
        return self.entries.get(name, {})

    def update(self, name: str, **fields) -> dict:
        """Change checkpoint ``name``'s entry and write the file."""
        entry = self.entries.setdefault(name, {})
        entry.update(fields, updated=_now())
        self._write()
        return entry

    def forget(self, name: str) -> None:
        """Drop checkpoint ``name``'s entry (a new checkpoint took its name) and write the file."""
        if self.entries.pop(name, None) is not None:
            self._write()

    def _write(self) -> None:
        tmp = self.path.with_name(f".tmp-{os.getpid()}-{self.path.name}")
        tmp.write_text(json.dumps({"version": 1, "checkpoints": self.entries}, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.path)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoint folders, oldest first, as the checkpoint layout's owner lists them."""
    from training.checkpoint import list_checkpoints

    return list_checkpoints(run_dir)


class EvaluationService:
    """Polls a run folder and evaluates each new checkpoint once."""

    def __init__(self, cfg: ServiceConfig, stop: threading.Event | None = None):
        self.cfg = cfg
        self.stop = stop or threading.Event()
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(cfg.state_dir / LOCK_FILE, "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise RuntimeError(
                f"another evaluation service is watching {cfg.watch} (it holds {cfg.state_dir / LOCK_FILE}); stop it first"
            ) from None
        try:
            self._claim_reports_root()
            self.ledger = Ledger(cfg.state_dir / STATE_FILE)
        except BaseException:
            self._lock.close()
            raise
        self._state = None

    def _claim_reports_root(self) -> None:
        """Refuse a reports root that holds another run's reports (their step_N folders would be overwritten).
        The default root, RUN_DIR/eval, is the run's own wherever the run folder moves."""
        self.cfg.out.mkdir(parents=True, exist_ok=True)
        if self.cfg.out.resolve() == self.cfg.state_dir.resolve():
            return
        owner_file = self.cfg.out / OWNER_FILE
        run = str(self.cfg.watch.resolve())
        tmp = owner_file.with_name(f".tmp-{os.getpid()}-{OWNER_FILE}")
        tmp.write_text(run + "\n")
        try:
            os.link(tmp, owner_file)  # atomic and exclusive: of two services starting together, one claims the root
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: an exclusive create, then the content
            try:
                with open(owner_file, "x") as handle:
                    handle.write(run + "\n")
            except FileExistsError:
                pass
        finally:
            tmp.unlink()
        owner = owner_file.read_text().strip()
        if owner != run:
            raise ValueError(
                f"--out {self.cfg.out} holds the reports of run {owner}; give each run its own reports root "
                f"(the default is RUN_DIR/eval)"
            )

    def close(self) -> None:
        """Release the run folder's lock."""
        self._lock.close()

    def _accelerate_state(self):
        if self._state is None:
            self._state = process_state(self.cfg.cpu)
            if self._state.num_processes != 1:
                raise RuntimeError("run the evaluation service as one process (not under accelerate launch)")
        return self._state

    def needs_work(self, ckpt: Path) -> bool:
        """Whether checkpoint ``ckpt`` is still to be evaluated or logged.

        - One written again under the same name (a run taken back to an earlier checkpoint saves its steps anew) is
          evaluated afresh: its meta.json has another creation time than the one evaluated.
        - One evaluated while it named no MLflow run (training writes checkpoints while its tracking store is down,
          and names the run in them once it opens) is logged once it names one.
        """
        entry = self.ledger.get(ckpt.name)
        if not entry:
            return True
        try:
            meta = read_meta(ckpt)
        except Exception:  # pruned or being replaced: looked at again at the next poll
            meta = {}
        if entry.get("created") and meta.get("created") and meta["created"] != entry["created"]:
            log.info("%s was written again (created %s; the one evaluated was created %s); evaluating it afresh",
                     ckpt.name, meta["created"], entry["created"])
            self.ledger.forget(ckpt.name)
            self.ledger.update(ckpt.name, replaces=entry["created"])
            return True
        if entry.get("status") == "done" and not entry.get("mlflow_run_id") and entry.get("report"):
            if meta.get("mlflow_run_id"):
                log.info("%s now names MLflow run %s; logging its scores there", ckpt.name, meta["mlflow_run_id"])
                self.ledger.update(ckpt.name, status="unlogged")
                return True
        return entry.get("status") not in ("done", "failed", "removed")

    def needs_evaluation(self, name: str) -> bool:
        """Whether checkpoint ``name`` is new, was interrupted, or failed with a retry left."""
        return self.ledger.get(name).get("status") in (None, "pending", "retry", "running")

    def run(self) -> int:
        """Watch until stopped (or, with ``once``, until nothing is left to do); return the exit status."""
        log.info("watching %s every %.1f s for %s", self.cfg.watch, self.cfg.interval, ", ".join(self.cfg.benchmarks))
        try:
            while not self.stop.is_set():
                try:
                    todo = [c for c in complete_checkpoints(self.cfg.watch) if self.needs_work(c)]
                except OSError as e:  # e.g. a network file system that went away for a moment
                    log.error("cannot list checkpoints of %s: %s; trying again at the next poll", self.cfg.watch, e)
                    todo = None
                for ckpt in todo or []:
                    if self.stop.is_set():
                        break
                    self.process(ckpt)
                if self.cfg.once and todo is not None:
                    present = [c.name for c in complete_checkpoints(self.cfg.watch)]
                    if not any(self.needs_evaluation(n) for n in present):
                        unlogged = [n for n in present if self.ledger.get(n).get("status") == "unlogged"]
                        if unlogged:
                            log.error("evaluated but not logged into MLflow: %s; run again to log them",
                                      ", ".join(unlogged))
                            return 1
                        break
                self.stop.wait(self.cfg.interval)
        except EvaluationInterrupted as e:
            log.info("stopping: %s", e)
        log.info("stopped")
        return 0

    def process(self, ckpt: Path) -> None:
        """Evaluate one checkpoint (unless its report is already written), then log it into MLflow."""
        name = ckpt.name
        entry = self.ledger.get(name)
        report_path = entry.get("report")
        if entry.get("status") == "unlogged" and report_path and Path(report_path).is_file():
            report = dict(json.loads(Path(report_path).read_text()), report_path=report_path)
        else:
            report = self.evaluate(ckpt)
            if report is None:
                return
        self.log(ckpt, report)

    def evaluate(self, ckpt: Path) -> dict | None:
        """Run the evaluation of one checkpoint; return its report, or None after recording a failure."""
        name = ckpt.name
        entry = self.ledger.get(name)
        if entry.get("status") == "running" and int(entry.get("attempts", 0)) > self.cfg.retries:
            # The service died during every attempt (killed for memory, say): do not let it die again.
            message = f"the service ended during each of {entry['attempts']} attempts"
            log.error("evaluation of %s failed: %s; giving up on it", name, message)
            self._report_failure(ckpt, None, message)  # before the ledger's "failed", which ends the matter
            self.ledger.update(name, status="failed", errors=entry.get("errors", []) + [message])
            return None
        attempt = int(entry.get("attempts", 0)) + 1
        try:
            created = read_meta(ckpt).get("created")  # which checkpoint of this name (see needs_work)
        except Exception:  # a failure resolve_checkpoint reports below
            created = None
        self.ledger.update(name, status="running", attempts=attempt, started=_now(), created=created)
        log.info("evaluating %s (attempt %d of %d)", name, attempt, self.cfg.retries + 1)
        info = None
        try:
            info = resolve_checkpoint(ckpt)
            report = run_evaluation(self.cfg.eval_config(ckpt), stop=self.stop, state=self._accelerate_state())
        except EvaluationInterrupted:
            # Not a failure: the evaluation is redone from scratch after a restart.
            self.ledger.update(name, status="pending", attempts=attempt - 1)
            raise
        except Exception as e:
            message = f"{type(e).__name__}: {e}"
            if not ckpt.exists():
                # Training prunes old checkpoints; one deleted before it was read is gone, not broken.
                log.warning("%s was removed before it could be evaluated; skipping it", name)
                self.ledger.update(name, status="removed", error=message[:2000])
                return None
            final = attempt > self.cfg.retries
            log.error(
                "evaluation of %s failed (attempt %d): %s; %s",
                name,
                attempt,
                message,
                "giving up on it" if final else "will retry at the next poll",
            )
            errors = self.ledger.get(name).get("errors", []) + [message[:2000]]
            if final:  # reported before the ledger says "failed", as a success is logged before "done"
                self._report_failure(ckpt, info, message)
            self.ledger.update(name, status="failed" if final else "retry", errors=errors)
            return None
        finally:
            self._free_memory()
        mious = {b: r["miou"] for b, r in report["benchmarks"].items()}
        # Recorded before logging: if MLflow is unreachable, only the logging is retried, not the evaluation; with
        # the MLflow run named by the checkpoint as it was read, for training may prune the checkpoint before then.
        run = {k: info.meta[k] for k in ("mlflow_run_id", "mlflow_tracking_uri") if info.meta.get(k)}
        self.ledger.update(name, status="unlogged", step=report["step"], miou=mious, report=report["report_path"],
                           mlflow=run)
        log.info("%s (step %s): %s", name, report["step"], ", ".join(f"miou/{b}={_pct(v)}" for b, v in mious.items()))
        return report

    def log(self, ckpt: Path, report: dict) -> None:
        """Log an evaluated checkpoint's report into its MLflow run; on failure, try again at the next poll."""
        name = ckpt.name
        try:
            meta = read_meta(ckpt) if ckpt.is_dir() else {}
        except Exception:  # pruned since: the run id is in the checkpoint folder no more
            meta = {}
        if not meta.get("mlflow_run_id"):  # the MLflow run the checkpoint named when it was evaluated
            meta = {**self.ledger.get(name).get("mlflow", {}), **meta}
        try:
            run_id, uri = self.log_to_mlflow(meta, name, report)
        except Exception as e:
            log.error("logging %s into MLflow failed: %s: %s; will retry at the next poll", name, type(e).__name__, e)
            self.ledger.update(name, status="unlogged", log_error=f"{type(e).__name__}: {e}"[:2000])
            return
        self.ledger.update(name, status="done", mlflow_run_id=run_id, mlflow_tracking_uri=uri, finished=_now())

    def tracking_uri(self, meta: dict) -> str:
        """The tracking URI to log to: --tracking-uri, else the checkpoint's, else the run folder's SQLite store.
        A checkpoint's URI naming a run folder's own store elsewhere means the folder was moved or copied with its
        store: the store it carries is the one (the trainer continues its run there by the same rule)."""
        local = local_store_uri(self.cfg.watch)
        saved = meta.get("mlflow_tracking_uri")
        if self.cfg.tracking_uri:
            uri, source = self.cfg.tracking_uri, "--tracking-uri"
        elif is_moved_local_store(saved, self.cfg.watch):
            uri, source = local, "the moved run folder"
            log.info("the checkpoint names the store %s; logging to the one the run folder carries, %s", saved, local)
        else:
            uri, source = saved or local, "the checkpoint's meta.json" if saved else "the run folder"
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
            raise FileNotFoundError(f"tracking store {uri} (from {source}) not found; pass --tracking-uri with the "
                                    f"store that holds run {meta.get('mlflow_run_id')}")
        if uri == local:  # its artifacts beside it, also after the folder moved
            relocate_local_artifacts(self.cfg.watch)
        return uri

    def log_to_mlflow(self, meta: dict, name: str, report: dict) -> tuple[str | None, str | None]:
        """Log the report's metrics at the checkpoint's step (unless already there) and its folder as artifacts."""
        run_id = meta.get("mlflow_run_id")
        if not run_id:
            log.warning("%s names no MLflow run; report kept at %s only", name, report.get("report_path"))
            return None, None
        from mlflow import MlflowClient
        from mlflow.entities import Metric, RunTag

        uri = self.tracking_uri(meta)
        client = MlflowClient(tracking_uri=uri)
        step = int(report["step"] or 0)
        timestamp = int(time.time() * 1000)
        metrics, held = [], []
        for bench, result in report["benchmarks"].items():
            for metric in LOGGED_METRICS:
                key = metric_key(metric, bench)
                if result[metric] is None:
                    continue
                # A service killed after logging but before recording it must not log the step twice.
                if any(m.step == step for m in client.get_metric_history(run_id, key)):
                    held.append(key)
                    continue
                metrics.append(Metric(key, float(result[metric]), timestamp, step))
        # The rule behind the numbers travels with them (the report artifact names it too).
        tags = [RunTag("evaluation.rule", report["rule"])]
        replaced = self.ledger.get(name).get("replaces")
        if held and replaced:  # MLflow cannot replace a point: say where the new checkpoint's scores are
            note = (f"{', '.join(held)} at step {step} hold the scores of an earlier {name} (created {replaced}); "
                    f"this one's are in {report.get('report_path')}")
            log.warning("MLflow run %s: %s", run_id, note)
            tags.append(RunTag(f"evaluation.not_logged.{name}", note[:5000]))
        client.log_batch(run_id, metrics=metrics, tags=tags)
        report_path = report.get("report_path")
        if report_path:
            client.log_artifacts(run_id, str(Path(report_path).parent), artifact_path=f"evaluation/{name}")
        return run_id, uri

    def _report_failure(self, ckpt: Path, info, message: str) -> None:
        """Record a final failure as a tag on the checkpoint's MLflow run, when it can be found."""
        meta = info.meta if info is not None else {}
        if not meta:
            try:
                meta = read_meta(ckpt)
            except Exception:  # unreadable meta.json: nothing names the run to tag
                return
        run_id = meta.get("mlflow_run_id")
        if not run_id:
            return
        try:
            from mlflow import MlflowClient

            MlflowClient(tracking_uri=self.tracking_uri(meta)).set_tag(
                run_id, f"evaluation.failed.{ckpt.name}", message[:4000]
            )
        except Exception as e:  # the failure is already in the log and the state file
            log.warning("could not tag MLflow run %s with the failure of %s: %s", run_id, ckpt.name, e)

    @staticmethod
    def _free_memory() -> None:
        import gc

        import torch

        gc.collect()  # a compiled model holds itself in a reference cycle (its compiled methods): free it now
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m evaluation.service``."""
    p = argparse.ArgumentParser(prog="python -m evaluation.service", description=__doc__.split("\n")[0])
    p.add_argument("--watch", required=True, type=Path, help="run folder holding checkpoints/")
    p.add_argument(
        "--benchmarks", default="paper", help=f"comma-separated: {', '.join(BENCHMARKS)}; 'paper' = the six (default)"
    )
    p.add_argument("--shards", type=Path, help="shards root; a benchmark reads <shards>/<dataset>/val")
    p.add_argument(
        "--shard-dir", action="append", default=[], metavar="NAME=PATH", help="shard folder for one benchmark"
    )
    p.add_argument("--interval", type=float, default=60.0, help="seconds between polls (default 60)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the checkpoint's, else RUN_DIR/mlflow.db)")
    p.add_argument("--limit", type=int, help="evaluate only the first N images of each benchmark")
    p.add_argument(
        "--rule", default=DEFAULT_RULE, choices=list(RULES), help="rule for classes absent from the ground truth"
    )
    p.add_argument("--cpu", action="store_true", help="evaluate on CPU even when a GPU is present")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="fp32 (default) or bf16: bf16 autocast and weights, the fast path on a GPU")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the aggregation, decoder and image encoders")
    p.add_argument("--fused-kernels", action="store_true",
                   help="run the Swin blocks as Triton kernels (CUDA; catseg.inference.fused_kernels)")
    p.add_argument("--once", action="store_true", help="evaluate the checkpoints present, then exit")
    p.add_argument("--retries", type=int, default=1, help="further attempts after a failure (default 1)")
    p.add_argument("--out", type=Path, help="report folders root (default RUN_DIR/eval)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m evaluation.service``."""
    args = build_parser().parse_args(argv)
    # An unreachable tracking server should cost seconds per poll, not MLflow's default minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        cfg = ServiceConfig(
            watch=args.watch,
            benchmarks=args.benchmarks,
            shards=args.shards,
            shard_dirs=parse_shard_dirs(args.shard_dir),
            interval=args.interval,
            tracking_uri=args.tracking_uri,
            limit=args.limit,
            rule=args.rule,
            cpu=args.cpu,
            precision=args.precision,
            compile=args.compile,
            fused_kernels=args.fused_kernels,
            once=args.once,
            retries=args.retries,
            out=args.out,
        )
        stop = threading.Event()
        service = EvaluationService(cfg, stop)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"service: error: {e}", file=sys.stderr)
        return 2
    handler = logging.FileHandler(cfg.state_dir / LOG_FILE)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)

    def request_stop(signum, frame):
        log.info("received %s; stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        return service.run()
    finally:
        service.close()


if __name__ == "__main__":
    sys.exit(main())
