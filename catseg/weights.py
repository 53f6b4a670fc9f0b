"""Model weights as safetensors (no pickles), and the pretrained CLIP/backbone files of a preset."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .config import CatSegConfig
from .presets import preset_overrides


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (changing it, even for a moment, would
    apply to files other threads create meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_safetensors(state: dict, path: str | os.PathLike, metadata: Optional[dict] = None) -> Path:
    """Write a state dict to `path` as safetensors through a temporary name, renamed when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=metadata)
        try:  # safetensors makes the file readable by its owner only; give it the usual permissions
            os.chmod(tmp, 0o666 & ~current_umask())
        except OSError:  # a file system without permissions (some network mounts): as it is
            pass
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_weights(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write the model's weights to `path` (.safetensors) atomically, tagged with the preset name and the config
    fields that differ from the preset's (see `read_overrides`)."""
    metadata = {"format": "catseg", "preset": model.config.name}
    overrides = preset_overrides(model.config)
    if overrides:
        metadata["overrides"] = json.dumps(overrides, sort_keys=True)
    return write_safetensors(model.state_dict(), path, metadata)


WEIGHTS_FILE = "model.safetensors"  # the weights of a training checkpoint folder


def _metadata(path: str | os.PathLike) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as error:  # safetensors raises its own SafetensorError for a torn or foreign file
        raise ValueError(f"{str(path)!r} is not a readable safetensors weights file ({error})") from error


def read_preset(path: str | os.PathLike) -> Optional[str]:
    """The preset name stored in a weights file (None if it has none)."""
    return _metadata(path).get("preset")


def read_overrides(path: str | os.PathLike) -> dict:
    """The model config fields a weights file was saved with where they differ from its preset's (an ablation's
    `num_layers=1`, say): create_model(preset, pretrained=path) rebuilds that model. {} when there are none."""
    text = _metadata(path).get("overrides")
    if not text:
        return {}
    try:
        overrides = json.loads(text)
    except ValueError:
        overrides = None
    if not isinstance(overrides, dict):
        raise ValueError(f"{str(path)!r}: its 'overrides' metadata is not a JSON object of model config fields: "
                         f"{text[:200]!r}")
    return overrides


def check_weights_file(path: str | os.PathLike) -> Path:
    """Return `path` if it is an existing .safetensors file, or the model.safetensors of a training checkpoint
    folder; raise naming it otherwise (pickles are never read)."""
    if not str(path).strip():
        raise ValueError("the weights path is empty; give a .safetensors file or a training checkpoint folder")
    path = Path(path)
    if path.is_dir():
        if not (path / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"weights folder {str(path)!r} holds no {WEIGHTS_FILE} (a training checkpoint "
                                    f"folder holds one; or give a .safetensors file)")
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    if path.suffix != ".safetensors":
        raise ValueError(f"{str(path)!r}: model weights load from .safetensors files only (no pickles); convert "
                         f"released .pth checkpoints first")
    return path


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a safetensors file written by save_weights; refuses a file of another preset."""
    path = check_weights_file(path)
    preset = read_preset(path)
    if preset is not None and preset != model.config.name:
        raise ValueError(f"{str(path)!r} holds weights of preset {preset!r}, not {model.config.name!r}; "
                         f"build the model with create_model({preset!r}, pretrained=...)")
    state = load_file(str(path), device=str(next(model.parameters()).device))
    saved, own_overrides = read_overrides(path), preset_overrides(model.config)
    hint = (f"; the file was saved with config overrides {saved or 'none'} (this model: {own_overrides or 'none'}): "
            f"create_model({model.config.name!r}, pretrained=path) builds the model it holds"
            if saved != own_overrides else
            "; were the weights written with other overrides (embed_dim, prompt_templates, ...)?")
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (model {tuple(own[k].shape)})" for k, v in state.items()
             if k in own and own[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{str(path)!r} does not fit preset {model.config.name!r} as configured: {len(wrong)} tensors "
                         f"differ in shape, e.g. {'; '.join(wrong[:3])}{hint}")
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{str(path)!r} does not match preset {model.config.name!r}: missing "
                         f"{result.missing_keys[:10]}, unexpected {result.unexpected_keys[:10]}{hint}")


def clip_weights_file(cfg: CatSegConfig, weights_dir: str | os.PathLike) -> Path:
    """Where a weights folder keeps the preset's open_clip weights."""
    return Path(weights_dir) / f"clip-{cfg.clip_model}-{cfg.clip_pretrained}.safetensors"


def backbone_weights_file(cfg: CatSegConfig, weights_dir: str | os.PathLike) -> Path:
    """Where a weights folder keeps the preset's timm backbone weights."""
    return Path(weights_dir) / f"backbone-{cfg.backbone_model}.safetensors"
