"""Time of one AdamW step over a preset's trainable parameters: one kernel chain per parameter, foreach, fused.

    python benchmarks/bench_optimizer.py [--preset catseg_vitb16_r101] [--device cpu|cuda] [--repeats 5]

The training loop uses the fused kernel (`training.optim.build_optimizer`); this shows what that saves against
the per-parameter loop. Random weights and gradients, the preset's own fine-tuning mode and parameter groups.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--preset", default="catseg_vitb16_r101")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    import catseg
    from training.config import OptimConfig
    from training.optim import norm_parameters, param_groups

    model = catseg.create_model(args.preset).to(args.device)
    model.set_clip_trainable(model.config.finetune)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    print(f"{args.preset}: {len(params)} trainable tensors, {sum(p.numel() for p in params) / 1e6:.1f} M parameters, "
          f"{args.device}, torch {torch.__version__}")
    for label, kwargs in (("per parameter (foreach=False)", {"foreach": False}), ("foreach", {"foreach": True}),
                          ("fused (training loop)", {"fused": True})):
        opt = torch.optim.AdamW(param_groups(model.parameter_groups(), OptimConfig(), norm_parameters(model)),
                                **kwargs)
        opt.step()  # creates the state
        times = []
        for _ in range(args.repeats):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            opt.step()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1000)
        print(f"  {label:32s} {statistics.median(times):8.1f} ms per step (median of {args.repeats})")
        del opt


if __name__ == "__main__":
    main()
