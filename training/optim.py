"""AdamW with separate learning rates for CLIP, the feature backbone and the head, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from training.config import OptimConfig, ScheduleConfig


NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.RMSNorm)


def norm_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters of the model's normalisation layers (LayerNorm and its subclasses in open_clip and timm,
    GroupNorm, BatchNorm, RMSNorm): the recipe's weight decay spares them."""
    return {id(p) for m in model.modules() if isinstance(m, NORMS) for p in m.parameters(recurse=False)}


def param_groups(groups: dict[str, list[tuple[str, nn.Parameter]]], cfg: OptimConfig, norms: set[int]) -> list[dict]:
    """Turn the model's {"clip", "backbone", "head"} parameter lists into AdamW groups: weight decay for all but the
    parameters in `norms` (see `norm_parameters`) and scalars (CLIP's logit scale), which get none."""
    lrs = {"clip": cfg.clip_lr, "backbone": cfg.backbone_lr, "head": cfg.lr}
    unknown = sorted(set(groups) - set(lrs))
    if unknown:
        raise ValueError(f"parameter group(s) {unknown} have no learning rate; known groups: {', '.join(lrs)}")
    out = []
    for key, named in groups.items():
        plain = [p for _, p in named if id(p) in norms or p.ndim == 0]
        decay = [p for _, p in named if not (id(p) in norms or p.ndim == 0)]
        for params, wd, suffix in ((decay, cfg.weight_decay, ""), (plain, 0.0, ".no_decay")):
            if params and lrs[key] > 0:
                out.append({"params": params, "lr": lrs[key], "base_lr": lrs[key], "weight_decay": wd,
                            "name": key + suffix})
    if not out:
        raise ValueError("no parameter trains: every group is frozen or has learning rate 0")
    return out


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the model's parameter groups with the config's learning rates and weight decay."""
    # fused: one multi-tensor kernel per group and dtype instead of about ten kernels per parameter (the ViT-B preset
    # trains 271 tensors; `python benchmarks/bench_optimizer.py`: 20 ms fused against 62 ms one by one on a 2-core
    # CPU). The fused kernel is deterministic, so resuming stays bitwise equal.
    groups = param_groups(model.parameter_groups(), cfg, norm_parameters(model))
    return torch.optim.AdamW(groups, betas=cfg.betas, eps=cfg.eps, fused=True)


def lr_factor(step: int, total: int, cfg: ScheduleConfig) -> float:
    """Multiplier of each group's peak learning rate for the optimizer step ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return 1.0
    t = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * t)) if cfg.name == "cosine" else (1 - t) ** cfg.power
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


class LRSchedule:
    """Sets every group's learning rate from the step alone, so resuming needs only the step."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, cfg: ScheduleConfig):
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.cfg = cfg
        self.step_count = 0
        self._apply()

    def _apply(self) -> None:
        factor = lr_factor(self.step_count, self.total_steps, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor

    def step(self) -> None:
        """Advance one optimizer step."""
        self.step_count += 1
        self._apply()

    def last_lrs(self) -> dict[str, float]:
        """Learning rate per named group (decay groups only, one per model part) of the last optimizer step taken
        (the groups already hold the next step's)."""
        factor = lr_factor(max(self.step_count - 1, 0), self.total_steps, self.cfg)
        return {g["name"]: g["base_lr"] * factor for g in self.optimizer.param_groups
                if not g["name"].endswith(".no_decay")}

    def state_dict(self) -> dict:
        """The schedule position."""
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        """Restore the position and set the learning rates for it."""
        self.step_count = int(state["step_count"])
        self._apply()
