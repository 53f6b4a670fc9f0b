"""The whole job on a CPU: synthetic shards -> 2-process training -> patch-inference evaluation -> MLflow -> pictures.

    .venv/bin/python scripts/quickstart.py [--steps 300] [--run-dir runs/quickstart]

Steps:
1. `python -m data_prep.synthetic` writes train and held-out val shards (8 textured classes, 128 px).
2. `accelerate launch` (two CPU processes, gloo) runs training/train.py on configs/quickstart.yaml with catseg_tiny;
   metrics go to the embedded MLflow store RUN_DIR/mlflow.db.
3. `python -m evaluation.service --once` scores every checkpoint on the val shards with patch inference and logs
   miou/synthetic at each checkpoint's step into the training's MLflow run.
4. Prediction overlays (image | ground truth | prediction) and the training curve are written as PNGs and logged
   as artifacts of the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(cmd: list[str], what: str, env: dict | None = None) -> None:
    print(f"\n==> {what}\n    {' '.join(cmd)}", flush=True)
    t = time.time()
    result = subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})})
    if result.returncode != 0:
        sys.exit(f"quickstart: {what} failed (exit {result.returncode}); see the output above")
    print(f"    done in {time.time() - t:.0f} s", flush=True)


def training_curve(metrics_file: Path, out: Path) -> Path:
    """Loss and learning rate against the step, from the run's local metric log."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="training loss (per-pixel BCE)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def prediction_overlays(weights: Path, val_dir: Path, out_dir: Path, count: int) -> list[Path]:
    """image | ground truth | prediction panels for the first `count` val images."""
    import numpy as np
    from PIL import Image

    import catseg
    from catseg.cli import overlay_with_legend
    from catseg.inference import Segmenter
    from data_prep.shards import iter_samples, read_dataset_info

    names = read_dataset_info(val_dir)["class_names"]
    seg = Segmenter(catseg.create_model("catseg_tiny", pretrained=str(weights)), device="cpu")
    paths = []
    for i, (image, label, meta) in enumerate(iter_samples(val_dir)):
        if i == count:
            break
        pred = seg.predict(image, names)[0].labels
        shown = np.where(label == 255, pred, label)  # paint ignore pixels with the prediction for display
        truth = overlay_with_legend(image, shown, names)
        guess = overlay_with_legend(image, pred, names)
        panel = Image.new("RGB", (image.shape[1] + truth.width + guess.width, max(truth.height, guess.height)),
                          (255, 255, 255))
        panel.paste(Image.fromarray(image), (0, 0))
        panel.paste(truth, (image.shape[1], 0))
        panel.paste(guess, (image.shape[1] + truth.width, 0))
        path = out_dir / f"prediction_{i}.png"
        panel.save(path)
        paths.append(path)
    return paths


def chance_miou(val_dir: Path) -> float:
    """Expected mIoU of a predictor guessing every pixel's class uniformly at random (the floor to beat)."""
    import numpy as np
    from data_prep.shards import iter_samples, read_dataset_info

    k = read_dataset_info(val_dir)["num_classes"]
    counts = np.zeros(k)
    for _, label, _ in iter_samples(val_dir):
        counts += np.bincount(label[label != 255].ravel(), minlength=k)[:k]
    f = counts[counts > 0] / counts.sum()
    return float(np.mean((f / k) / (f + 1 / k - f / k)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    p.add_argument("--run-dir", type=Path, default=REPO / "runs" / "quickstart",
                   help="run folder (default runs/quickstart); a rerun replaces the earlier quickstart run in it, and "
                        "moves any other run there aside")
    p.add_argument("--data", type=Path, default=REPO / "data" / "shards", help="where the synthetic shards go")
    p.add_argument("--train-images", type=int, default=400)
    p.add_argument("--val-images", type=int, default=40)
    p.add_argument("--pictures", type=int, default=4)
    args = p.parse_args(argv)
    started = time.time()
    run_dir = args.run_dir.resolve()
    data = args.data.resolve()
    py = sys.executable
    bin_dir = Path(py).parent
    accelerate = str(bin_dir / "accelerate") if (bin_dir / "accelerate").exists() else "accelerate"

    marker = run_dir / ".quickstart"  # this folder holds a quickstart's run: a rerun replaces it
    if run_dir.exists() and any(run_dir.iterdir()):
        if marker.is_file():
            print(f"quickstart: replacing the earlier quickstart run in {run_dir}", flush=True)
            shutil.rmtree(run_dir)
        elif not any((run_dir / name).exists() for name in ("checkpoints", "metrics.jsonl", "config.yaml")):
            sys.exit(f"quickstart: {run_dir} is not empty and holds no training run; give another --run-dir")
        else:  # someone else's run (say, a longer training with configs/quickstart.yaml): kept, moved aside
            aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            print(f"quickstart: {run_dir} holds a run the quickstart did not make; moved to {aside}", flush=True)
            run_dir.rename(aside)
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text("a quickstart run; the next quickstart replaces this folder\n")

    run([py, "-m", "data_prep.synthetic", "--out", str(data), "--train", str(args.train_images),
         "--val", str(args.val_images)], "1/4 synthetic dataset shards")
    ckpt_every = max(1, args.steps // 3)
    run([accelerate, "launch", "--config_file", "launch/cpu.yaml", "training/train.py",
         "--config", "configs/quickstart.yaml", "--run-dir", str(run_dir), "--resume", "none",
         "--set", f"data.root={data / 'synthetic' / 'train'}", f"train.steps={args.steps}",
         f"train.ckpt_every={ckpt_every}", f"schedule.warmup_steps={min(10, args.steps // 10)}"],
        "2/4 training catseg_tiny with two CPU processes", env={"ACCELERATE_USE_CPU": "true"})

    from catseg.files import write_json_atomic
    from training.checkpoint import latest_checkpoint, read_meta
    last = latest_checkpoint(run_dir)
    if last is None:
        sys.exit(f"quickstart: training wrote no checkpoint under {run_dir}")
    run([py, "-m", "evaluation.service", "--watch", str(run_dir), "--benchmarks", "synthetic", "--shards", str(data),
         "--once", "--cpu"], "3/4 patch-inference evaluation of every checkpoint on the held-out val shards")

    print("\n==> 4/4 pictures", flush=True)
    pictures = run_dir / "pictures"
    pictures.mkdir(parents=True, exist_ok=True)
    files = prediction_overlays(last / "model.safetensors", data / "synthetic" / "val", pictures, args.pictures)
    files.append(training_curve(run_dir / "metrics.jsonl", pictures / "training_curve.png"))

    import mlflow
    meta = read_meta(last)
    uri = meta["mlflow_tracking_uri"]
    client = mlflow.MlflowClient(uri)
    for f in files:
        client.log_artifact(meta["mlflow_run_id"], str(f), "pictures")
    history = client.get_metric_history(meta["mlflow_run_id"], "miou/synthetic")
    if not history:
        sys.exit("quickstart: no miou/synthetic metric was logged; see the evaluation output above")
    miou = max(history, key=lambda m: m.step).value
    chance = chance_miou(data / "synthetic" / "val")
    summary = {"miou": miou, "chance_miou": chance, "step": meta["step"], "seconds": round(time.time() - started),
               "pictures": [str(f) for f in files], "mlflow_tracking_uri": uri, "mlflow_run_id": meta["mlflow_run_id"]}
    write_json_atomic(run_dir / "quickstart.json", summary)
    store = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None
    print(f"\nquickstart done in {summary['seconds']} s")
    print(f"  mIoU on the held-out synthetic images (patch inference, step {meta['step']}): {100 * miou:.1f}% "
          f"(chance: {100 * chance:.1f}%)")
    print(f"  pictures: {pictures}/ (prediction_*.png, training_curve.png)")
    if store:
        print(f"  MLflow UI: {bin_dir / 'mlflow'} ui --backend-store-uri sqlite:///{store} --host 127.0.0.1 "
              f"--port 5000   (then open http://127.0.0.1:5000)")
    else:
        print(f"  MLflow: run {meta['mlflow_run_id']} at {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
