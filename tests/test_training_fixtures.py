"""Shared helpers for the training tests: synthetic shards, free ports, accelerate launch subprocesses."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable


def write_synthetic(out: Path, train: int = 96, val: int = 24, shard_size: int = 24) -> Path:
    """Synthetic shards (128 px, 8 classes) under out/synthetic/{train,val}; returns out/synthetic."""
    from data_prep import synthetic

    synthetic.write_synthetic(out, synthetic.SyntheticConfig(num_train=train, num_val=val, size=128,
                                                             shard_size=shard_size))
    return out / "synthetic"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_server_cmd(folder: Path, port: int) -> list[str]:
    """`mlflow server` on 127.0.0.1:`port`, its SQLite store and artifacts in `folder`. Run it with
    MLFLOW_SERVER_ENV added to the environment."""
    return [PYTHON, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
            "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1"]


# the tracking server without its job workers (three more processes, 4 s more to start): the tests only track
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def base_env(cpu: bool = True) -> dict:
    """Environment of a training subprocess: one thread per process, offline, optional forced CPU."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    if cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    return env


def launch_cmd(train_args: list[str], launch_config: str = "launch/cpu.yaml", num_processes: int = 2,
               port: int | None = None, extra: list[str] | None = None) -> list[str]:
    """`accelerate launch` (as a module of the venv's Python) of training/train.py."""
    return [PYTHON, "-m", "accelerate.commands.launch", "--config_file", launch_config,
            "--num_processes", str(num_processes), "--main_process_port", str(port or free_port()),
            *(extra or []), "training/train.py", *train_args]


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start a command in the repository root with its output in ``log``."""
    handle = open(log, "w")
    return subprocess.Popen(cmd, cwd=REPO, env=env or base_env(), stdout=handle, stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> str:
    """Wait for a process and return its output; kill its whole group on timeout."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"timed out after {timeout} s; output:\n{log.read_text()[-4000:]}")
    return log.read_text()


def run(cmd: list[str], log: Path, env: dict | None = None, timeout: float = 240) -> str:
    """Run a command to the end, assert it succeeded, return its output."""
    proc = start(cmd, log, env)
    out = finish(proc, log, timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{out[-6000:]}"
    return out


def metrics(run_dir: Path) -> list[dict]:
    """The records of a run's local metrics file."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Poll until ``predicate()`` is true; fail naming ``what`` (and the log) otherwise."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (exit {proc.returncode}) before {what}:\n"
                                 f"{log.read_text()[-4000:] if log else ''}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-4000:] if log else ''}")


def miou_on_val(weights: Path, val: Path) -> float:
    """mIoU of a catseg_tiny weights file on held-out synthetic images (classes present in the ground truth)."""
    import torch
    import torch.nn.functional as F

    import catseg
    from data_prep.shards import iter_samples, read_dataset_info

    model = catseg.create_model("catseg_tiny", pretrained=weights).eval()
    names = read_dataset_info(val)["class_names"]
    n = len(names)
    conf = np.zeros((n, n), np.int64)
    with torch.no_grad():
        for image, label, _ in iter_samples(val):
            x = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255
            pred = F.interpolate(model(x, names), size=label.shape, mode="bilinear").argmax(1)[0].numpy()
            keep = label != 255
            conf += np.bincount(label[keep] * n + pred[keep], minlength=n * n).reshape(n, n)
    tp = np.diag(conf)
    iou = tp / np.maximum(conf.sum(0) + conf.sum(1) - tp, 1)
    return float(iou[conf.sum(1) > 0].mean())
