"""One class aggregation block alone, in each of its forms, at a preset's widths: the linear attention as batched
matrix products (the modules, eager or compiled) and, on a GPU, as catseg's Triton kernels
(`catseg.inference.fused_kernels`, inference only).

    python benchmarks/bench_class_aggregation.py [--preset catseg_vitb16_r101] [--classes 847] [--compile] [--profile]

The block runs as a patch inference runs it: 5 views of the preset's cost grid, the classes in chunks (847 classes:
7 x 121), the key/value summary accumulated over the chunks, then each chunk's update; text guidance of the
preset's width. Training: forward + backward with the training's 2x2 pooling, the classes in one chunk as the
trainer runs them (`--train-classes`, 4 images). bf16 autocast on a GPU, float32 on a CPU; compiled as
`catseg.inference.compile_aggregation` compiles it (the summary and the update, each on one chunk). Reports the
median milliseconds per call (CUDA events on a GPU) and the largest difference from the products' result.
`--profile`: each form's inference kernels, the largest first.
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from catseg import create_model, kernels  # noqa: E402
from catseg.aggregation import ClassAggregation, chunk_slices  # noqa: E402
from catseg.bench import add_form_bench_args, report_form, time_ms  # noqa: E402
from catseg.files import write_json_atomic  # noqa: E402
from catseg.inference import DEFAULT_CLASS_CHUNK  # noqa: E402


def _compiled(block: ClassAggregation, compile: bool) -> None:
    """The block's summary and update compiled afresh (the form switches are read while tracing), or eager."""
    for name in ("summary", "update"):
        block.__dict__.pop(name, None)
    if compile:
        torch._dynamo.reset()
        for name in ("summary", "update"):
            setattr(block, name, torch.compile(getattr(block, name)))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--preset", default="catseg_vitb16_r101")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--classes", type=int, default=None, help="inference classes (default: 847 on a GPU, 24 on a CPU)")
    p.add_argument("--class-chunk", type=int, default=DEFAULT_CLASS_CHUNK)
    p.add_argument("--train-classes", type=int, default=None, help="training classes (default: 171 on a GPU, 12 on "
                   "a CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the block's modules")
    add_form_bench_args(p)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    classes = args.classes or (847 if gpu else 24)
    train_classes = args.train_classes or (171 if gpu else 12)

    torch.manual_seed(0)
    model = create_model(args.preset, zero_init_residual=False).to(device)  # (zero branches: equal by construction)
    block = model.layers[0].klass
    cfg, grid = model.config, model.grid
    g = torch.Generator(device=device).manual_seed(1)
    chunks = chunk_slices(classes, args.class_chunk)
    xs = [torch.randn(5, sl.stop - sl.start, cfg.embed_dim, grid, grid, device=device, generator=g) for sl in chunks]
    # one text guidance row per class of the larger vocabulary, inference's and training's its first rows
    rows = max(classes, train_classes)
    texts = torch.randn(rows, cfg.text_guidance_dim, device=device, generator=g) if cfg.text_guidance_dim else None
    text, text_train = (None, None) if texts is None else (texts[:classes], texts[:train_classes])
    x_train = torch.randn(4, train_classes, cfg.embed_dim, grid, grid, device=device, generator=g)
    results = {"preset": args.preset, "device": torch.cuda.get_device_name(device) if gpu
               else platform.processor() or platform.machine(), "torch": torch.__version__, "classes": classes,
               "chunks": [sl.stop - sl.start for sl in chunks], "train_classes": train_classes,
               "precision": "bf16" if gpu else "fp32", "compile": args.compile,
               "command": "python benchmarks/bench_class_aggregation.py " +
                          " ".join(argv if argv is not None else sys.argv[1:])}
    # name, Triton kernels
    forms = [("products", False)]
    if gpu and kernels.available():
        forms.append(("kernels", True))
    reference = None
    for name, fused in forms:
        block.fused = fused
        _compiled(block, args.compile)

        def infer():
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
                return block.eval()(xs, text, chunks)

        out = torch.cat([o.float() for o in infer()], dim=1)
        reference = out if reference is None else reference
        row = {"inference_ms": time_ms(infer, device, args.warmup, args.repeats),
               "max_abs_difference": (out - reference).abs().max().item()}
        if not args.no_train and not fused:  # (the kernels are for inference)
            xg = x_train.clone().requires_grad_()

            def train():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
                    y = block.train()([xg], text_train, [slice(0, train_classes)])[0]
                y.float().square().mean().backward()

            row["train_ms"] = time_ms(train, device, args.warmup, args.repeats)
        results[name] = row
        report_form(name, row, infer, device, args.profile)
    block.fused = False
    _compiled(block, False)
    if args.json:
        write_json_atomic(args.json, results)
    return results


if __name__ == "__main__":
    main()
