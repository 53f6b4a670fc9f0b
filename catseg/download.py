"""Fetch a preset's pretrained CLIP and backbone weights once, for clusters whose compute nodes are offline.

    python -m catseg.download catseg_vitl14_swinb --out /shared/weights
    # then set weights_dir: /shared/weights in the run config (or create_model(..., weights_dir=...))
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import timm
import torch

from .clip import ClipEncoder, download_clip_weights, load_clip_weights
from .presets import get_config
from .weights import backbone_weights_file, clip_weights_file, write_safetensors


def download_preset_weights(preset: str, out: str | os.PathLike) -> list[Path]:
    """Download (needs network) and store the preset's open_clip and timm weights as safetensors in `out`."""
    cfg = get_config(preset)
    if cfg.clip_pretrained == "none":
        raise ValueError(f"preset {preset!r} has no pretrained weights to download")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    encoder = ClipEncoder(cfg)
    load_clip_weights(encoder, download_clip_weights(cfg))
    write_safetensors(encoder.model.state_dict(), clip_weights_file(cfg, out))
    written.append(clip_weights_file(cfg, out))
    if cfg.backbone in ("resnet", "swin"):
        with torch.no_grad():
            backbone = timm.create_model(cfg.backbone_model, pretrained=True)
        write_safetensors(backbone.state_dict(), backbone_weights_file(cfg, out))
        written.append(backbone_weights_file(cfg, out))
    return written


def main(argv=None) -> int:
    """`python -m catseg.download PRESET --out DIR`: the same command as `catseg download`."""
    from .cli import main as cli_main

    return cli_main(["download", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
