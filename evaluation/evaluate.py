"""Evaluate a checkpoint's mIoU on benchmark shards with the paper's patch inference.

Usage:
    python -m evaluation.evaluate --checkpoint RUN_DIR/checkpoints/step_00080000 --benchmarks ade150,pc59 \
        --shards data/shards [--out DIR] [--limit N] [--rule present|absent_as_zero] [--cpu] \
        [--precision fp32|bf16] [--compile] [--fused-kernels]
    accelerate launch --num_processes 4 -m evaluation.evaluate ...            # several GPUs
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m evaluation.evaluate ...  # CPUs

Images are split across processes (image i goes to process i mod world); each process accumulates an int64
confusion matrix and the matrices are summed, so the numbers do not depend on the number of processes. The main
process writes ``report.json`` (per-class IoU with class names, mIoU, rule, checkpoint, step, seconds, images/s),
``<benchmark>.csv`` (per class) and ``<benchmark>_confusion.npy`` (to recompute under the other rule).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
import tarfile
import threading
import time
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from data_prep.shards import write_bytes_atomic
from evaluation.benchmarks import BENCHMARKS, Benchmark, get_benchmark, parse_benchmarks
from evaluation.metrics import DEFAULT_RULE, RULES, confusion_matrix, reduce_confusion, summarize
from training.checkpoint import META_FILE, WEIGHTS_FILE, CheckpointError, read_meta

REPORT_FILE = "report.json"
PRECISIONS = ("fp32", "bf16")


class EvaluationInterrupted(RuntimeError):
    """Raised when an evaluation is asked to stop before it finished."""


class EvaluationFailed(RuntimeError):
    """Raised in every process when the evaluation failed in another one (which reports the cause)."""


@dataclass
class EvalConfig:
    """What to evaluate and where to write the report."""

    checkpoint: Path  # checkpoint folder (model.safetensors + meta.json) or a .safetensors file
    benchmarks: tuple[str, ...]  # registry names, in report order
    shards: Path | None = None  # shards root: a benchmark reads <shards>/<dataset>/val
    shard_dirs: dict[str, Path] = field(default_factory=dict)  # per-benchmark shard folder, overrides `shards`
    out: Path | None = None  # report folder; None: ./eval/<checkpoint name>
    limit: int | None = None  # evaluate only the first N images of each benchmark
    rule: str = DEFAULT_RULE  # metric rule for classes absent from the ground truth
    cpu: bool = False  # run on CPU even when a GPU is present
    progress: bool = True  # show a progress bar on the main process
    precision: str = "fp32"  # fp32; or bf16: bf16 autocast with bf16 weights, the GPU's fast path (catseg.Segmenter's)
    compile: bool = False  # torch.compile the aggregation, decoder and encoders (pays over a benchmark's images)
    fused_kernels: bool = False  # the Swin blocks as Triton kernels (catseg.inference.fused_kernels; CUDA)
    class_chunk: int | None = None  # classes the model runs at once (None: catseg.inference.DEFAULT_CLASS_CHUNK)

    def __post_init__(self):
        self.checkpoint = Path(self.checkpoint)
        if isinstance(self.benchmarks, str):
            self.benchmarks = tuple(b.name for b in parse_benchmarks(self.benchmarks))
        self.benchmarks = tuple(self.benchmarks)
        if not self.benchmarks:
            raise ValueError(f"EvalConfig.benchmarks is empty; choose from: {', '.join(BENCHMARKS)}")
        for name in self.benchmarks:
            get_benchmark(name)
        self.shard_dirs = {k: Path(v) for k, v in self.shard_dirs.items()}
        for name in self.shard_dirs:
            if name not in self.benchmarks:
                raise ValueError(
                    f"EvalConfig.shard_dirs names benchmark {name!r}, which is not among the benchmarks "
                    f"{', '.join(self.benchmarks)}"
                )
        missing = [b for b in self.benchmarks if b not in self.shard_dirs and self.shards is None]
        if missing:
            raise ValueError(f"EvalConfig.shards is unset and no shard folder is given for: {', '.join(missing)}")
        if self.shards is not None:
            self.shards = Path(self.shards)
        if self.out is not None:
            self.out = Path(self.out)
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int)
                                       or self.limit < 1):
            raise ValueError(f"EvalConfig.limit must be a positive integer or None, got {self.limit!r}")
        if self.rule not in RULES:
            raise ValueError(f"EvalConfig.rule must be one of: {', '.join(RULES)}; got {self.rule!r}")
        if self.class_chunk is not None and (isinstance(self.class_chunk, bool) or not isinstance(self.class_chunk, int)
                                             or self.class_chunk < 1):
            raise ValueError(f"EvalConfig.class_chunk must be a positive integer or None, got {self.class_chunk!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"EvalConfig.precision must be one of: {', '.join(PRECISIONS)}; got {self.precision!r}")

    def shard_dir(self, bench: Benchmark) -> Path:
        """Return the shard folder to read for ``bench``."""
        if bench.name in self.shard_dirs:
            return self.shard_dirs[bench.name]
        return bench.shard_dir(self.shards)

    def check_all_shards(self) -> dict[str, dict]:
        """Check every benchmark's shard folder and dataset.json (`check_shards`) before any work; returns each
        benchmark's dataset.json by name."""
        infos = {}
        for name in self.benchmarks:
            bench = get_benchmark(name)
            infos[name] = check_shards(bench, self.shard_dir(bench))
        return infos


@dataclass(frozen=True)
class CheckpointInfo:
    """A resolved checkpoint: where its weights are, which preset they fit and at which step they were saved."""

    path: Path  # as given on the command line
    weights: Path  # the .safetensors file
    preset: str  # catseg preset name
    step: int | None  # training step, when known
    meta: dict  # meta.json contents ({} for a bare weights file)

    @property
    def name(self) -> str:
        """A short name: the checkpoint folder's name (also for its model.safetensors) or the weights file's stem."""
        if self.path.is_dir():
            return self.path.name
        return self.path.parent.name if self.path.name == WEIGHTS_FILE and self.meta else self.path.stem


def resolve_checkpoint(path: str | Path) -> CheckpointInfo:
    """Resolve a checkpoint folder or a .safetensors file into weights path, preset and step."""
    path = Path(path)
    if path.is_dir():
        weights, meta = path / WEIGHTS_FILE, read_meta(path)
        if not weights.is_file():
            raise FileNotFoundError(f"checkpoint folder {path} has no {WEIGHTS_FILE}")
    elif path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"--checkpoint {path}: expected a checkpoint folder or a .safetensors file")
        weights = path
        meta = read_meta(path.parent) if (path.parent / META_FILE).is_file() else {}
    else:
        raise FileNotFoundError(f"--checkpoint {path}: no such checkpoint folder or .safetensors file")

    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            header_preset = (f.metadata() or {}).get("preset")
    except Exception as e:  # a truncated or corrupt file fails here, before any model is built
        raise ValueError(f"{weights}: not a readable safetensors file ({e})") from e
    preset = meta.get("preset") or header_preset
    if not preset:
        raise ValueError(f"{weights}: no preset in its metadata or meta.json; save it with catseg.save_weights")
    if header_preset and header_preset != preset:
        raise ValueError(f"{weights}: weights are for preset {header_preset!r} but meta.json says {preset!r}")

    step = meta.get("step")
    if step is None:
        m = re.fullmatch(r"step_(\d+)", path.name if path.is_dir() else path.parent.name)
        step = int(m.group(1)) if m else None
    step = None if step is None else int(step)
    return CheckpointInfo(path=path, weights=weights, preset=preset, step=step, meta=meta)


def load_model(info: CheckpointInfo, device):
    """Build the checkpoint's preset, load its weights and put it in eval mode on ``device``."""
    import torch

    import catseg

    model = catseg.create_model(info.preset, pretrained=info.weights)  # with the config fields it was saved with
    torch.backends.cudnn.benchmark = True  # one vocabulary per benchmark: fixed shapes, so time cuDNN's algorithms
    return model.eval().to(device)


def check_shards(bench: Benchmark, shard_dir: Path) -> dict:
    """Read the shards' dataset.json and check it describes ``bench``'s ground truth; return it."""
    from data_prep.shards import read_dataset_info

    if not Path(shard_dir).is_dir():
        raise FileNotFoundError(
            f"benchmark {bench.name!r}: no shard folder {shard_dir}; write it with data_prep or pass --shard-dir "
            f"{bench.name}=PATH"
        )
    info = read_dataset_info(shard_dir)
    where = Path(shard_dir) / "dataset.json"
    if info.get("split", bench.split) != bench.split:
        raise ValueError(
            f"{where}: split {info['split']!r} but benchmark {bench.name!r} scores the {bench.split!r} split; "
            f"give the {bench.split} folder"
        )
    if int(info["ignore_index"]) != bench.ignore_index:
        raise ValueError(
            f"{where}: ignore_index {info['ignore_index']} but benchmark {bench.name!r} expects {bench.ignore_index}; "
            f"are these the {bench.dataset} shards?"
        )
    if int(info["num_samples"]) < 1:
        skipped = int(info.get("num_skipped", 0))
        raise ValueError(
            f"{where}: num_samples is 0, benchmark {bench.name!r} has no images to score"
            + (f" (data_prep skipped all {skipped} as unreadable)" if skipped else "")
            + f"; rewrite the shards with `python -m data_prep.convert {bench.dataset} --out SHARDS`"
        )
    class_list = info.get("class_list")
    if bench.vocab is not None and class_list is not None and class_list != bench.vocab:
        raise ValueError(
            f"{where}: class_list {class_list!r} but benchmark {bench.name!r} expects {bench.vocab!r}; "
            f"are these the {bench.dataset} shards?"
        )
    return info


def evaluate_benchmark(
    model,
    bench: Benchmark,
    shard_dir: Path,
    *,
    limit: int | None = None,
    rank: int = 0,
    world: int = 1,
    progress: bool = False,
    stop: threading.Event | None = None,
    bf16: bool = False,
) -> tuple[np.ndarray, int]:
    """Accumulate the benchmark's confusion matrix over its shards; return (matrix summed over processes, images)."""
    import torch
    from tqdm import tqdm

    from catseg.inference import DEFAULT_CLASS_CHUNK, predict_labels, to_image_tensor
    from data_prep.shards import decode_sample, iter_raw_samples

    total = int(check_shards(bench, shard_dir)["num_samples"])
    device_type = next(model.parameters()).device.type
    prompts = bench.prompt_names(shard_dir)
    n = len(bench.class_names(shard_dir))
    conf = np.zeros((n, n), dtype=np.int64)
    images = 0

    expected = total if limit is None else min(total, limit)
    own_total = len(range(rank, expected, world))
    bar = tqdm(total=own_total, desc=bench.title, unit="img", disable=not progress, dynamic_ncols=True)
    failure = None

    def own_samples():
        # Undecoded samples of other processes are skipped cheaply: only this process's images are decoded.
        for index, raw in enumerate(iter_raw_samples(shard_dir)):
            if limit is not None and index >= limit:
                return
            if index % world == rank:
                yield index, raw

    try:
        with closing(decoded_ahead(own_samples(), decode_sample)) as samples:
            for index, raw, decoded in samples:
                if stop is not None and stop.is_set():
                    raise EvaluationInterrupted(f"stopped during {bench.name} after {images} images")
                image, gt, _ = decoded.result()
                with torch.inference_mode(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
                    # Patch inference (appendix A.3) merged, resized and argmaxed in class chunks: memory stays
                    # bounded for 847 classes instead of holding full-size probabilities of every class.
                    labels, _ = predict_labels(model, to_image_tensor(np.array(image)).unsqueeze(0), prompts,
                                               model.config.class_chunk_size or DEFAULT_CLASS_CHUNK)
                pred = bench.map_prediction(labels[0]).numpy()
                try:
                    conf += confusion_matrix(pred, gt, n, bench.ignore_index)
                except ValueError as e:
                    raise ValueError(f"{raw.get('__url__', shard_dir)}: sample {raw.get('__key__', index)!r}: "
                                     f"{e}") from e
                images += 1
                bar.update(1)
    except tarfile.TarError as e:  # a shard cut short or overwritten since it was written
        failure = ValueError(f"benchmark {bench.name!r}: cannot read the shards in {shard_dir} ({e}); check them "
                             f"with `python -m data_prep.convert {bench.dataset} --out SHARDS --verify`")
    except Exception as e:
        failure = e
    finally:
        bar.close()
    # Every process reaches this reduction, failed or not, so one bad sample cannot leave the others waiting.
    images, failed = (int(v) for v in reduce_confusion(np.array([images, failure is not None], dtype=np.int64)))
    if failure is not None:
        raise failure
    if failed:
        raise EvaluationFailed(
            f"benchmark {bench.name!r}: evaluation failed in {failed} other process(es); see their log"
        )
    if images != expected:  # a shard missing or cut at a member boundary reads as fewer images, without an error
        raise ValueError(
            f"benchmark {bench.name!r}: read {images} images from {shard_dir} but its dataset.json counts {total}"
            f"{f', --limit {limit} asks for {expected}' if limit is not None else ''}; a shard is missing or cut "
            f"short: check them with "
            f"`python -m data_prep.convert {bench.dataset} --out SHARDS --verify`"
        )
    conf = reduce_confusion(conf)
    return conf, images


def decoded_ahead(samples, decode, ahead: int = 8, threads: int = 2):
    """(index, raw sample, future of decode(raw)) for each of `samples` ((index, raw) pairs), in order, with up to
    `ahead` of them decoding in `threads` threads while the caller works on earlier ones (the image codecs run
    outside Python's lock). An error reading `samples` comes out where it happens, before the samples read ahead
    of it; close the generator (contextlib.closing) to stop the threads when leaving early."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(threads, thread_name_prefix="catseg-decode")
    pending = deque()
    try:
        for index, raw in samples:
            pending.append((index, raw, pool.submit(decode, raw)))
            if len(pending) > ahead:
                yield pending.popleft()
        while pending:
            yield pending.popleft()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def benchmark_result(bench: Benchmark, class_names: list[str], conf: np.ndarray, rule: str) -> dict:
    """Turn a summed confusion matrix into the report entry of one benchmark (per-class rows with names)."""
    s = summarize(conf, rule=rule)
    gt_pixels, pred_pixels = conf.sum(axis=1), conf.sum(axis=0)
    per_class = [
        {
            "id": i,
            "name": name,
            "iou": _finite(s["per_class_iou"][i]),
            "acc": _finite(s["per_class_acc"][i]),
            "gt_pixels": int(gt_pixels[i]),
            "pred_pixels": int(pred_pixels[i]),
        }
        for i, name in enumerate(class_names)
    ]
    return {
        "title": bench.title,
        "miou": _finite(s["miou"]),
        "macc": _finite(s["macc"]),
        "pacc": _finite(s["pacc"]),
        "fwiou": _finite(s["fwiou"]),
        "rule": s["rule"],
        "num_classes": s["num_classes"],
        "num_counted": s["num_counted"],
        "per_class": per_class,
    }


def _finite(x: float) -> float | None:
    """NaN becomes None so the report is strict JSON."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def default_out_dir(info: CheckpointInfo) -> Path:
    """Where a report goes when --out is not given: ./eval/<checkpoint name>."""
    return Path("eval") / info.name


def check_report_folder(out_dir: Path, info: CheckpointInfo) -> None:
    """Refuse a report folder whose report.json is about another checkpoint (before any work is done)."""
    path = out_dir / REPORT_FILE
    try:  # the weights file names the checkpoint whether its folder or the file itself was given
        earlier = json.loads(path.read_text()).get("weights") if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        earlier = None
    if earlier is not None and earlier != str(info.weights.resolve()):
        raise ValueError(f"{out_dir} holds the report of checkpoint weights {earlier}; give this evaluation its own "
                         f"--out")


def write_report(report: dict, confusions: dict[str, np.ndarray], out_dir: Path) -> Path:
    """Write report.json, one per-class CSV and one confusion matrix per benchmark into ``out_dir``; the files of
    benchmarks an earlier report in the folder had and this one has not are removed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / REPORT_FILE
    try:
        earlier = set(json.loads(path.read_text()).get("benchmarks") or ()) if path.is_file() else set()
    except (OSError, ValueError, AttributeError, TypeError):
        earlier = set()
    path.unlink(missing_ok=True)  # the folder is incomplete until the new report is written
    for name in earlier - set(report["benchmarks"]):
        for stale in (f"{name}.csv", f"{name}_confusion.npy"):
            (out_dir / stale).unlink(missing_ok=True)
    for name, result in report["benchmarks"].items():
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["id", "name", "iou", "acc", "gt_pixels", "pred_pixels"])
        for row in result["per_class"]:
            writer.writerow(
                [row["id"], row["name"], _csv_num(row["iou"]), _csv_num(row["acc"])]
                + [row["gt_pixels"], row["pred_pixels"]]
            )
        write_bytes_atomic(out_dir / f"{name}.csv", buf.getvalue().encode())
        npy = io.BytesIO()
        np.save(npy, confusions[name])
        write_bytes_atomic(out_dir / f"{name}_confusion.npy", npy.getvalue())
    # The report goes last: its presence means the whole folder is complete.
    write_bytes_atomic(path, (json.dumps(report, indent=2, allow_nan=False) + "\n").encode())
    return path


def _csv_num(x: float | None) -> str:
    return "" if x is None else f"{x:.6f}"


def process_state(cpu: bool = False):
    """The ``accelerate.PartialState`` of this process (CPU when asked or when ACCELERATE_USE_CPU is set)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # Under `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu`, PartialState(cpu=False) joins the process group
    # yet reports a single process, so every process would evaluate every image.
    return PartialState(cpu=cpu or parse_flag_from_env("ACCELERATE_USE_CPU"))


def run_evaluation(cfg: EvalConfig, stop: threading.Event | None = None, state=None) -> dict:
    """Evaluate ``cfg.checkpoint`` on every benchmark; the main process writes and returns the report.

    ``state`` is an ``accelerate.PartialState`` (one is made when None); under ``accelerate launch`` every process
    calls this and the confusion matrices are summed across them.
    """
    if state is None:
        state = process_state(cfg.cpu)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() != state.num_processes:
        # Images are split by the state's count but matrices summed over the group: the counts would be multiplied.
        raise ValueError(
            f"process group has {dist.get_world_size()} processes but accelerate reports {state.num_processes}; "
            f"launch with --cpu or ACCELERATE_USE_CPU=true for CPU processes"
        )
    info = resolve_checkpoint(cfg.checkpoint)
    out_dir = cfg.out if cfg.out is not None else default_out_dir(info)
    # every run has a step_00080000: a folder must not take another checkpoint's report
    check_report_folder(out_dir, info)
    shard_infos = cfg.check_all_shards()
    from catseg.inference import prepare_inference

    model = load_model(info, state.device)
    model.config.class_chunk_size = cfg.class_chunk or model.config.class_chunk_size
    model = prepare_inference(model, cfg.precision == "bf16", cfg.compile, cfg.fused_kernels)

    started = time.perf_counter()
    results, confusions, total_images = {}, {}, 0
    for name in cfg.benchmarks:
        bench = get_benchmark(name)
        shard_dir = cfg.shard_dir(bench)
        t0 = time.perf_counter()
        conf, images = evaluate_benchmark(
            model,
            bench,
            shard_dir,
            limit=cfg.limit,
            rank=state.process_index,
            world=state.num_processes,
            progress=cfg.progress and state.is_main_process,
            stop=stop,
            bf16=cfg.precision == "bf16",
        )
        seconds = time.perf_counter() - t0
        result = benchmark_result(bench, bench.class_names(shard_dir), conf, cfg.rule)
        result.update(
            shards=str(shard_dir),
            images=images,
            skipped_in_conversion=int(shard_infos[name].get("num_skipped", 0)),  # bad samples data_prep left out
            limit=cfg.limit,
            seconds=round(seconds, 3),
            images_per_s=round(images / seconds, 4) if seconds > 0 else None,
        )
        results[name], confusions[name] = result, conf
        total_images += images
    seconds = time.perf_counter() - started

    report = {
        "checkpoint": str(info.path.resolve()),
        "weights": str(info.weights.resolve()),
        "preset": info.preset,
        "step": info.step,
        "rule": cfg.rule,
        "rule_description": RULES[cfg.rule],
        "precision": cfg.precision,
        "compile": cfg.compile,
        "fused_kernels": cfg.fused_kernels,
        "class_chunk": model.config.class_chunk_size,
        "processes": state.num_processes,
        "device": str(state.device),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "images": total_images,
        "images_per_s": round(total_images / seconds, 4) if seconds > 0 else None,
        "benchmarks": results,
    }
    if state.is_main_process:
        report["report_path"] = str(write_report(report, confusions, out_dir).resolve())
    del model
    return report


def format_summary(report: dict) -> str:
    """A short table of the report's figures in percent."""
    lines = [
        f"checkpoint {report['checkpoint']} (preset {report['preset']}, step {report['step']}), rule {report['rule']}",
        f"{'benchmark':<12}{'mIoU':>8}{'mAcc':>8}{'pAcc':>8}{'fwIoU':>8}{'images':>8}{'img/s':>9}",
    ]
    pct = lambda x: "   n/a" if x is None else f"{100 * x:6.2f}"  # noqa: E731
    for r in report["benchmarks"].values():
        lines.append(
            f"{r['title']:<12}{pct(r['miou']):>8}{pct(r['macc']):>8}{pct(r['pacc']):>8}{pct(r['fwiou']):>8}"
            f"{r['images']:>8}{r['images_per_s'] or 0:>9.2f}"
        )
    return "\n".join(lines)


def parse_shard_dirs(values: list[str]) -> dict[str, Path]:
    """Parse repeated --shard-dir NAME=PATH options into {benchmark: folder}."""
    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--shard-dir {v!r}: expected NAME=PATH, e.g. ade150=/data/shards/ade150/val")
        out[name.strip()] = Path(path)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m evaluation.evaluate``."""
    p = argparse.ArgumentParser(prog="python -m evaluation.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or .safetensors file")
    p.add_argument(
        "--benchmarks",
        default="paper",
        help=f"comma-separated: {', '.join(BENCHMARKS)}; 'paper' = the six of the paper (default)",
    )
    p.add_argument("--shards", type=Path, help="shards root; a benchmark reads <shards>/<dataset>/val")
    p.add_argument(
        "--shard-dir", action="append", default=[], metavar="NAME=PATH", help="shard folder for one benchmark"
    )
    p.add_argument("--out", type=Path, help="report folder (default ./eval/<checkpoint name>)")
    p.add_argument("--limit", type=int, help="evaluate only the first N images of each benchmark")
    p.add_argument(
        "--rule", default=DEFAULT_RULE, choices=list(RULES), help="rule for classes absent from the ground truth"
    )
    p.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is present")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="fp32 (default) or bf16: bf16 autocast and weights, the fast path on a GPU")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the aggregation, decoder and image encoders: a minute or two more at the start, "
                   "then faster")
    p.add_argument("--fused-kernels", action="store_true",
                   help="run the Swin blocks as Triton kernels (CUDA; catseg.inference.fused_kernels)")
    p.add_argument("--class-chunk", type=int, metavar="N",
                   help="classes the model runs at once (default 128): memory against speed for large vocabularies")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m evaluation.evaluate``."""
    args = build_parser().parse_args(argv)
    try:
        cfg = EvalConfig(
            checkpoint=Path(args.checkpoint),
            benchmarks=args.benchmarks,
            shards=args.shards,
            shard_dirs=parse_shard_dirs(args.shard_dir),
            out=args.out,
            limit=args.limit,
            rule=args.rule,
            cpu=args.cpu,
            progress=not args.no_progress,
            precision=args.precision,
            compile=args.compile,
            fused_kernels=args.fused_kernels,
            class_chunk=args.class_chunk,
        )
        state = process_state(cfg.cpu)
        report = run_evaluation(cfg, state=state)
    except (ValueError, OSError, CheckpointError, EvaluationFailed) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    if state.is_main_process:
        print(format_summary(report))
        print(f"report: {report['report_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
