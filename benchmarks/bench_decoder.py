"""The upsampling decoder alone, in each of its forms, at a preset's widths, in inference and in a training forward +
backward.

    python benchmarks/bench_decoder.py [--preset catseg_vitb16_r101] [--maps 40] [--compile] [--profile] [--json F]

`--maps`: class maps through the decoder per call (a ViT-B patch inference runs 5 views x classes: 4235 at 847
classes, in chunks of 128 x 5 = 640; a training step 4 images x 171 classes = 684). The maps are the preset's
cost-grid size with its embedding width, the guidance maps those of one image per 5 maps. Channels-last as
Segmenter and the trainer's `train.channels_last` run them; bf16 autocast on a GPU, float32 on a CPU. Reports the
median milliseconds per call (CUDA events on a GPU) and the largest difference from the plain result. With
`--compile` the decoder is also timed with its upsampling as a pointwise stencil ("plain_stencil",
`catseg.inference.stencil_upsampling`, what compiled inference runs). The plain decoder is also timed with NCHW maps
("plain_nchw", what runs without `catseg.inference.decoder_channels_last`). `--profile`: each form's inference
kernels, the largest first.
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from catseg import create_model  # noqa: E402
from catseg.bench import add_form_bench_args, report_form, time_ms  # noqa: E402
from catseg.files import write_json_atomic  # noqa: E402
from catseg.inference import decoder_channels_last, stencil_upsampling  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--preset", default="catseg_vitb16_r101")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--maps", type=int, default=None, help="class maps per call (default: 640 on a GPU, 20 on a CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decoder (model.decode)")
    add_form_bench_args(p)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    maps = args.maps or (640 if device.type == "cuda" else 20)
    images = max(1, maps // 5)
    maps = images * 5
    bf16 = device.type == "cuda"

    torch.manual_seed(0)
    model = create_model(args.preset).to(device)
    decoder_channels_last(model)
    cfg = model.config
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(images, 5, cfg.embed_dim, model.grid, model.grid, device=device, generator=g)
    feats = [torch.randn(images, gdim, model.grid * 2 ** (i + 1), model.grid * 2 ** (i + 1), device=device,
                         generator=g) if gdim else None for i, gdim in enumerate(cfg.decoder_guidance_dims)]
    decode = torch.compile(model.decode) if args.compile else model.decode
    results = {"preset": args.preset, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
               else platform.processor() or platform.machine(), "torch": torch.__version__, "maps": maps,
               "precision": "bf16" if bf16 else "fp32", "compile": args.compile,
               "command": "python benchmarks/bench_decoder.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    reference = {}
    # name, NHWC, the upsampling as a stencil
    forms = [("plain", True, False), ("plain_nchw", False, False)]
    if args.compile:  # compiled: the upsampling as a stencil
        forms.append(("plain_stencil", True, True))
    for name, nhwc, stencil in forms:
        decoder_channels_last(model, nhwc)
        stencil_upsampling(model, stencil)

        def infer():
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                return decode(x, feats)

        out = infer().float()
        reference.setdefault("out", out)
        row = {"inference_ms": time_ms(infer, device, args.warmup, args.repeats),
               "max_abs_difference": (out - reference["out"]).abs().max().item()}
        if not args.no_train and name != "plain_nchw":  # (compiling is slow)
            xg = x.clone().requires_grad_()

            def train():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    y = decode(xg, feats)
                y.float().square().mean().backward()

            row["train_ms"] = time_ms(train, device, args.warmup, args.repeats)
        results[name] = row
        report_form(name, row, infer, device, args.profile)
    if args.json:
        write_json_atomic(args.json, results)
    return results


if __name__ == "__main__":
    main()
