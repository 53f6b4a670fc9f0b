"""The evaluation service against a real MLflow server: new checkpoints scored once, restarts, failures, SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import catseg
from data_prep.synthetic import SyntheticConfig, write_synthetic
from evaluation.service import STATE_FILE, EvaluationService, ServiceConfig, metric_key
from evaluation.service import main as service_main
from training.checkpoint import checkpoint_name

from test_training_fixtures import MLFLOW_SERVER_ENV, free_port, mlflow_server_cmd

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 with a SQLite store."""
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(folder / "server.log", "wb")
    server = subprocess.Popen(
        mlflow_server_cmd(folder, port), cwd=folder, env=dict(ENV, **MLFLOW_SERVER_ENV), stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {(folder / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            # Uvicorn waits for idle keep-alive connections of this process's client; no need to be gentle.
            server.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.fixture(scope="module")
def shards_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_synthetic(root, SyntheticConfig(num_train=0, num_val=4, size=64, seed=5, shard_size=4))
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    catseg.save_weights(catseg.create_model("catseg_tiny"), path)
    return path


def write_checkpoint(run_dir: Path, step: int, weights: Path, meta: dict, slow: float = 0.0, corrupt: bool = False):
    """Write a checkpoint as training does: into .tmp-step_N (slowly if asked), then rename into place."""
    final = run_dir / "checkpoints" / checkpoint_name(step)
    tmp = final.with_name(f".tmp-{final.name}")
    tmp.mkdir(parents=True)
    data = os.urandom(4096) if corrupt else weights.read_bytes()
    chunks = 8
    with open(tmp / "model.safetensors", "wb") as f:
        for i in range(chunks):
            f.write(data[i * len(data) // chunks:(i + 1) * len(data) // chunks])
            f.flush()
            time.sleep(slow / chunks)
    (tmp / "meta.json").write_text(json.dumps({"created": "now", **meta, "step": step, "preset": "catseg_tiny"}))
    os.replace(tmp, final)
    return final


@pytest.fixture
def start_service():
    """Start the service as a subprocess; whatever the test's outcome, none outlives it."""
    started = []

    def start(run_dir: Path, shards_root: Path, *extra: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "evaluation.service", "--watch", str(run_dir), "--benchmarks", "synthetic",
               "--shards", str(shards_root), "--interval", "0.3", "--cpu", *extra]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def ledger(run_dir: Path) -> dict:
    path = run_dir / "eval" / STATE_FILE
    return json.loads(path.read_text())["checkpoints"] if path.is_file() else {}


def wait_for(condition, service: subprocess.Popen, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if service.poll() is not None:
            pytest.fail(f"service exited ({service.returncode}) while waiting for {what}:\n{service.stdout.read()}")
        if time.monotonic() > deadline:
            service.kill()
            pytest.fail(f"timed out waiting for {what}:\n{service.communicate()[0][-4000:]}")
        time.sleep(0.2)


def stop(service: subprocess.Popen) -> str:
    service.send_signal(signal.SIGTERM)
    out, _ = service.communicate(timeout=60)
    assert service.returncode == 0, out
    return out


def steps_logged(client, run_id: str, key: str = "miou/synthetic") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def done(run_dir: Path, *steps: int):
    return lambda: all(ledger(run_dir).get(checkpoint_name(s), {}).get("status") == "done" for s in steps)


def test_service_scores_each_checkpoint_once_across_restarts(mlflow_uri, shards_root, weights, tmp_path,
                                                            start_service):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    run_id = client.create_run(client.create_experiment("service-test")).info.run_id
    meta = {"mlflow_run_id": run_id, "mlflow_tracking_uri": mlflow_uri}
    run_dir = tmp_path / "run"
    write_checkpoint(run_dir, 10, weights, meta)

    # Two checkpoints, the second written slowly while the service watches.
    service = start_service(run_dir, shards_root)
    wait_for(done(run_dir, 10), service, "step 10")
    write_checkpoint(run_dir, 20, weights, meta, slow=2.0)
    wait_for(done(run_dir, 20), service, "step 20")
    out = stop(service)
    assert "received SIGTERM" in out and "stopped" in out

    state = ledger(run_dir)
    assert sorted(state) == [checkpoint_name(10), checkpoint_name(20)]  # never the .tmp- folder
    assert all(e["attempts"] == 1 and "errors" not in e for e in state.values())
    assert steps_logged(client, run_id) == [10, 20]
    assert client.get_run(run_id).data.tags["evaluation.rule"] == "present"
    for key in ("macc/synthetic", "pacc/synthetic", "fwiou/synthetic"):
        assert steps_logged(client, run_id, key) == [10, 20]
    report = json.loads((run_dir / "eval" / checkpoint_name(20) / "report.json").read_text())
    assert report["step"] == 20 and report["rule"] == "present"
    logged = {m.step: m.value for m in client.get_metric_history(run_id, "miou/synthetic")}
    assert logged[20] == pytest.approx(report["benchmarks"]["synthetic"]["miou"])
    artifacts = {f.path for f in client.list_artifacts(run_id, f"evaluation/{checkpoint_name(20)}")}
    assert {f"evaluation/{checkpoint_name(20)}/{n}" for n in ("report.json", "synthetic.csv")} <= artifacts

    # Restarted: nothing evaluated twice; a corrupt checkpoint is reported, retried once, skipped.
    write_checkpoint(run_dir, 30, weights, meta, corrupt=True)
    write_checkpoint(run_dir, 40, weights, meta)
    service = start_service(run_dir, shards_root)
    wait_for(lambda: done(run_dir, 40)() and ledger(run_dir).get(checkpoint_name(30), {}).get("status") == "failed",
             service, "step 40 and the corrupt step 30")
    state = ledger(run_dir)
    bad = state[checkpoint_name(30)]
    assert bad["attempts"] == 2 and len(bad["errors"]) == 2 and "safetensors" in bad["errors"][0]
    assert client.get_run(run_id).data.tags[f"evaluation.failed.{checkpoint_name(30)}"].startswith("ValueError")
    assert steps_logged(client, run_id) == [10, 20, 40]
    assert all(state[checkpoint_name(s)]["attempts"] == 1 for s in (10, 20, 40))

    # Stopped in the middle of an evaluation, then restarted: the interrupted checkpoint is finished once.
    write_checkpoint(run_dir, 50, weights, meta)
    log_file = run_dir / "eval" / "service.log"
    wait_for(lambda: f"evaluating {checkpoint_name(50)}" in log_file.read_text(),
             service, "the evaluation of step 50 to start")
    out = stop(service)
    assert f"evaluation of {checkpoint_name(30)} failed" in out
    assert checkpoint_name(10) not in out and checkpoint_name(20) not in out  # not even looked at again
    assert ledger(run_dir)[checkpoint_name(50)]["status"] in ("pending", "done")
    restarted = EvaluationService(
        ServiceConfig(watch=run_dir, benchmarks="synthetic", shards=shards_root, interval=0.3, cpu=True, once=True)
    )
    try:
        assert restarted.run() == 0
    finally:
        restarted.close()
    assert steps_logged(client, run_id) == [10, 20, 40, 50]
    assert ledger(run_dir)[checkpoint_name(50)]["status"] == "done"
    assert ledger(run_dir)[checkpoint_name(30)]["attempts"] == 2


def test_stop_request_abandons_an_evaluation_without_counting_it(tmp_path, shards_root, weights):
    import threading

    from evaluation.evaluate import EvaluationInterrupted

    ckpt = write_checkpoint(tmp_path, 7, weights, {})
    stop_event = threading.Event()
    stop_event.set()
    service = EvaluationService(ServiceConfig(watch=tmp_path, benchmarks="synthetic", shards=shards_root, cpu=True),
                                stop_event)
    try:
        with pytest.raises(EvaluationInterrupted):
            service.process(ckpt)
    finally:
        service.close()
    entry = ledger(tmp_path)[ckpt.name]
    assert entry["status"] == "pending" and entry["attempts"] == 0
    assert not (tmp_path / "eval" / ckpt.name / "report.json").exists()


def _run_once(cfg: ServiceConfig) -> int:
    service = EvaluationService(cfg)
    try:
        return service.run()
    finally:
        service.close()


def _embedded_run(run_dir: Path, weights: Path, step: int = 3, record_uri: bool = False):
    """A run folder with its own MLflow store (an experiment with its artifacts in the folder, one run) and a
    checkpoint naming that run (and the store, with record_uri); returns (client, run id)."""
    from mlflow import MlflowClient

    run_dir.mkdir()
    uri = f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("embedded", artifact_location=(run_dir / "mlartifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    meta = {"mlflow_run_id": run_id} | ({"mlflow_tracking_uri": uri} if record_uri else {})
    write_checkpoint(run_dir, step, weights, meta)
    return client, run_id


def test_unreachable_tracking_then_the_embedded_store(tmp_path, shards_root, weights, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    run_dir = tmp_path / "run"
    client, run_id = _embedded_run(run_dir, weights)
    name = checkpoint_name(3)
    common = dict(watch=run_dir, benchmarks="synthetic", shards=shards_root, cpu=True, once=True, interval=0.1)

    # Nothing listens on this port: evaluated, kept as unlogged, and the one-shot run says so.
    down = f"http://127.0.0.1:{free_port()}"
    assert _run_once(ServiceConfig(tracking_uri=down, **common)) == 1
    entry = ledger(run_dir)[name]
    assert entry["status"] == "unlogged" and entry["attempts"] == 1 and "log_error" in entry
    assert Path(entry["report"]).is_file()
    assert steps_logged(client, run_id) == []

    # No tracking URI anywhere: the run folder's SQLite store; only the logging is redone.
    assert _run_once(ServiceConfig(**common)) == 0
    entry = ledger(run_dir)[name]
    assert entry["status"] == "done" and entry["attempts"] == 1
    assert entry["mlflow_tracking_uri"] == f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    assert steps_logged(client, run_id) == [3]
    assert (run_dir / "mlartifacts").is_dir()
    assert f"evaluation/{name}/report.json" in {f.path for f in client.list_artifacts(run_id, f"evaluation/{name}")}


@pytest.mark.parametrize("how", ["moved", "copied"])
def test_a_moved_run_folder_is_scored_into_the_store_it_carries(tmp_path, shards_root, weights, how):
    """A checkpoint names its run folder's own store at the folder's old place: the service logs to the store the
    moved (or copied) folder carries, and the report's artifacts land in that folder, not at the old place. A copy's
    original, still there, is left as it was: the trainer continues the copy's run in the copy's store too."""
    import shutil

    from mlflow import MlflowClient

    first, moved = tmp_path / "first", tmp_path / how
    client, run_id = _embedded_run(first, weights, record_uri=True)
    uri = f"sqlite:///{(first / 'mlflow.db').resolve()}"
    first.rename(moved) if how == "moved" else shutil.copytree(first, moved)
    common = dict(benchmarks="synthetic", shards=shards_root, cpu=True, once=True, interval=0.1)
    assert _run_once(ServiceConfig(watch=moved, **common)) == 0
    name = checkpoint_name(3)
    assert ledger(moved)[name]["status"] == "done"
    assert ledger(moved)[name]["mlflow_tracking_uri"] == f"sqlite:///{(moved / 'mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=f"sqlite:///{(moved / 'mlflow.db').resolve()}")
    assert steps_logged(client, run_id) == [3]
    assert f"evaluation/{name}/report.json" in {f.path for f in client.list_artifacts(run_id, f"evaluation/{name}")}
    assert (moved / "mlartifacts" / run_id / "artifacts" / "evaluation" / name / "report.json").is_file()
    if how == "moved":
        assert not first.exists()
    else:
        assert steps_logged(MlflowClient(tracking_uri=uri), run_id) == []
        assert not (first / "mlartifacts" / run_id / "artifacts" / "evaluation").exists()


def test_a_missing_tracking_store_is_named_and_the_logging_retried(tmp_path, shards_root, weights):
    """A store that is not there (a SQLite file named by --tracking-uri) is not created empty: the logging fails
    with its path named, the evaluation is kept, and the next poll logs once the right store is given."""
    run_dir = tmp_path / "run"
    client, run_id = _embedded_run(run_dir, weights)
    missing = tmp_path / "elsewhere" / "store.db"
    common = dict(watch=run_dir, benchmarks="synthetic", shards=shards_root, cpu=True, once=True, interval=0.1)
    assert _run_once(ServiceConfig(tracking_uri=f"sqlite:///{missing}", **common)) == 1
    entry = ledger(run_dir)[checkpoint_name(3)]
    assert entry["status"] == "unlogged"
    assert str(missing) in entry["log_error"] and "--tracking-uri" in entry["log_error"]
    assert not missing.exists()
    assert _run_once(ServiceConfig(**common)) == 0
    assert steps_logged(client, run_id) == [3]


def test_a_checkpoint_pruned_after_its_evaluation_is_still_logged(tmp_path, shards_root, weights):
    """Training prunes old checkpoints: one removed between its evaluation and the logging still has its mIoU logged
    into the MLflow run it named when it was read."""
    import shutil

    run_dir = tmp_path / "run"
    client, run_id = _embedded_run(run_dir, weights)
    service = EvaluationService(ServiceConfig(watch=run_dir, benchmarks="synthetic", shards=shards_root, cpu=True,
                                              once=True, interval=0.1))
    try:
        ckpt = run_dir / "checkpoints" / checkpoint_name(3)
        report = service.evaluate(ckpt)
        shutil.rmtree(ckpt)
        service.log(ckpt, report)
    finally:
        service.close()
    assert ledger(run_dir)[checkpoint_name(3)]["status"] == "done"
    assert steps_logged(client, run_id) == [3]


def test_a_checkpoint_that_names_its_run_later_is_logged_then(tmp_path, shards_root, weights):
    """A checkpoint written while training's tracking store was down names no MLflow run when it is evaluated; once
    training names the run in it (ckpt.record_mlflow_run, as the trainer does when its run opens), the next poll
    logs its scores there without evaluating it again."""
    from mlflow import MlflowClient

    from training.checkpoint import record_mlflow_run

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_checkpoint(run_dir, 3, weights, {})
    common = dict(watch=run_dir, benchmarks="synthetic", shards=shards_root, cpu=True, once=True, interval=0.1)
    assert _run_once(ServiceConfig(**common)) == 0
    entry = ledger(run_dir)[checkpoint_name(3)]
    assert entry["status"] == "done" and entry["mlflow_run_id"] is None

    uri = f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("late", artifact_location=(run_dir / "mlartifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    assert record_mlflow_run(run_dir, run_id, uri) == [run_dir / "checkpoints" / checkpoint_name(3)]
    assert record_mlflow_run(run_dir, run_id, uri) == []  # named once
    assert _run_once(ServiceConfig(**common)) == 0
    entry = ledger(run_dir)[checkpoint_name(3)]
    assert entry["status"] == "done" and entry["mlflow_run_id"] == run_id and entry["attempts"] == 1
    assert steps_logged(client, run_id) == [3]


def test_a_checkpoint_written_again_under_its_name_is_evaluated_again(tmp_path, shards_root, weights):
    """A run taken back to an earlier checkpoint saves its later steps anew, under the names the first training's
    checkpoints had (and logs to a new MLflow run): the service tells them apart by their creation time and evaluates
    the new one into the run it names; the first run keeps its score."""
    import shutil

    run_dir = tmp_path / "run"
    client, first = _embedded_run(run_dir, weights)
    common = dict(watch=run_dir, benchmarks="synthetic", shards=shards_root, cpu=True, once=True, interval=0.1)
    assert _run_once(ServiceConfig(**common)) == 0
    name = checkpoint_name(3)
    assert ledger(run_dir)[name]["created"] == "now"

    second = client.create_run(client.get_run(first).info.experiment_id).info.run_id
    shutil.rmtree(run_dir / "checkpoints" / name)
    write_checkpoint(run_dir, 3, weights, {"mlflow_run_id": second, "created": "later"})
    assert _run_once(ServiceConfig(**common)) == 0
    entry = ledger(run_dir)[name]
    assert entry["created"] == "later" and entry["status"] == "done" and entry["mlflow_run_id"] == second
    assert steps_logged(client, first) == [3] and steps_logged(client, second) == [3]
    assert _run_once(ServiceConfig(**common)) == 0 and ledger(run_dir)[name]["updated"] == entry["updated"]
    # written again into the same MLflow run, which holds a score at the step already: not logged twice, but said
    shutil.rmtree(run_dir / "checkpoints" / name)
    write_checkpoint(run_dir, 3, weights, {"mlflow_run_id": second, "created": "latest"})
    assert _run_once(ServiceConfig(**common)) == 0
    assert ledger(run_dir)[name]["created"] == "latest" and steps_logged(client, second) == [3]
    note = client.get_run(second).data.tags[f"evaluation.not_logged.{name}"]
    assert "hold the scores of an earlier step_00000003 (created later)" in note and "report.json" in note


def test_metric_keys_refuse_class_names_with_commas():
    assert metric_key("miou", "ade847") == "miou/ade847"
    with pytest.raises(ValueError, match="not a legal MLflow key"):
        metric_key("iou", "person, individual, someone")


def test_one_service_per_run_folder(tmp_path, shards_root, capsys, monkeypatch):
    (tmp_path / "checkpoints").mkdir()
    cfg = ServiceConfig(watch=tmp_path, benchmarks="synthetic", shards=shards_root)
    first = EvaluationService(cfg)
    try:
        with pytest.raises(RuntimeError, match="another evaluation service is watching"):
            EvaluationService(cfg)
    finally:
        first.close()
    EvaluationService(cfg).close()  # free again once the first let go
    # a reports root elsewhere: the state and lock stay in the run folder, and the root serves this run only
    reports = tmp_path / "reports"
    shared = ServiceConfig(watch=tmp_path, benchmarks="synthetic", shards=shards_root, out=reports)
    first = EvaluationService(shared)
    try:
        with pytest.raises(RuntimeError, match="another evaluation service is watching"):
            EvaluationService(cfg)
    finally:
        first.close()
    assert (tmp_path / "eval" / "service.lock").is_file() and not (reports / "service.lock").exists()
    other_run = tmp_path / "other-run"
    (other_run / "checkpoints").mkdir(parents=True)
    other = ServiceConfig(watch=other_run, benchmarks="synthetic", shards=shards_root, out=reports)
    with pytest.raises(ValueError, match=f"--out {reports} holds the reports of run {tmp_path.resolve()}"):
        EvaluationService(other)
    EvaluationService(other_run_config := ServiceConfig(watch=other_run, benchmarks="synthetic", shards=shards_root)).close()
    assert other_run_config.out == other_run / "eval"
    moved = tmp_path / "moved-run"
    other_run.rename(moved)  # a run folder copied or mounted elsewhere keeps its own default reports root
    EvaluationService(ServiceConfig(watch=moved, benchmarks="synthetic", shards=shards_root)).close()
    with pytest.raises(ValueError, match="ServiceConfig.watch: run folder .* does not exist"):
        ServiceConfig(watch=tmp_path / "missing", benchmarks="synthetic", shards=shards_root)
    with pytest.raises(ValueError, match="ServiceConfig.interval must be > 0"):
        ServiceConfig(watch=tmp_path, benchmarks="synthetic", shards=shards_root, interval=0)
    # every benchmark's shards are checked when the service starts, not at each checkpoint's evaluation
    with pytest.raises(FileNotFoundError, match="benchmark 'pc59': no shard folder"):
        ServiceConfig(watch=tmp_path, benchmarks="synthetic,pc59", shards=shards_root)
    for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")):
        monkeypatch.setenv(name, os.environ.get(name, value))  # what main sets where unset, undone after the test
    assert service_main(["--watch", str(tmp_path), "--benchmarks", "synthetic,pc59", "--shards", str(shards_root)]) == 2
    assert "service: error: benchmark 'pc59': no shard folder" in capsys.readouterr().err
