"""Import the authors' released CAT-Seg checkpoints (detectron2 pickles) as safetensors for `create_model`.

    python -m catseg.convert_official model_base.pth --preset catseg2_vitb16 --out catseg2_vitb16.safetensors
    python -m catseg.convert_official model_large.pth --preset catseg2_vitl14 --out catseg2_vitl14.safetensors
    python -m catseg.convert_official model_final_base.pth --preset catseg_vitb16_r101 --out base.safetensors

The authors publish the files on Hugging Face (repository hamacojr/CAT-Seg, linked from github.com/cvlab-kaist/
CAT-Seg): model_base.pth / model_large.pth (later design), model_final_base.pth / model_final_large.pth (paper).
The later (CVPR 2024) release maps onto the catseg2_* presets; the paper design's release (model_final_*.pth,
detectron2 ResNet-101 or Swin-B names) onto the `_release` variants of the paper presets, which add the
release's computation (see presets.py). The checkpoint is read without executing pickled
code (tensors, NumPy arrays and plain containers only). Every released parameter must map onto exactly one of the
preset's parameters and every parameter of the preset must be filled: anything left over or missing is an error
that lists the keys. The CLIP positional embedding is resized (bicubic) to the preset's grid as the release does
at run time, and split q/k/v projections are fused or kept to match the preset's layout.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from .clip import CLIP_MEAN, CLIP_STD
from .model import IMAGENET_MEAN, IMAGENET_STD
from .presets import PRESETS

# (pattern, replacement or function of the match) on the release's names, first match wins; None drops the key.
Rule = tuple[str, Union[str, Callable[[re.Match], str], None]]

_CLIP = r"sem_seg_head\.predictor\.clip_model\."
_AGG = r"sem_seg_head\.predictor\.transformer\."

# The later release: CLIP (OpenAI layout, q/k/v split), CLIP-tap upsamplers, the aggregator and decoder.
CATSEG2_RULES: list[Rule] = [
    (_CLIP + r"(.+)", r"clip.model.\1"),
    (r"upsample1\.(weight|bias)", r"clip_upsamplers.0.\1"),
    (r"upsample2\.(weight|bias)", r"clip_upsamplers.1.\1"),
    (_AGG + r"conv1\.(weight|bias)", r"cost_embed.\1"),
    (_AGG + r"guidance_projection\.0\.(weight|bias)", r"appearance_proj.0.\1"),
    (_AGG + r"text_guidance_projection\.0\.(weight|bias)", r"text_proj.0.\1"),
    (_AGG + r"decoder_guidance_projection\.(\d+)\.0\.(weight|bias)", r"decoder_proj.\1.0.\2"),
    (_AGG + r"decoder1\.up\.(weight|bias)", r"decoder.0.up.\1"),
    (_AGG + r"decoder2\.up\.(weight|bias)", r"decoder.1.up.\1"),
    (_AGG + r"decoder1\.conv\.double_conv\.(\d+)\.(weight|bias)", r"decoder.0.conv.\1.\2"),
    (_AGG + r"decoder2\.conv\.double_conv\.(\d+)\.(weight|bias)", r"decoder.1.conv.\1.\2"),
    (_AGG + r"head\.(weight|bias)", r"head.\1"),
    (_AGG + r"layers\.(\d+)\.swin_block\.block_(\d)\.attn_mask", None),  # shifted-window mask, recomputed
    (_AGG + r"layers\.(\d+)\.swin_block\.block_1\.(.+)", r"layers.\1.spatial.blocks.0.\2"),
    (_AGG + r"layers\.(\d+)\.swin_block\.block_2\.(.+)", r"layers.\1.spatial.blocks.1.\2"),
    (_AGG + r"layers\.(\d+)\.swin_block\.guidance_norm\.(weight|bias)", r"layers.\1.spatial.guidance_norm.\2"),
    (_AGG + r"layers\.(\d+)\.attention\.attention\.([qkv])\.(weight|bias)", r"layers.\1.klass.\2.\3"),
    (_AGG + r"layers\.(\d+)\.attention\.MLP\.0\.(weight|bias)", r"layers.\1.klass.mlp.fc1.\2"),
    (_AGG + r"layers\.(\d+)\.attention\.MLP\.2\.(weight|bias)", r"layers.\1.klass.mlp.fc2.\2"),
    (_AGG + r"layers\.(\d+)\.attention\.norm([12])\.(weight|bias)", r"layers.\1.klass.norm\2.\3"),
    (_AGG + r"layers\.(\d+)\.attention\.padding_(tokens|guidance)", r"layers.\1.klass.padding_\2"),
]


def _stage(offset: int, template: str) -> Callable[[re.Match], str]:
    # detectron2 counts stages from res2 (ResNet) or 0 (Swin), timm from layer1 / layers_0; the offset bridges them.
    return lambda m: template.format(int(m[1]) + offset, *m.groups()[1:])


# The paper design's release: detectron2 ResNet or Swin backbone, CLIP (OpenAI layout, q/k/v fused), aggregator.
PAPER_RULES: list[Rule] = [
    (r"backbone\.stem\.conv1\.weight", "backbone.body.conv1.weight"),
    (r"backbone\.stem\.conv1\.norm\.(weight|bias|running_mean|running_var)", r"backbone.body.bn1.\1"),
    (r"backbone\.res(\d)\.(\d+)\.conv(\d)\.weight", _stage(-1, "backbone.body.layer{}.{}.conv{}.weight")),
    (r"backbone\.res(\d)\.(\d+)\.conv(\d)\.norm\.(weight|bias|running_mean|running_var)",
     _stage(-1, "backbone.body.layer{}.{}.bn{}.{}")),
    (r"backbone\.res(\d)\.(\d+)\.shortcut\.weight", _stage(-1, "backbone.body.layer{}.{}.downsample.0.weight")),
    (r"backbone\.res(\d)\.(\d+)\.shortcut\.norm\.(weight|bias|running_mean|running_var)",
     _stage(-1, "backbone.body.layer{}.{}.downsample.1.{}")),
    (r"backbone\.patch_embed\.(.+)", r"backbone.body.patch_embed.\1"),
    (r"backbone\.layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_index", None),  # recomputed by timm
    (r"backbone\.layers\.(\d+)\.blocks\.(.+)", _stage(0, "backbone.body.layers_{}.blocks.{}")),
    # the original Swin merges patches at the end of a stage, timm at the start of the next one
    (r"backbone\.layers\.(\d+)\.downsample\.(.+)", _stage(1, "backbone.body.layers_{}.downsample.{}")),
    (r"backbone\.norm(\d)\.(weight|bias)", r"backbone.out_norms.\1.\2"),
    *[rule for rule in CATSEG2_RULES if not rule[0].startswith("upsample")],
]

RULES: dict[str, list[Rule]] = {"catseg2": CATSEG2_RULES, "paper": PAPER_RULES}

# Target entries that are bookkeeping, not weights; a release need not hold them.
_BOOKKEEPING = (".num_batches_tracked",)

# Normalisation constants the release may store as buffers (x 255: detectron2 images are 0..255); the model has
# them built in, so stored values are checked, not loaded.
_PIXEL_BUFFERS = {"pixel_mean": IMAGENET_MEAN, "pixel_std": IMAGENET_STD,
                  "clip_pixel_mean": CLIP_MEAN, "clip_pixel_std": CLIP_STD}

_POSITIONAL = "clip.model.visual.positional_embedding"


class ConversionError(ValueError):
    """The checkpoint does not match the preset (the message lists what is wrong)."""


# -- reading --------------------------------------------------------------------------------------------------------
def _numpy_globals() -> list:
    import numpy._core.multiarray as multiarray

    allowed = [np.ndarray, np.dtype, (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
               (multiarray.scalar, "numpy.core.multiarray.scalar"), multiarray._reconstruct, multiarray.scalar]
    allowed += [type(np.dtype(t)) for t in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "b1")]
    return allowed


def _reason(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = [line for line in lines if not line.startswith(("Weights only load failed", "Please file", "Check the"))]
    return (detail or lines or [type(error).__name__])[0]


def load_detectron2_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The `model` state dict of a detectron2 checkpoint, read without executing pickled code.

    Only tensors, NumPy arrays/scalars and plain containers are accepted (torch's weights-only unpickler); a
    pickle that names any other callable is refused with a ValueError.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        named = re.search(r"GLOBAL ([\w.]+)", str(error))
        if named:
            raise ValueError(f"{str(path)!r}: refusing to unpickle it: it names {named[1]}, which is neither a tensor, "
                             f"an array nor a plain container; a weights file has no reason to run code, so do not "
                             f"load this file with pickle elsewhere either") from None
        raise ValueError(f"{str(path)!r} is not a readable torch/detectron2 checkpoint "
                         f"({_reason(error)})") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(f"{str(path)!r} is not a readable torch/detectron2 checkpoint ({_reason(error)})") from None
    if isinstance(obj, dict) and "model" not in obj and obj and all(
            torch.is_tensor(v) or isinstance(v, np.ndarray) for v in obj.values()):
        obj = {"model": obj}  # a bare state dict, saved without detectron2's wrapper
    if not isinstance(obj, dict) or "model" not in obj:
        found = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{str(path)!r} is not a detectron2 checkpoint: expected a dict with the state dict under "
                         f"'model', found {found}")
    state = obj["model"]
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r}: 'model' holds a {type(state).__name__}, not a state dict")
    tensors = {}
    for key, value in state.items():
        if isinstance(value, np.ndarray):
            value = torch.tensor(value)  # a copy: keeps 0-d arrays 0-d and owns writable memory
        if not torch.is_tensor(value):
            raise ValueError(f"{str(path)!r}: entry {key!r} of 'model' is a {type(value).__name__}, not an array")
        tensors[str(key)] = value
    return tensors


# -- mapping --------------------------------------------------------------------------------------------------------
def target_preset(preset: str) -> str:
    """The preset a release converts to: a paper preset's released weights need its `_release` variant."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(convertible_presets())}")
    if not preset.startswith("catseg2_") and not preset.endswith("_release"):
        if f"{preset}_release" in PRESETS:
            return f"{preset}_release"
        raise ValueError(f"no released checkpoint converts to preset {preset!r}; choose one of: "
                         f"{', '.join(convertible_presets())}")
    return preset


def convertible_presets() -> list[str]:
    """Presets that released checkpoints convert to."""
    return sorted(p for p in PRESETS if p.startswith("catseg2_vit") or p.endswith("_release"))


def rules_for(preset: str) -> list[Rule]:
    """The name-mapping rules of a preset's release family."""
    return RULES["catseg2" if target_preset(preset).startswith("catseg2_") else "paper"]


def rename(state: dict[str, torch.Tensor], rules: list[Rule]) -> tuple[dict, list[str], list[str]]:
    """Apply the rules: (renamed tensors, names no rule matched, names dropped as derived buffers)."""
    compiled = [(re.compile(pattern + r"\Z"), repl) for pattern, repl in rules]
    out, unmatched, dropped = {}, [], []
    for key, value in state.items():
        if key in _PIXEL_BUFFERS:
            _check_pixel_buffer(key, value)
            dropped.append(key)
            continue
        for pattern, repl in compiled:
            if pattern.match(key):
                if repl is None:
                    dropped.append(key)
                else:
                    out[pattern.sub(repl, key)] = value
                break
        else:
            unmatched.append(key)
    return out, unmatched, dropped


def _check_pixel_buffer(key: str, value: torch.Tensor) -> None:
    expected = torch.tensor(_PIXEL_BUFFERS[key]) * 255
    if value.numel() != 3 or not torch.allclose(value.flatten().double(), expected.double(), atol=1e-2):
        raise ConversionError(f"checkpoint buffer {key!r} is {value.flatten().tolist()}, but the preset normalises "
                              f"with {expected.tolist()} (0..255 scale); this checkpoint was trained with other "
                              f"pixel statistics")


def _match_qkv(state: dict, target_keys: set) -> None:
    # The release keeps q/k/v apart (for q/v fine-tuning); the preset may hold them fused, or the other way round.
    for key in [k for k in state if k.endswith(".attn.q_proj_weight")]:
        stem = key[: -len("q_proj_weight")]
        parts = [stem + f"{c}_proj_weight" for c in "qkv"]
        if stem + "in_proj_weight" in target_keys and all(p in state for p in parts):
            state[stem + "in_proj_weight"] = torch.cat([state.pop(p) for p in parts], dim=0)
    for key in [k for k in state if k.endswith(".attn.in_proj_weight")]:
        stem = key[: -len("in_proj_weight")]
        if stem + "q_proj_weight" in target_keys:
            for p, part in zip("qkv", state.pop(key).chunk(3, dim=0)):
                state[stem + f"{p}_proj_weight"] = part


def resize_positional_embedding(pos: torch.Tensor, tokens: int) -> torch.Tensor:
    """(1 + g*g, C) -> (tokens, C): the class position kept, the grid resized bicubically (no antialias)."""
    grid, new = round((pos.shape[0] - 1) ** 0.5), round((tokens - 1) ** 0.5)
    if grid * grid + 1 != pos.shape[0] or new * new + 1 != tokens:
        raise ConversionError(f"positional embedding of {pos.shape[0]} tokens cannot be resized to {tokens}: "
                              f"both must be 1 + a square grid")
    side = pos[1:].float().T.reshape(1, -1, grid, grid)
    side = F.interpolate(side, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1].float(), side.reshape(-1, new * new).T], dim=0).to(pos.dtype)


def convert_state_dict(state: dict[str, torch.Tensor], rules: list[Rule],
                       target: dict[str, torch.Tensor], preset: str = "") -> dict[str, torch.Tensor]:
    """Released parameter names and layouts -> a model's state dict (`target` gives its names and shapes).

    Raises ConversionError listing every released key left over and every target key left unfilled.
    """
    mapped, unmatched, _ = rename(state, rules)
    for key in target:
        if key.endswith(_BOOKKEEPING) and key not in mapped:
            mapped[key] = torch.zeros_like(target[key], device="cpu")
    _match_qkv(mapped, set(target))
    if _POSITIONAL in mapped and _POSITIONAL in target and mapped[_POSITIONAL].shape != target[_POSITIONAL].shape:
        mapped[_POSITIONAL] = resize_positional_embedding(mapped[_POSITIONAL], target[_POSITIONAL].shape[0])
    extra = sorted(set(mapped) - set(target))
    missing = sorted(set(target) - set(mapped))
    shapes = sorted(f"{k}: checkpoint {tuple(mapped[k].shape)}, preset {tuple(target[k].shape)}"
                    for k in set(mapped) & set(target) if mapped[k].shape != target[k].shape)
    problems = []
    if unmatched:
        problems.append(f"{len(unmatched)} checkpoint key(s) match no parameter of the preset: "
                        f"{', '.join(sorted(unmatched))}")
    if extra:
        problems.append(f"{len(extra)} checkpoint key(s) map to names the preset does not have: {', '.join(extra)}")
    if missing:
        problems.append(f"{len(missing)} parameter(s) of the preset are missing from the checkpoint: "
                        f"{', '.join(missing)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {'; '.join(shapes)}")
    if problems:
        raise ConversionError(f"the checkpoint does not match preset {preset!r}:\n  " + "\n  ".join(problems))
    return {k: mapped[k].to(target[k].dtype).contiguous() for k in target}


def convert(checkpoint: str | os.PathLike, preset: str, out: str | os.PathLike,
            log: Callable[[str], None] = lambda message: None) -> Path:
    """Convert a released checkpoint into a safetensors file that `create_model` loads.

    catseg2_* presets take the later release (model_base.pth, model_large.pth). A paper preset (catseg_vitb16_r101,
    ...) takes the paper design's release (model_final_*.pth) and writes weights for its `_release` variant.
    """
    from .factory import create_model
    from .weights import save_weights

    name = target_preset(preset)  # an unknown preset fails before the (large) checkpoint is read
    if name != preset:
        log(f"the released weights of {preset} run with the release's computation: preset {name}")
    state = load_detectron2_checkpoint(checkpoint)
    log(f"read {len(state)} tensors from {checkpoint}")
    with torch.device("meta"):  # names and shapes only; the weights come from the checkpoint
        model = create_model(name)
    target = {k: v for k, v in model.state_dict().items()}
    converted = convert_state_dict(state, rules_for(name), target, name)
    model.load_state_dict(converted, strict=True, assign=True)
    path = save_weights(model, out)
    log(f"wrote {len(converted)} tensors of preset {name} to {path}; load it with "
        f"catseg.create_model({name!r}, pretrained={str(path)!r})")
    return path


def main(argv: Optional[list[str]] = None) -> int:
    """Command line: python -m catseg.convert_official CHECKPOINT.pth --preset NAME --out weights.safetensors."""
    parser = argparse.ArgumentParser(prog="python -m catseg.convert_official", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="released detectron2 checkpoint, e.g. model_base.pth")
    parser.add_argument("--preset", required=True, help="preset the weights belong to, e.g. catseg2_vitb16")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    args = parser.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        parser.error(f"--out {args.out!r} must end in .safetensors")
    try:
        convert(args.checkpoint, args.preset, args.out, log=lambda m: print(m, file=sys.stderr))
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
