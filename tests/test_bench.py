"""The speed benchmark runs on CPU with the tiny preset and writes its figures as JSON."""
import json
from pathlib import Path

import pytest

from catseg import bench


def test_bench_cpu_writes_figures_and_profile(tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = bench.main(["--preset", "catseg_tiny", "--device", "cpu", "--classes", "3,5", "--batches", "1,2",
                         "--repeats", "1", "--warmup", "0", "--train-batch", "1", "--train-classes", "4",
                         "--profile", "--trace", str(tmp_path / "traces"), "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["preset"] == "catseg_tiny" and saved["precision"] == "fp32" and saved["class_chunk"] == 128
    assert [(r["batch"], r["classes"]) for r in saved["inference"]] == [(1, 3), (1, 5), (2, 3), (2, 5)]
    for r in saved["inference"]:
        assert r["ms_per_image"] > 0 and abs(r["images_per_s"] * r["ms_per_image"] - 1000) < 1e-6 * 1000
        assert r["first_call_s"] > 0
    assert saved["training"]["classes"] == 4 and saved["training"]["ms_per_step"] > 0
    # one profile for the largest vocabulary at the first batch size, one for training; printed at the end
    assert [r["profile"] is not None for r in saved["inference"]] == [False, True, False, False]
    assert "aten::" in saved["training"]["profile"]
    assert saved["training"]["profile"].startswith("time line: ")
    # the inference profile gives each part of the model its time; the training one has no part ranges
    line = next(x for x in saved["inference"][1]["profile"].splitlines() if x.startswith("CPU time by part, ms: "))
    times = dict(item.rsplit(" ", 1) for item in line[len("CPU time by part, ms: "):].split(", "))
    assert list(times) == ["clip", "guidance backbone", "cost embedding", "spatial aggregation", "class aggregation",
                           "decoder", "other"]
    assert all(float(t) >= 0 for t in times.values()) and float(times["spatial aggregation"]) > 0
    span = float(saved["inference"][1]["profile"].split(" ms from first")[0].split()[-1])
    assert sum(float(t) for t in times.values()) <= span * 1.01
    assert "time by part" not in saved["training"]["profile"]
    assert bench.ops.PART_RANGES is False  # switched off again after profiling
    for what in ("inference", "training"):  # Chrome traces of the profiled calls
        assert '"traceEvents"' in (tmp_path / "traces" / f"{what}.json").read_text()
    printed = capsys.readouterr().out
    assert "== profile: catseg_tiny, inference, 5 classes, batch 1" in printed
    assert saved["inference"] == result["inference"]
    assert not (tmp_path / "bench.json.tmp").exists()
    with pytest.raises(SystemExit):  # traces come from profiled calls
        bench.main(["--preset", "catseg_tiny", "--trace", str(tmp_path / "t")])
    assert "--trace writes the traces of the profiled calls: add --profile" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the C++ wrapper is how compiled code runs: nothing to do without compiling
        bench.parse_args(["--preset", "catseg_tiny", "--cpp-wrapper"])
    assert "--cpp-wrapper changes how compiled code launches its kernels" in capsys.readouterr().err
    assert bench.parse_args(["--compile-model", "--cpp-wrapper"]).cpp_wrapper


def test_bench_counts_memory_on_fake_tensors(tmp_path):
    """--count-memory predicts bf16 memory figures without running arithmetic, and counts the FLOPs of the matrix
    products by part of the model; recomputing the MLPs saves memory and costs FLOPs."""
    peaks, flops = {}, {}
    for flag in ([], ["--no-mlp-recompute"]):
        out = tmp_path / f"count{len(flag)}.json"
        bench.main(["--preset", "catseg_tiny", "--count-memory", "--classes", "3,40", "--train-batch", "2",
                    "--train-classes", "40", "--json", str(out), *flag])
        saved = json.loads(out.read_text())
        assert saved["counted_memory"] and saved["precision"] == "bf16" and saved["mlp_recompute"] == (not flag)
        assert all(r["ms_per_image"] is None and r["peak_memory_bytes"] > 0 for r in saved["inference"])
        assert saved["inference"][1]["bytes_moved"] > saved["inference"][0]["bytes_moved"] > 0
        assert saved["training"]["operators"] > saved["inference"][0]["operators"] > 100
        small, large = (r["peak_memory_bytes"] for r in saved["inference"])
        assert large > small  # more classes, more memory
        peaks[bool(flag)] = saved["training"]["peak_memory_bytes"]
        flops[bool(flag)] = saved["training"]["flops"]
        few, many = (r["flops_by_part"] for r in saved["inference"])
    assert peaks[False] < peaks[True]
    # recomputing the MLPs' hidden layers in backward adds their first matrix products again
    assert flops[False] > flops[True] > 0
    # FLOPs by part: the whole is counted once; per-class parts grow with the classes, the image-only ones do not
    counted = [r["flops"] for r in saved["inference"]]
    assert [sum(p.values()) for p in (few, many)] == counted
    assert few["guidance backbone"] == many["guidance backbone"] > 0
    for part in ("cost embedding", "spatial aggregation", "class aggregation", "decoder"):
        assert 0 < few[part] < many[part], part
    # the 7x7 cost embedding, by its own formula: 2 x (views x classes x grid^2 outputs) x templates x 49 x embed dim
    import catseg
    model = catseg.create_model("catseg_tiny")
    views = 5  # 4 crops + the global view
    assert many["cost embedding"] == 2 * views * 40 * model.grid ** 2 * len(model.clip.templates) * 49 \
        * model.config.embed_dim
    # the Swin blocks, attention included (the CPU's fused attention counts as the GPU's): per token of every class
    # map, the x halves of the q and k projections, v, the output projection, the MLP (ratio 4) and the window
    # attention's two products; per token of each view, the guidance halves of q and k
    cfg, tokens = model.config, views * model.grid ** 2
    c, t, g = cfg.embed_dim, cfg.window_size ** 2, cfg.appearance_guidance_dim
    assert many["spatial aggregation"] == cfg.num_layers * 2 * (tokens * 40 * (24 * c * c + 4 * t * c)
                                                                + tokens * 2 * 2 * g * c)


def test_bench_bf16_weights_remove_autocast_casts_and_training_runs_alone(tmp_path):
    """bf16 weights (the default of bf16 inference) leave autocast nothing to cast: fewer operators, less memory;
    the training step that follows runs on fp32 weights either way; --no-inference benchmarks training alone."""
    runs = {}
    for name, flags in (("bf16", []), ("fp32", ["--no-bf16-weights"]), ("train", ["--no-inference"])):
        out = tmp_path / f"{name}.json"
        bench.main(["--preset", "catseg_tiny", "--count-memory", "--classes", "3", "--train-batch", "1",
                    "--train-classes", "4", "--json", str(out), *flags])
        runs[name] = json.loads(out.read_text())
    fast, plain = runs["bf16"]["inference"][0], runs["fp32"]["inference"][0]
    assert runs["bf16"]["bf16_weights"] and not runs["fp32"]["bf16_weights"]
    assert fast["operators"] < plain["operators"] - 30 and fast["peak_memory_bytes"] < plain["peak_memory_bytes"]
    assert runs["bf16"]["training"]["operators"] == runs["fp32"]["training"]["operators"]
    # alone, training builds the cached constants (interpolation matrices, masks) inference had built before
    assert runs["train"]["inference"] == [] and runs["train"]["training"]["operators"] >= fast["operators"]


def test_bench_compiles_the_whole_model_for_its_training_step(tmp_path, capsys):
    """--compile-model: the training step's forward runs as one compiled graph, no graph break; --compile-mode
    reduce-overhead cannot go with the inference path's own CUDA graphs."""
    import torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    out = tmp_path / "compiled.json"
    bench.main(["--preset", "catseg_tiny", "--device", "cpu", "--no-inference", "--compile-model", "--repeats", "1",
                "--warmup", "0", "--train-batch", "1", "--train-classes", "3", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["compile_model"] and saved["compile_mode"] is None and saved["training"]["ms_per_step"] > 0
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["graph_break"])
    capsys.readouterr()
    for mode in ("reduce-overhead", "max-autotune"):
        with pytest.raises(SystemExit):
            bench.main(["--preset", "catseg_tiny", "--compile", "--compile-mode", mode])
        assert (f"--compile-mode {mode} makes torch.compile replay its own CUDA graphs, which the inference path "
                f"cannot capture") in capsys.readouterr().err
    for argv in (["--stencil-upsampling"], ["--stencil-upsampling", "--compile", "--no-train"]):
        with pytest.raises(SystemExit):  # the stencil chooses the compiled training's form: refused otherwise
            bench.parse_args(["--preset", "catseg_tiny", *argv])
        assert "--stencil-upsampling chooses the compiled training step's upsampling" in capsys.readouterr().err
    assert bench.parse_args(["--stencil-upsampling", "--compile-model"]).stencil_upsampling


def test_compiled_launch_count_reads_the_generated_code():
    """benchmarks/count_compiled_launches.py counts fused kernels and library calls in the code torch.compile
    generates: a matrix product followed by elementwise work is one library call and fused kernels, and its backward
    has the two matrix products of the gradients."""
    import torch
    from torch._inductor.utils import run_and_get_code

    from benchmarks.count_compiled_launches import count_calls

    w = torch.randn(8, 8, requires_grad=True)

    @torch.compile
    def f(x):
        return (torch.relu(x @ w) * 2 + 1).sum()

    torch._dynamo.reset()
    _, codes = run_and_get_code(lambda: f(torch.randn(4, 8, requires_grad=True)).backward())
    forward, backward = (count_calls(code) for code in codes)
    assert forward["library"] == {"extern_kernels.mm": 1} and forward["fused_kernels"] >= 1
    assert backward["library"] == {"extern_kernels.mm": 2} and backward["fused_kernels"] >= 1


def test_timeline_summary_counts_overlapping_kernels_once_and_the_waits():
    events = [(False, "aten::mm", 0.0, 50.0), (False, "cudaLaunchKernel", 10.0, 12.0),
              (True, "gemm", 20.0, 1020.0), (True, "copy", 500.0, 1500.0),  # overlapping: 1480 us busy
              (True, "add", 3000.0, 3520.0),  # idle gap before it: 520 us more
              (False, "cudaStreamSynchronize", 1600.0, 3600.0), (False, "cudaMemcpyAsync", 3700.0, 3710.0),
              (False, "cudaMemcpy2DAsync", 3710.0, 3720.0), (False, "cudaMemcpy", 3800.0, 4000.0)]
    line = bench.timeline_summary(events)
    assert line == ("time line: 4.00 ms from first to last event; GPU busy 2.00 ms (50%) in 3 kernels and copies; "
                    "2 host call(s) waiting for the GPU (synchronize, blocking copy)\n")
    assert bench.timeline_summary([(False, "aten::mm", 0.0, 1500.0)]) == "time line: 1.50 ms from first to last event\n"


def test_part_times_count_kernels_not_the_device_copies_of_the_ranges():
    """On a GPU the profiler gives each named range a device-side copy spanning its kernels and the gaps between them
    (host-bound stretches included); the parts' times and the whole count only the kernels."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    def event(name, start, end, device=DeviceType.CPU, annotation=False):
        return FunctionEvent(0, name, 0, start, end, use_device="cuda", device_type=device,
                             is_user_annotation=annotation)

    decoder = event("catseg.decoder", 0, 50, annotation=True)
    decoder.append_kernel("conv", 0, 100)
    events = [decoder, event("catseg.decoder", 10, 910, DeviceType.CUDA, annotation=True),
              event("conv", 10, 110, DeviceType.CUDA), event("copy", 900, 950, DeviceType.CUDA)]
    assert bench.part_times(events, on_device=True) == "device time by part, ms: decoder 0.10, other 0.05\n"
    assert [bench._device_range(e) for e in events] == [False, True, False, False]


def test_every_gpu_bench_variant_passes_the_bench_command_line(tmp_path):
    """benchmarks/gpu_bench.sh runs on a rented GPU machine: each of its variants' bench arguments must be ones
    catseg.bench accepts (a renamed flag would cost a device call), and each default variant must exist."""
    import re
    import shlex

    script = (Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bench.sh").read_text().replace("\\\n", " ")
    defined = dict(re.findall(r"^\s+(\w+)\) bench (.*?) ;;", script, flags=re.M))
    default = re.search(r'variants=\$\{\*:-"([^"]+)"\}', script).group(1).split()
    assert {"b_compile", "b_model_cl", "l_model_cl_ro"} <= defined.keys()
    cases = set(re.findall(r"^\s+(\w+)\)", script, flags=re.M))  # the bench variants and the others (tests, ...)
    assert {"tests", "tests_train", "decoder", "class_aggregation"} <= cases - defined.keys()
    assert set(default) <= cases, set(default) - cases
    assert "benchmarks/bench_decoder.py" in script.split("\n        decoder)")[1].split(";;")[0]  # runs no catseg.bench
    assert "benchmarks/bench_class_aggregation.py --compile" in script.split("\n        class_aggregation)")[1]
    segment = shlex.split(script.split("\n        segment)")[1].split(";;")[0].split("bench_segment.py")[2])
    _benchmark_script("bench_segment").parse_args(segment[:segment.index("--json")])
    merge = shlex.split(script.split("\n        merge)")[1].split(";;")[0].split("bench_merge.py")[2].replace("$s", "1x1"))
    _benchmark_script("bench_merge").parse_args(merge[:merge.index("--json")])
    for name, line in defined.items():
        line = re.sub(r"\$\{\w+:-(\w+)\}", r"\1", line).replace("$out", str(tmp_path)).replace('"', "")
        args = shlex.split(line)[3:]  # json name, time limit, working folder
        # argparse exits (SystemExit) on a flag or combination it refuses; the device is the GPU machine's default
        bench.parse_args(["--device", "cuda", *args])


def _benchmark_script(name: str):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_segment_bench_times_each_setting_and_stage(tmp_path, capsys):
    """benchmarks/bench_segment.py runs `catseg segment`'s loop on photos it writes, for each (batch size, I/O
    threads) setting, and each stage alone; bad settings are refused naming them."""
    script = _benchmark_script("bench_segment")
    out = tmp_path / "segment.json"
    result = script.main(["--images", "3", "--size", "96x64", "--classes", "4", "--settings", "1:0,2:2", "--json",
                          str(out)])
    assert json.loads(out.read_text()) == result and result["size"] == [96, 64]
    assert [(s["batch_size"], s["workers"]) for s in result["settings"]] == [(1, 0), (2, 2)]
    assert all(s["images_per_s"] > 0 for s in result["settings"])
    assert set(result["stage_ms_median"]) == {"read", "model", "write"}
    assert all(ms > 0 for ms in result["stage_ms_median"].values())
    capsys.readouterr()
    for settings, says in (("1:0,4", "'4' is not BATCH:WORKERS"), ("0:2", "'0:2' needs a batch size >= 1")):
        with pytest.raises(SystemExit):
            script.parse_args(["--settings", settings])
        assert says in capsys.readouterr().err


@pytest.mark.parametrize("compile", [False, True])
def test_decoder_bench_times_the_decoder_forms_on_the_same_result(tmp_path, capsys, compile):
    """benchmarks/bench_decoder.py runs the preset's decoder alone, NHWC and NCHW (and compiled, with the stencil
    upsampling), in inference and training, reports how far each result is from the plain one and, with --profile,
    each form's kernels."""
    out = tmp_path / "decoder.json"
    result = _benchmark_script("bench_decoder").main(["--preset", "catseg_tiny", "--maps", "10", "--repeats", "2",
                                                      "--warmup", "1", "--profile", "--json", str(out)]
                                                     + ["--compile"] * compile)
    assert json.loads(out.read_text()) == result and result["maps"] == 10 and result["compile"] == compile
    trained = ["plain", "plain_stencil"] if compile else ["plain"]
    assert [k for k in result if k.startswith("plain")] == ["plain", "plain_nchw"] + trained[1:]
    for name in trained:
        assert result[name]["inference_ms"] > 0 and result[name]["train_ms"] > 0
        assert result[name]["max_abs_difference"] < 1e-4
    assert result["plain_nchw"]["inference_ms"] > 0 and "train_ms" not in result["plain_nchw"]
    assert result["plain"]["max_abs_difference"] == 0 and result["plain_nchw"]["max_abs_difference"] < 1e-4
    printed = capsys.readouterr().out
    tables = printed.split("time line:")[1:]  # one per form, its kernels the largest first
    assert len(tables) == len(trained) + 1 and all("convolution" in table for table in tables), printed


def test_class_aggregation_bench_times_the_block_over_class_chunks(tmp_path, capsys):
    """benchmarks/bench_class_aggregation.py runs one class aggregation block alone over class chunks, compiled, in
    inference and training (on a CPU its products only: the Triton kernels need a GPU), and the profile shows the
    linear attention's batched matrix products."""
    out = tmp_path / "class.json"
    result = _benchmark_script("bench_class_aggregation").main(
        ["--preset", "catseg_tiny", "--classes", "9", "--class-chunk", "4", "--train-classes", "5", "--compile",
         "--repeats", "2", "--warmup", "1", "--profile", "--json", str(out)])
    assert json.loads(out.read_text()) == result and result["chunks"] == [3, 3, 3]
    assert result["products"]["inference_ms"] > 0 and result["products"]["train_ms"] > 0
    assert result["products"]["max_abs_difference"] == 0 and "kernels" not in result
    tables = capsys.readouterr().out.split("time line:")[1:]
    assert len(tables) == 1 and "aten::bmm" in tables[0], tables


def test_merge_bench_times_what_predict_labels_does_after_the_model(tmp_path):
    """benchmarks/bench_merge.py times predict_labels on random view logits of the preset's geometry, per image and
    per class, without building the model, and leaves predict_labels' model call in place afterwards."""
    from catseg import inference

    view_logits = inference._view_logits
    out = tmp_path / "merge.json"
    result = _benchmark_script("bench_merge").main(["--preset", "catseg_tiny", "--classes", "3,7", "--size", "90x60",
                                                    "--batch", "2", "--repeats", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == result and inference._view_logits is view_logits
    assert (result["views"], result["maps_side"], result["size"], result["batch"]) == (5, 32, [90, 60], 2)
    assert [row["classes"] for row in result["rows"]] == [3, 7]
    for row in result["rows"]:
        assert row["ms_per_image"] > 0 and row["ms_per_class"] == pytest.approx(row["ms_per_image"] / row["classes"])
    with pytest.raises(SystemExit):
        _benchmark_script("bench_merge").main(["--size", "640"])
