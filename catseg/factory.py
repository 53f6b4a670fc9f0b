"""create_model / list_models: the one way to build a CAT-Seg model."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from .clip import download_clip_weights, load_clip_weights
from .model import CatSeg
from .presets import PRESETS, get_config
from .weights import (backbone_weights_file, check_weights_file, clip_weights_file, load_weights, read_overrides,
                      read_preset)


def list_models() -> list[str]:
    """Names of the model presets."""
    return sorted(PRESETS)


def create_model(name: str, pretrained: Union[bool, str, os.PathLike] = False, **overrides) -> CatSeg:
    """Build a preset.

    pretrained=False: random weights, no network. True: the preset's open_clip and timm weights (from
    `weights_dir` when set, else downloaded by name). A path: a .safetensors file written by save_weights, or a
    training checkpoint folder (its model.safetensors); the config fields it was saved with where they differ from
    the preset's (an ablation's, say) apply too, under `overrides`.
    """
    if not isinstance(pretrained, (bool, str, os.PathLike)) and pretrained is not None:
        raise TypeError(f"pretrained must be False, True or a .safetensors path, got {type(pretrained).__name__} "
                        f"{pretrained!r}")
    if pretrained not in (False, None, True):  # a weights file rebuilds the model it was saved from
        path = check_weights_file(pretrained)
        if read_preset(path) == name:
            overrides = {**read_overrides(path), **overrides}
    cfg = get_config(name, **overrides)
    if pretrained is True:
        return _with_pretrained_parts(cfg)
    model = CatSeg(cfg)
    if pretrained not in (False, None):
        load_weights(model, pretrained)
    return model


def _with_pretrained_parts(cfg) -> CatSeg:
    if cfg.clip_pretrained == "none":
        raise ValueError(f"preset {cfg.name!r} has no pretrained weights; use pretrained=False")
    backbone = "download"
    if cfg.weights_dir:
        clip_file, backbone_file = clip_weights_file(cfg, cfg.weights_dir), backbone_weights_file(cfg, cfg.weights_dir)
        missing = [str(p) for p in (clip_file, backbone_file)
                   if not p.is_file() and (p is clip_file or cfg.backbone in ("resnet", "swin"))]
        if missing:
            raise FileNotFoundError(f"weights_dir {cfg.weights_dir!r} lacks {missing}; fetch them once with "
                                    f"`python -m catseg.download {cfg.name} --out {cfg.weights_dir}`")
        backbone = str(backbone_file)
    else:
        clip_file = Path(download_clip_weights(cfg))
    model = CatSeg(cfg, backbone_weights=backbone if cfg.backbone in ("resnet", "swin") else None)
    load_clip_weights(model.clip, str(clip_file))
    model.clear_text_cache()
    return model
