"""The quickstart end to end in a shortened mode: shards, 2-process training, evaluation, MLflow, pictures."""
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def test_quickstart_short(tmp_path):
    run_dir, data = tmp_path / "run", tmp_path / "data"
    # the folder holds a run the quickstart did not make (a training run's files, no quickstart marker): moved aside,
    # never deleted
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("name: mine\n")
    (run_dir / "keep.txt").write_text("mine")
    result = subprocess.run(
        [sys.executable, "scripts/quickstart.py", "--steps", "12", "--run-dir", str(run_dir), "--data", str(data),
         "--train-images", "48", "--val-images", "6", "--pictures", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "mIoU on the held-out synthetic images" in out and "mlflow ui --backend-store-uri sqlite:///" in out

    summary = json.loads((run_dir / "quickstart.json").read_text())
    assert 0.0 < summary["chance_miou"] < 1.0
    # the mIoU printed is the evaluation's of the last checkpoint, from its report
    report = json.loads((run_dir / "eval" / "step_00000012" / "report.json").read_text())
    assert summary["miou"] == pytest.approx(report["benchmarks"]["synthetic"]["miou"], abs=1e-12)
    assert f"{100 * summary['miou']:.1f}%" in out
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and (aside[0] / "keep.txt").read_text() == "mine"
    assert f"moved to {aside[0]}" in out and not (run_dir / "keep.txt").exists()

    # the embedded MLflow store holds the run with its training and evaluation metrics and the pictures
    client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["model.preset"] == "catseg_tiny"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert len(losses) >= 2 and all(m.value > 0 for m in losses)
    mious = client.get_metric_history(run.info.run_id, "miou/synthetic")
    assert mious and max(m.step for m in mious) == 12
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "pictures")}
    assert {"pictures/training_curve.png", "pictures/prediction_0.png", "pictures/prediction_1.png"} <= artifacts

    for name in ("training_curve.png", "prediction_0.png", "prediction_1.png"):
        with Image.open(run_dir / "pictures" / name) as im:
            im.load()
            assert im.width > 100 and im.height > 100

    # run again: the earlier quickstart run is replaced, not mixed with the new one
    again = subprocess.run(
        [sys.executable, "scripts/quickstart.py", "--steps", "3", "--run-dir", str(run_dir), "--data", str(data),
         "--train-images", "48", "--val-images", "6", "--pictures", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"replacing the earlier quickstart run in {run_dir}" in again.stdout
    second = json.loads((run_dir / "quickstart.json").read_text())
    assert second["step"] == 3 and second["mlflow_run_id"] != summary["mlflow_run_id"]
    # a folder that holds no run is refused
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    refused = subprocess.run([sys.executable, "scripts/quickstart.py", "--run-dir", str(other)], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "is not empty and holds no training run" in refused.stderr
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
