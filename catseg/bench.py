"""Speed and memory benchmark of a preset with random weights: patch inference and training steps.

    python -m catseg.bench --preset catseg_vitb16_r101 --classes 20,150,847 --device cuda --json out.json
    python -m catseg.bench --preset catseg_tiny --device cpu            # runs anywhere

Inference: one `inference_size` image (640x640 for the presets) through patch inference (crops + global view in one
batch, all classes), ms/image as the median over repeats after warm-up, timed with CUDA events on a GPU; batched
inference as images/s. Training: batch x image_size crops, `--train-classes` classes, forward + per-pixel BCE +
backward + AdamW step, ms/step. Peak memory: the CUDA allocator's peak on a GPU, the process's peak RSS growth on
CPU (Linux). Needs only torch, timm, einops, open_clip (and numpy, safetensors, pillow, which they pull in).

`--count-memory` runs the same steps on fake tensors (shapes only, see catseg.memcount) and reports the peak bytes
of live tensors instead of times: the GPU's bf16 memory figures, predicted on any machine in seconds to minutes.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import platform
import re
import statistics
import sys
import time
from typing import Callable, Optional

import torch
from torch.utils.flop_counter import (FlopCounterMode, flop_registry, register_flop_formula,
                                      sdpa_backward_flop_count, sdpa_flop_count)

from . import create_model
from . import inference, ops
from .aggregation import RecomputedMlp
from .files import write_json_atomic
from .inference import DEFAULT_CLASS_CHUNK, predict_labels
from .memcount import TensorBytes, counting, mha_unfused
from .ops import one_hot_bce_with_logits, resize


def _rss_status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) * 1024


# the model's parts, as torch.utils.flop_counter names the modules that ran (their FLOPs include their children's)
_PARTS = [("guidance backbone", r"CatSeg\.(backbone|appearance_proj|decoder_proj\.\d+)"),
          ("cost embedding", r"CatSeg\.cost_embed"), ("spatial aggregation", r"CatSeg\.layers\.\d+\.spatial"),
          ("class aggregation", r"CatSeg\.layers\.\d+\.klass"), ("decoder", r"CatSeg\.(decoder\.\d+|head)")]


# The CPU's fused attention, which a counted run takes where a GPU takes its own, has no formula in torch's FLOP
# counter, so the Swin windows' and CLIP's attention counted nothing; counted here as torch counts the GPU's.
if torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default not in flop_registry:
    @register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
    def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    @register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def flops_by_part(counts: dict, total: int) -> dict[str, int]:
    """FLOPs of the model's parts from FlopCounterMode.get_flop_counts(); what no part holds (CLIP's encoders, the
    text projection, merging the views, the loss, the optimizer) is "CLIP and the rest"."""
    parts = {name: 0 for name, _ in _PARTS}
    for module, per_op in counts.items():  # (not `ops`: that is the catseg.ops module here)
        for name, pattern in _PARTS:
            if re.fullmatch(pattern, module):
                parts[name] += sum(per_op.values())
    parts["CLIP and the rest"] = total - sum(parts.values())
    return parts


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or peak RSS growth on Linux CPUs (None elsewhere), or the peak of
    a `TensorBytes` counter when one is given."""

    def __init__(self, device: torch.device, counter: Optional[TensorBytes] = None):
        self.device, self.counter, self.peak, self.moved, self.operators = device, counter, None, None, None
        self.flops, self.flops_by_part = None, None  # counted with the memory: matrix-product FLOPs
        self.seconds = None  # wall time of the block (the device synchronised at its end)
        self._start = (0, 0)
        self._flop_mode = FlopCounterMode(display=False) if counter is not None else None

    def __enter__(self):
        gc.collect()
        if self.counter is not None:
            self.counter.reset_peak()
            self._start = (self.counter.moved, self.counter.operators)
            self._flop_mode.__enter__()
        elif self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif sys.platform.startswith("linux"):
            with contextlib.suppress(OSError):
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._base = _rss_status("VmRSS")
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.counter is not None:
            self._flop_mode.__exit__(*exc)
            self.flops = self._flop_mode.get_total_flops()
            self.flops_by_part = flops_by_part(self._flop_mode.get_flop_counts(), self.flops)
            self.peak = self.counter.peak
            self.moved = self.counter.moved - self._start[0]
            self.operators = self.counter.operators - self._start[1]
        elif self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        elif sys.platform.startswith("linux"):
            self.peak = _rss_status("VmHWM") - self._base
        self.seconds = time.perf_counter() - self._t0


def add_form_bench_args(p: argparse.ArgumentParser) -> None:
    """The options of the benchmarks that time one part of the model in each of its forms (benchmarks/
    bench_decoder.py, bench_class_aggregation.py)."""
    p.add_argument("--no-train", action="store_true", help="inference only")
    p.add_argument("--profile", action="store_true", help="print each form's inference kernels, the largest first")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", help="write the results here")


def report_form(name: str, row: dict, infer: Callable[[], object], device: torch.device, profile: bool) -> None:
    """Print one form's line (inference, training forward + backward, difference from the first form) and, with
    `profile`, its inference kernels."""
    print(f"{name:16s} inference {row['inference_ms']:9.2f} ms" +
          (f"   training forward + backward {row['train_ms']:9.2f} ms" if "train_ms" in row else "") +
          f"   max |difference| {row['max_abs_difference']:.2e}", flush=True)
    if profile:
        print(profile_table(infer, device, rows=12))


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median milliseconds of fn() after warm-up (CUDA events on a GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def profile_table(step: Callable[[], object], device: torch.device, rows: int = 30, trace: Optional[str] = None,
                  parts: bool = False) -> str:
    """torch.profiler table of one call of step, the operators sorted by their own device (or CPU) time, under a
    line from `timeline_summary`; `trace`: also write the call's Chrome trace (chrome://tracing, Perfetto) there.
    `parts`: the model's parts run inside named ranges (`catseg.ops.part`) and a line from `part_times` follows;
    not for a whole-model compiled step, which the ranges would make compile again."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    ops.PART_RANGES = parts
    try:
        with profile(activities=activities) as prof:
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
    finally:
        ops.PART_RANGES = False
    if trace:
        prof.export_chrome_trace(trace)
    summary = timeline_summary([(e.device_type == DeviceType.CUDA, e.name, e.time_range.start, e.time_range.end)
                                for e in prof.events() if not _device_range(e)])
    if parts:
        summary += part_times(prof.events(), device.type == "cuda")
    events = prof.key_averages()
    for key in (("self_device_time_total", "self_cuda_time_total") if device.type == "cuda" else ()) + (
            "self_cpu_time_total",):
        try:
            return summary + events.table(sort_by=key, row_limit=rows, max_name_column_width=70)
        except (AttributeError, KeyError, ValueError):
            continue
    return summary + events.table(row_limit=rows)


def _device_range(e) -> bool:
    """The device-side copy of a named range (record_function): it spans the range's kernels and the gaps between
    them, so it is neither a kernel nor the device time of its part."""
    return e.device_type != torch.autograd.DeviceType.CPU and bool(getattr(e, "is_user_annotation", False))


def part_times(events, on_device: bool) -> str:
    """The time of each part of the model from the profiler's "catseg.<part>" ranges (`catseg.ops.part`): on a GPU
    the device time of the kernels launched inside each part's ranges, on a CPU the ranges' own time; the rest of
    the call is "other". Set against the part's FLOPs (`--count-memory`), this is each part's arithmetic rate."""
    totals: dict[str, float] = {}
    for e in events:
        if e.name.startswith("catseg.") and not _device_range(e):  # a CPU range: the device time of its kernels
            name = e.name[len("catseg."):]
            totals[name] = totals.get(name, 0.0) + (e.device_time_total if on_device else e.cpu_time_total)
    if not totals:
        return ""
    if on_device:  # the kernels' time, as the table's "Self CUDA time total"
        whole = sum(e.time_range.elapsed_us() for e in events
                    if e.device_type == torch.autograd.DeviceType.CUDA and not _device_range(e))
    else:
        whole = max(e.time_range.end for e in events) - min(e.time_range.start for e in events)
    text = ", ".join(f"{name} {t / 1e3:.2f}" for name, t in totals.items())
    return (f"{'device' if on_device else 'CPU'} time by part, ms: {text}, other "
            f"{max(0.0, whole - sum(totals.values())) / 1e3:.2f}\n")


SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def timeline_summary(events: list[tuple[bool, str, float, float]]) -> str:
    """A profiled call's time line from (on the device?, name, start us, end us) events: the span from the first
    event to the last, the time the GPU ran at least one kernel (overlapping kernels counted once), and the host
    calls that wait for the GPU. Busy time well below the span: the host (launches, Python, waits) holds the GPU
    back; close to it: the kernels themselves are the cost. The table's "Self CUDA time total" adds up the kernels'
    times, which overlap when streams run side by side."""
    if not events:
        return ""
    span = max(e for *_, e in events) - min(s for _, _, s, _ in events)
    kernels = sorted((s, e) for device, _, s, e in events if device)
    busy, end = 0.0, float("-inf")
    for s, e in kernels:  # union of the kernel intervals
        busy += max(0.0, e - max(s, end))
        end = max(end, e)
    syncs = sum(1 for device, name, *_ in events if not device and name.startswith(SYNCS)
                and not name.endswith("Async"))  # cudaMemcpy, cudaMemcpy2D wait; their Async forms do not
    text = f"time line: {span / 1e3:.2f} ms from first to last event"
    if kernels:
        text += (f"; GPU busy {busy / 1e3:.2f} ms ({100 * busy / span:.0f}%) in {len(kernels)} kernels and copies; "
                 f"{syncs} host call(s) waiting for the GPU (synchronize, blocking copy)")
    return text + "\n"


def _finish(step, device, warmup, repeats, profile, profile_step=None, counter=None, trace=None,
            parts=False) -> tuple[Optional[float], PeakMemory, Optional[int], Optional[str]]:
    """(median ms, the first call's PeakMemory, CUDA peak of the later calls, profile table)."""
    # Peak memory of the first call: it runs eagerly (and, on a GPU, captures the CUDA graph that later calls
    # replay), so it sees every intermediate tensor; a replay allocates nothing and would under-report. Its time
    # (mem.seconds) holds compilation, graph capture and cuDNN's algorithm trials.
    with PeakMemory(device, counter) as mem:
        step()
    if counter is not None:  # fake tensors: a count, nothing to time
        return None, mem, None, None
    if device.type == "cuda":  # the peak of the later calls: without the first call's one-off allocations
        torch.cuda.reset_peak_memory_stats()
    ms = time_ms(step, device, warmup, repeats)
    steady = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return ms, mem, steady, profile_table(profile_step or step, device, trace=trace, parts=parts) if profile else None


def bench_inference(model, device, precision, num_classes, batch, warmup, repeats, profile=False,
                    cuda_graphs=True, counter=None, trace=None) -> dict:
    """Patch inference of `batch` images at the preset's inference size over `num_classes` classes: the product
    path (`predict_labels`: all views in one batch, views merged, resized and arg-maxed in class chunks)."""
    size = model.config.inference_size
    names = [f"class {i}" for i in range(num_classes)]
    images = torch.rand(batch, 3, size, size, device=device)
    model.text_embeddings(names)  # computed once per vocabulary, as in real use
    inference._GRAPHS.pop(model, None)  # earlier graphs' memory pools would count towards this peak
    if device.type == "cuda":
        torch.cuda.empty_cache()

    @torch.no_grad()
    def step(graphs=cuda_graphs):
        with _autocast(device, precision):
            return predict_labels(model, images, names, cuda_graphs=graphs)

    # profiled eagerly: a graph replay shows no per-operator breakdown
    ms, mem, steady, table = _finish(step, device, warmup, repeats, profile, lambda: step(False), counter, trace,
                                     parts=True)
    return {"classes": num_classes, "batch": batch, "ms_per_image": _div(ms, batch),
            "images_per_s": _div(1000 * batch, ms), "first_call_s": mem.seconds,
            "peak_memory_bytes": mem.peak, "steady_peak_memory_bytes": steady, "bytes_moved": mem.moved,
            "operators": mem.operators, "flops": mem.flops, "flops_by_part": mem.flops_by_part, "profile": table}


def bench_training(model, device, precision, num_classes, batch, warmup, repeats, profile=False, counter=None,
                   trace=None) -> dict:
    """Forward + masked per-pixel BCE + backward + AdamW step on random crops and labels."""
    model.train()
    model.config.class_chunk_size = None
    s = model.image_size
    names = [f"class {i}" for i in range(num_classes)]
    params = [p for p in model.parameters() if p.requires_grad]
    # fused as on a GPU (also when counting, so the count matches a GPU step)
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-4, fused=device.type == "cuda" or counter is not None)
    images = torch.rand(batch, 3, s, s, device=device)
    labels = torch.randint(0, num_classes, (batch, s, s), device=device)
    labels[:, :8] = 255
    model.text_embeddings(names)

    def step():
        with _autocast(device, precision):
            logits = model(images, names)
        logits = resize(logits.float(), (s, s))
        valid = labels != 255
        loss = (one_hot_bce_with_logits(logits, labels, valid) * valid).sum() / (valid.sum() * num_classes)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)  # as the training loop does: no gradients held through the next forward

    ms, mem, steady, table = _finish(step, device, warmup, repeats, profile, counter=counter, trace=trace)
    model.eval()
    return {"classes": num_classes, "batch": batch, "ms_per_step": ms, "images_per_s": _div(1000 * batch, ms),
            "first_call_s": mem.seconds, "peak_memory_bytes": mem.peak, "steady_peak_memory_bytes": steady,
            "bytes_moved": mem.moved, "operators": mem.operators, "flops": mem.flops,
            "profile": table}  # no FLOPs by part: flop_counter attributes backward FLOPs to modules unreliably


def _trace(args, what: str) -> Optional[str]:
    if not args.trace:
        return None
    os.makedirs(args.trace, exist_ok=True)
    return os.path.join(args.trace, f"{what}.json")


def parse_args(argv=None) -> argparse.Namespace:
    """The bench's command line, checked (argparse exits with a message on a bad one)."""
    p = argparse.ArgumentParser(prog="python -m catseg.bench",
                                description="CAT-Seg speed/memory benchmark (random weights)")
    p.add_argument("--preset", default="catseg_tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--classes", default="20,150,847", help="class counts for inference")
    p.add_argument("--batches", default="1", help="images per inference call, e.g. 1,8,32")
    p.add_argument("--class-chunk", type=int, default=DEFAULT_CLASS_CHUNK,
                   help=f"classes per chunk in inference (default {DEFAULT_CLASS_CHUNK}, as catseg.Segmenter; 0: all at "
                   "once); training runs all classes at once, as the trainer")
    p.add_argument("--train-classes", type=int, default=171)
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--no-train", action="store_true", help="inference only")
    p.add_argument("--no-inference", action="store_true", help="the training step only")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--channels-last", action="store_true", help="training: the convolutions channels-last as "
                   "train.channels_last runs them (inference runs them so unless --no-channels-last)")
    p.add_argument("--compile", action="store_true", help="torch.compile the aggregation layers, decoder, CLIP's "
                   "image blocks and the guidance backbone, as Segmenter(compile=True)")
    p.add_argument("--compile-model", action="store_true", help="training: torch.compile the whole model, its "
                   "forward and backward one graph each (as the trainer's train.compile: true)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for every --compile* option, e.g. "
                   "reduce-overhead (CUDA graphs of the compiled code, also in training) or max-autotune-no-cudagraphs")
    p.add_argument("--cpp-wrapper", action="store_true", help="with a --compile* option: inductor launches its "
                   "kernels from generated C++ instead of Python (torch._inductor.config.cpp_wrapper), less host "
                   "time per kernel without CUDA graphs; compiling takes longer")
    p.add_argument("--compile-encoders", action="store_true", help="torch.compile CLIP's image blocks and the "
                   "guidance backbone only (catseg.inference.compile_encoders; --compile includes them)")
    p.add_argument("--no-mlp-recompute", action="store_true",
                   help="keep the aggregation MLPs' hidden activations for backward instead of recomputing them")
    p.add_argument("--count-memory", action="store_true",
                   help="run on fake tensors and report the peak bytes of live tensors, no times (predicts the GPU's "
                   "memory figures on any machine; precision defaults to bf16 as on a GPU)")
    p.add_argument("--no-cudnn-benchmark", action="store_true",
                   help="let cuDNN guess its convolution algorithms instead of timing them once per shape")
    p.add_argument("--no-bf16-weights", action="store_true", help="bf16 inference: keep the fp32 weights (autocast "
                   "then casts each of them on every call) instead of storing the matmul weights in bf16")
    p.add_argument("--no-channels-last", action="store_true", help="inference: run the convolutions NCHW instead of "
                   "channels-last as Segmenter does (guidance backbone, cost embedding, decoder)")
    p.add_argument("--stencil-upsampling", action="store_true", help="compiled training: the bilinear decoder "
                   "stages' x2 upsampling as a pointwise stencil fused with its neighbours, as "
                   "train.stencil_upsampling makes it (catseg.inference.stencil_upsampling; inference runs it so "
                   "unless --no-stencil-upsampling)")
    p.add_argument("--no-stencil-upsampling", action="store_true", help="compiled inference: the decoder's x2 "
                   "upsampling as two matrix products instead of the stencil Segmenter runs")
    p.add_argument("--sigmoid-first", action="store_true", help="inference: the sigmoid at the model's output size "
                   "before the views are upsampled (sigmoid_at_crop_size=False) instead of at the crop size, as the "
                   "released code and every preset")
    p.add_argument("--fused-kernels", action="store_true", help="inference: the Swin blocks as Triton kernels, as "
                   "Segmenter(fused_kernels=True) (catseg.inference.fused_kernels: two per Swin block)")
    p.add_argument("--fused-parts", help="with --fused-kernels: which blocks run as kernels, comma-separated: "
                   "spatial (the Swin blocks), class (the class aggregation blocks, two kernels each); default "
                   f"{','.join(inference.INFERENCE_FUSED_PARTS)}, as Segmenter")
    p.add_argument("--fused-attention", choices=["kernel", "sdpa"], default="kernel", help="with --fused-kernels: "
                   "the Swin windows' attention inside the Triton kernel (kernel) or PyTorch's fused attention between "
                   "two kernels (sdpa)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="launch every kernel from Python (no graph replay)")
    p.add_argument("--profile", action="store_true", help="print a profiler table of the largest inference and "
                   "of the training step")
    p.add_argument("--trace", metavar="DIR", help="with --profile: write the profiled calls' Chrome traces to DIR "
                   "(inference.json, training.json)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", help="write the results here as JSON")
    args = p.parse_args(argv)
    if args.count_memory and (args.compile or args.compile_encoders or args.compile_model or args.profile):
        p.error("--count-memory runs on fake tensors: it cannot be combined with --compile, --compile-encoders, "
                "--compile-model or --profile")
    if args.cpp_wrapper and not (args.compile or args.compile_encoders or args.compile_model):
        p.error("--cpp-wrapper changes how compiled code launches its kernels: add --compile, --compile-encoders or "
                "--compile-model")
    if args.fused_parts is not None and not args.fused_kernels:
        p.error("--fused-parts chooses which blocks --fused-kernels runs as kernels: add --fused-kernels")
    parts = list(inference.INFERENCE_FUSED_PARTS) if args.fused_parts is None else args.fused_parts.split(",")
    if not set(parts) <= set(inference.FUSED_PARTS):
        p.error(f"--fused-parts {args.fused_parts}: give a comma-separated list of {', '.join(inference.FUSED_PARTS)}")
    args.fused_parts = parts
    if args.fused_kernels and args.compile and not str(args.device).startswith("cuda"):
        p.error(f"--fused-kernels with --compile compiles the Triton kernels, which needs a CUDA device, not "
                f"--device {args.device}; on the CPU run --fused-kernels without --compile (Triton's interpreter, "
                f"TRITON_INTERPRET=1)")
    if args.trace and not args.profile:
        p.error("--trace writes the traces of the profiled calls: add --profile")
    if args.stencil_upsampling and (args.no_train or not (args.compile or args.compile_model)):
        p.error("--stencil-upsampling chooses the compiled training step's upsampling (inference runs the stencil "
                "unless --no-stencil-upsampling): add --compile or --compile-model, and leave out --no-train")
    if args.compile_mode in ("reduce-overhead", "max-autotune") and (args.compile or args.compile_encoders) \
            and not (args.no_inference or args.no_cuda_graphs):
        p.error(f"--compile-mode {args.compile_mode} makes torch.compile replay its own CUDA graphs, which the "
                "inference path cannot capture into its graphs: add --no-cuda-graphs (or --no-inference), or use "
                "max-autotune-no-cudagraphs")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.cpp_wrapper:
        import torch._inductor.config as inductor_config

        inductor_config.cpp_wrapper = True
    device = torch.device("cpu" if args.count_memory else args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" or args.count_memory else "fp32")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark  # as the trainer, evaluation and CLI do
    torch.manual_seed(0)
    model = create_model(args.preset, class_chunk_size=args.class_chunk or None,
                         sigmoid_at_crop_size=not args.sigmoid_first).to(device).eval()
    model.check_inputs = False  # the range check syncs with the host; inputs here are known to be in range
    compile_kwargs = _compile_kwargs(args)
    if args.compile:  # the aggregation layers and the decoder, as Segmenter(compile=True) does
        inference.compile_aggregation(model, **compile_kwargs)
    if args.compile or args.compile_encoders:  # CLIP's image blocks and the backbone, as Segmenter(compile=True)
        inference.compile_encoders(model, **compile_kwargs)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    for m in model.modules():
        if isinstance(m, RecomputedMlp):
            m.recompute = not args.no_mlp_recompute
    if not args.count_memory:
        return _run(args, argv, model, device, precision, None)
    with mha_unfused(), counting(model) as counter:  # attention as a GPU runs it under autocast
        return _run(args, argv, model, device, precision, counter)


def _run(args, argv, model, device, precision, counter) -> dict:
    result = {
        "preset": args.preset, "device": "fake tensors (memory counted)" if counter is not None else
        torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__, "precision": precision, "class_chunk": args.class_chunk,
        "compile": args.compile, "compile_encoders": args.compile_encoders, "compile_model": args.compile_model,
        "compile_mode": args.compile_mode, "cpp_wrapper": args.cpp_wrapper, "channels_last": args.channels_last,
        "cuda_graphs": not args.no_cuda_graphs,
        "cudnn_benchmark": device.type == "cuda" and not args.no_cudnn_benchmark,
        "mlp_recompute": not args.no_mlp_recompute, "stencil_upsampling": args.stencil_upsampling,
        "stencil_upsampling_inference": not args.no_stencil_upsampling, "sigmoid_at_crop_size": not args.sigmoid_first,
        "counted_memory": args.count_memory,
        "bf16_weights": precision == "bf16" and not args.no_bf16_weights,
        "channels_last_inference": not args.no_channels_last, "fused_kernels": args.fused_kernels,
        "fused_attention": args.fused_attention if args.fused_kernels else None,
        "fused_parts": args.fused_parts if args.fused_kernels else None,
        "inference": [], "training": None,
        "command": "python -m catseg.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    batches, counts = [int(b) for b in args.batches.split(",")], [int(c) for c in args.classes.split(",")]
    if args.no_inference:
        batches = []
    if result["bf16_weights"]:  # as Segmenter does for bf16 inference
        inference.cast_matmul_weights(model, torch.bfloat16)
    inference.channels_last(model, result["channels_last_inference"])  # as Segmenter does
    inference.stencil_upsampling(model, result["stencil_upsampling_inference"])
    inference.fused_kernels(model, args.fused_kernels, args.fused_attention, args.fused_parts)
    for batch in batches:
        for n in counts:
            profile = args.profile and batch == batches[0] and n == counts[-1]
            r = bench_inference(model, device, precision, n, batch, args.warmup, args.repeats, profile,
                                not args.no_cuda_graphs, counter, _trace(args, "inference"))
            result["inference"].append(r)
            print(f"inference  {n:5d} classes  batch {batch:3d}: {_ms(r['ms_per_image'])} ms/image  "
                  f"{_ms(r['images_per_s'])} images/s  {_memory(r)}", flush=True)
            _write(result, args.json)
    if not args.no_train:
        # training as the trainer runs it: fp32 weights (autocast casts them), NCHW, or with --channels-last the
        # convolutions channels-last as train.channels_last makes them
        inference.cast_matmul_weights(model, torch.float32)
        inference.channels_last(model, args.channels_last)
        inference.stencil_upsampling(model, args.stencil_upsampling)
        if batches and (args.compile or args.compile_encoders or args.compile_model):
            # A trainer compiles for its one class count; after inference at other counts torch.compile would
            # compile the training step with a dynamic class dimension (and its backward), which takes many times
            # longer (minutes on a GPU) and is not what training runs.
            torch._dynamo.reset()
        if args.compile_model:  # as the trainer does, after inference: only the training step runs compiled
            model.compile(**_compile_kwargs(args))
        r = bench_training(model, device, precision, args.train_classes, args.train_batch, args.warmup,
                           args.repeats, args.profile, counter, _trace(args, "training"))
        result["training"] = r
        print(f"training   {r['classes']:5d} classes  batch {r['batch']:3d}: {_ms(r['ms_per_step'])} ms/step   "
              f"{_ms(r['images_per_s'])} images/s  {_memory(r)}", flush=True)
        _write(result, args.json)
    for r in result["inference"] + [result["training"] or {}]:
        if r.get("profile"):
            what = f"training step, {r['classes']} classes" if "ms_per_step" in r else \
                f"inference, {r['classes']} classes, batch {r['batch']}"
            print(f"\n== profile: {args.preset}, {what}\n{r['profile']}", flush=True)
    return result


def _compile_kwargs(args) -> dict:
    return {"mode": args.compile_mode} if args.compile_mode else {}


def _write(result: dict, path: Optional[str]) -> None:
    """Write the results so far as JSON (atomically: a temporary name, then renamed)."""
    if path:
        write_json_atomic(path, result)


def _div(a, b) -> Optional[float]:
    return None if a is None or b is None else a / b


def _ms(x) -> str:
    return "      n/a" if x is None else f"{x:9.2f}"


def _memory(r: dict) -> str:
    moved = r.get("bytes_moved")
    steady = r.get("steady_peak_memory_bytes")
    return f"peak {_gb(r['peak_memory_bytes'])}" + ("" if steady is None else f" (later calls {_gb(steady)})") + (
        f"  first call {r['first_call_s']:.1f} s" if moved is None else
        f"  moved {moved / 1e9:.1f} GB  {r['operators']} operators  {_tflop(r['flops'])} TFLOP" + (
            "" if not r.get("flops_by_part") else
            " (" + ", ".join(f"{k} {_tflop(v)}" for k, v in r["flops_by_part"].items()) + ")"))


def _tflop(n: int) -> str:
    return f"{n / 1e12:.3g}"


def _gb(n) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


if __name__ == "__main__":
    main()
