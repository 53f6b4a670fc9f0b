"""The count of ../../count_compiled_launches.py with the MLP recompute as it was before this round: the custom
autograd Function also under torch.compile. Run from the repository root:

    python benchmarks/results/counted_2026-11-26d/before.py --preset catseg_vitb16_r101 --batch 4 --json before.json
"""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import catseg.aggregation as agg  # noqa: E402
import count_compiled_launches  # noqa: E402


def forward(self, x):
    if self.recompute and torch.is_grad_enabled():
        if self._plain():
            return agg._MlpRecomputeFn.apply(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                                             isinstance(self.act, torch.nn.ReLU))
        return agg.checkpoint(agg.Mlp.forward.__get__(self), x, use_reentrant=False)
    return agg.Mlp.forward(self, x)


agg.RecomputedMlp.forward = forward
count_compiled_launches.main(sys.argv[1:])
