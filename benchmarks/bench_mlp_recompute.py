"""Host cost of the aggregation MLP's recompute: forward + backward of one small RecomputedMlp under bf16 autocast,
kept (plain), recomputed by torch.utils.checkpoint, and recomputed by the written-out autograd Function.

Tensors are small on purpose, so the time is the host's (Python, dispatcher, autograd bookkeeping), which is what a
host-bound GPU training step pays for each MLP.

    python benchmarks/bench_mlp_recompute.py [--calls 2000] [--device cpu]
"""
import argparse
import statistics
import time

import torch

from catseg.aggregation import RecomputedMlp


def per_call_us(mlp: RecomputedMlp, x: torch.Tensor, path: str, calls: int) -> float:
    mlp.recompute = path != "plain"
    mlp._plain = (lambda: False) if path == "checkpoint" else RecomputedMlp._plain.__get__(mlp)
    times = []
    for i in range(calls + calls // 10):
        start = time.perf_counter()
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            y = mlp(x)
        y.float().sum().backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        if i >= calls // 10:  # after warm-up
            times.append(time.perf_counter() - start)
    del mlp.recompute, mlp._plain
    return statistics.median(times) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    mlp = RecomputedMlp(32, 128).to(args.device)
    x = torch.randn(4, 16, 32, device=args.device, requires_grad=True)
    for path in ("plain", "checkpoint", "function"):
        print(f"{path:10s} {per_call_us(mlp, x, path, args.calls):8.0f} us per forward + backward (median)")


if __name__ == "__main__":
    main()
