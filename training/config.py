"""Run configuration: typed dataclasses read from configs/*.yaml, validated before anything starts."""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

FINETUNE_MODES = ("", "attention", "qv", "frozen", "full")
SCHEDULES = ("cosine", "poly", "constant")
PRECISIONS = ("no", "bf16", "fp16")
COMPILE_SCOPES = ("model", "aggregation")
COMPILE_MODES = ("", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class ConfigError(ValueError):
    """A run config that cannot be used; the message names the file, key and the allowed values."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(name: str, value: Any, allowed: tuple) -> None:
    _check(value in allowed, f"{name} = {value!r}; choose one of: {', '.join(str(a) or repr(a) for a in allowed)}")


@dataclass
class ModelConfig:
    preset: str = "catseg_vitb16_r101"  # name from catseg.list_models()
    pretrained: bool | str = True  # True: the preset's pretrained CLIP/backbone; a path: a catseg .safetensors file
    # which CLIP parameters train: attention (paper), qv (later design), frozen, full; empty = the preset's own
    clip_finetune: str = ""
    activation_checkpointing: bool = False  # recompute transformer blocks in backward to save memory (big presets)
    weights_dir: str = ""  # folder of pre-fetched CLIP/backbone weights (`python -m catseg.download`); empty = download
    # model config fields (catseg.CatSegConfig) that differ from the preset's, e.g. {num_layers: 1,
    # spatial_aggregation: false} for the paper's ablations; the weights files record them, so the evaluation and
    # `catseg segment` rebuild the same model
    overrides: dict = field(default_factory=dict)

    def __post_init__(self):
        _choice("model.clip_finetune", self.clip_finetune, FINETUNE_MODES)
        _check(bool(self.preset), "model.preset is empty; name a preset from catseg.list_models()")
        if self.overrides:  # checked against the preset now, not when the processes have started
            from catseg.presets import NOT_OVERRIDES, get_config

            instead = {"name": "a model's name is its preset; set model.preset",
                       "weights_dir": "set model.weights_dir instead"}
            for key in NOT_OVERRIDES:  # the fields a weights file does not record
                _check(key not in self.overrides, f"model.overrides.{key}: {instead.get(key, 'not part of a model')}")
            try:
                get_config(self.preset, **self.overrides)
            except ValueError as e:
                raise ConfigError(f"model.overrides {self.overrides}: {e}") from None


@dataclass
class DataConfig:
    # folder of data_prep shards; the class names and the ignore value come from its dataset.json
    root: str = "data/shards/coco_stuff/train"
    crop_size: int = 0  # square training crop; 0 = the preset's image size
    short_side: int = 0  # resize the short side to this before cropping; 0 = crop_size
    scale_range: tuple[float, float] = (1.0, 1.0)  # random factor on short_side (1, 1 = the paper's fixed resize)
    hflip: bool = True  # random horizontal flip
    jitter: bool = True  # photometric jitter (brightness, contrast, saturation, hue)
    workers: int = 4  # data loader processes per training process
    shuffle_buffer: int = 256  # samples shuffled together within one shard read

    def __post_init__(self):
        _check(self.crop_size >= 0, f"data.crop_size = {self.crop_size}; use a positive size or 0 for the preset's")
        _check(self.short_side >= 0, f"data.short_side = {self.short_side}; use a positive size or 0 for crop_size")
        lo, hi = self.scale_range
        _check(0 < lo <= hi, f"data.scale_range = {list(self.scale_range)}; need 0 < low <= high")
        _check(self.workers >= 0, f"data.workers = {self.workers}; use 0 (load in the training process) or more")
        _check(self.shuffle_buffer >= 1, f"data.shuffle_buffer = {self.shuffle_buffer}; use 1 (no shuffle) or more")


@dataclass
class LossConfig:
    mask_ignore: bool = True  # drop ignore pixels from the loss; False = the reference's all-zero target for them


@dataclass
class OptimConfig:
    lr: float = 2e-4  # learning rate of the aggregation head and decoder
    clip_lr: float = 2e-6  # learning rate of the trainable CLIP parameters
    backbone_lr: float = 2e-6  # learning rate of the feature backbone (the paper: lr x 0.01 for ResNet-101)
    weight_decay: float = 1e-4  # AdamW weight decay; normalisation layers always get 0
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 0.01  # max global gradient norm; 0 = no clipping (the reference clips the full model at 0.01)

    def __post_init__(self):
        for name in ("lr", "clip_lr", "backbone_lr", "weight_decay", "eps", "grad_clip"):
            _check(getattr(self, name) >= 0, f"optim.{name} = {getattr(self, name)}; must be >= 0")
        _check(all(0 <= b < 1 for b in self.betas), f"optim.betas = {list(self.betas)}; each must be in [0, 1)")


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # learning-rate decay after warmup: cosine (to min_lr_ratio), poly or constant
    warmup_steps: int = 0  # linear warmup from 0 (the release used none)
    power: float = 0.9  # exponent of the poly schedule
    min_lr_ratio: float = 0.0  # final learning rate as a fraction of each group's peak

    def __post_init__(self):
        _choice("schedule.name", self.name, SCHEDULES)
        _check(self.warmup_steps >= 0, f"schedule.warmup_steps = {self.warmup_steps}; must be >= 0")
        _check(self.power > 0, f"schedule.power = {self.power}; must be > 0")
        _check(0 <= self.min_lr_ratio <= 1, f"schedule.min_lr_ratio = {self.min_lr_ratio}; must be in [0, 1]")


@dataclass
class TrainConfig:
    steps: int = 80000  # optimizer steps
    batch_size: int = 4  # global batch per optimizer step (all processes and accumulation steps together)
    grad_accum: int = 1  # micro-batches accumulated per optimizer step
    mixed_precision: str = ""  # no, bf16 or fp16; empty = what the accelerate launch config says
    seed: int = 0  # seeds the model init, the data order and the augmentation
    deterministic: bool = False  # torch deterministic algorithms (bitwise-reproducible resume on CPU)
    compile: bool = False  # torch.compile the model for training (forward and backward); what: compile_scope
    compile_scope: str = "model"  # model: the whole forward as one graph; aggregation: the aggregation and decoder
    compile_mode: str = ""  # torch.compile mode; empty = its default; reduce-overhead adds its CUDA graphs
    channels_last: bool = False  # the convolutions (ResNet, cost embedding, decoder) run NHWC, cuDNN's bf16 layout
    stencil_upsampling: bool = False  # compiled: the decoder's x2 upsampling as a fused pointwise stencil (same result)
    log_every: int = 20  # steps between logged metrics
    ckpt_every: int = 1000  # steps between checkpoints (a final one is always written)
    keep_last: int = 3  # complete checkpoints kept; older ones are deleted
    run_dir: str = ""  # where checkpoints, config.yaml and the MLflow store go; empty = runs/<config name>

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "log_every", "ckpt_every", "keep_last"):
            _check(getattr(self, name) >= 1, f"train.{name} = {getattr(self, name)}; must be >= 1")
        _check(self.mixed_precision in ("",) + PRECISIONS,
               f"train.mixed_precision = {self.mixed_precision!r}; choose one of: '' (launcher's), no, bf16, fp16")
        _choice("train.compile_scope", self.compile_scope, COMPILE_SCOPES)
        _choice("train.compile_mode", self.compile_mode, COMPILE_MODES)
        _check(self.compile or not self.stencil_upsampling,
               "train.stencil_upsampling = true acts on compiled code only; set train.compile: true as well")
        _check(self.batch_size % self.grad_accum == 0,
               f"train.batch_size = {self.batch_size} is not divisible by train.grad_accum = {self.grad_accum}")


@dataclass
class TrackingConfig:
    uri: str = ""  # MLflow tracking URI; empty = $MLFLOW_TRACKING_URI, else sqlite:///<run_dir>/mlflow.db
    experiment: str = "catseg"  # MLflow experiment name
    run_name: str = ""  # MLflow run name; empty = the run folder's name
    timeout_s: float = 10.0  # give up on one tracking request after this long (then keep metrics locally)

    def __post_init__(self):
        _check(bool(self.experiment), "tracking.experiment is empty; give an experiment name")
        _check(self.timeout_s > 0, f"tracking.timeout_s = {self.timeout_s}; must be > 0")


@dataclass
class RunConfig:
    name: str = "run"  # run name: default run folder runs/<name>
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self):
        _check(bool(self.name) and "/" not in self.name, f"name = {self.name!r}; use a non-empty name without '/'")
        _check(self.schedule.warmup_steps <= self.train.steps,
               f"schedule.warmup_steps = {self.schedule.warmup_steps} exceeds train.steps = {self.train.steps}")

    def run_dir(self) -> Path:
        """The run folder: train.run_dir, or runs/<name> when empty."""
        return Path(self.train.run_dir or Path("runs") / self.name)

    def to_dict(self) -> dict:
        """Plain nested dict (tuples as lists) for YAML and MLflow params."""
        return _plain(dataclasses.asdict(self))

    def flat(self) -> dict[str, Any]:
        """Dotted-key view of the config, e.g. {'optim.lr': 0.0002, ...}."""
        return _flat(self.to_dict())


def _flat(tree: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix[:-1]] = node

    walk("", tree)
    return out


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_plain(v) for v in node]
    return node


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(key: str, value: Any, tp: Any, where: str) -> Any:
    """Check one leaf value against its annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(key, value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {key} = {value!r} has the wrong type; expected {_type_name(tp)}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: {key} = {value!r}; expected a list of {len(args)} values")
        return tuple(_coerce(f"{key}[{i}]", v, a, where) for i, (v, a) in enumerate(zip(value, args)))
    if tp is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key} = {value!r} has the wrong type; expected a number")
        return float(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} = {value!r} has the wrong type; expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key} = {value!r} has the wrong type; expected an integer")
        return value
    if tp is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{where}: {key} = {value!r} has the wrong type; expected a mapping of names to values")
        return dict(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} = {value!r} has the wrong type; expected a string")
        return value
    raise ConfigError(f"{where}: {key} has an unsupported type {_type_name(tp)}")


def _build(cls: type, data: Any, prefix: str, where: str) -> Any:
    if data is None and prefix:  # a section whose keys are all commented out
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: '{prefix[:-1] or 'the file'}' must be a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{where}: unknown key '{full}'; valid keys{' in ' + repr(prefix[:-1]) if prefix else ''}"
                              f": {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{full}.", where)
        else:
            kwargs[key] = _coerce(full, value, tp, where)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """Split 'train.steps=50' into ('train.steps', 50), reading the value as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.steps=50")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted keys in a nested config dict; an unknown section is caught later by validation."""
    for text in overrides:
        key, value = parse_override(text)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if node.get(part) is None:  # absent, or a section whose keys are all commented out
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: '{part}' is not a section")
        node[parts[-1]] = value
    return data


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RunConfig:
    """Read and validate a run config YAML (None = built-in defaults) with KEY=VALUE overrides applied."""
    where = str(path) if path else "defaults"
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"run config {p} not found; the run configs are in configs/ "
                              f"({', '.join(sorted(q.name for q in Path('configs').glob('*.yaml'))) or 'none here'})")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: a run config is a mapping of sections (train:, data:, ...), got {data!r}")
        data.setdefault("name", p.stem)
    if overrides:
        where += " + --set " + " ".join(overrides)
        data = apply_overrides(data, overrides)
    return _build(RunConfig, data, "", where)


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (temporary name, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    os.replace(tmp, path)


ABSENT = "(absent)"  # a key one of two compared configs does not have


def config_changes(path: str | os.PathLike, cfg: RunConfig) -> dict[str, tuple[Any, Any]] | None:
    """How `cfg` differs from the config saved at `path` (a run folder's config.yaml): {dotted key: (saved value,
    new value)}, ABSENT for a key one side lacks (a key of another version); {} if they are the same, None if there
    is no file. A file that is not a YAML mapping differs as a whole: {"config.yaml": ("unreadable", "rewritten")}."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        saved = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        saved = None
    if not isinstance(saved, dict):
        return {path.name: ("unreadable", "rewritten")}
    old, new = _flat(saved), cfg.flat()
    return {k: (old.get(k, ABSENT), new.get(k, ABSENT)) for k in [*new, *(k for k in old if k not in new)]
            if old.get(k, ABSENT) != new.get(k, ABSENT)}


def replace_config(cfg: RunConfig, path: str | os.PathLike, step: int) -> tuple[Path | None, dict]:
    """Write `cfg` to `path` (a run folder's config.yaml) as the config of the run from `step` on. A saved config
    that differs is kept beside it first, as config.until_step_<step>.yaml (the config the run used until it
    continued at `step` with another; a number is added if that name is taken). Returns (where the earlier config
    was kept or None, `config_changes`' dict of what changed)."""
    path = Path(path)
    changes = config_changes(path, cfg)
    kept = None
    if changes:
        kept = path.with_name(f"{path.stem}.until_step_{step:08d}{path.suffix}")
        n = 1
        while kept.exists():
            n += 1
            kept = path.with_name(f"{path.stem}.until_step_{step:08d}.{n}{path.suffix}")
        os.replace(path, kept)
    save_config(cfg, path)
    return kept, changes or {}


# Keys (and sections) that say where things go and how often they are written, not what is trained: a run
# continued with only these changed (a run folder moved along with its config, say) trains as it would have.
BOOKKEEPING_KEYS = ("name", "train.run_dir", "train.log_every", "train.ckpt_every", "train.keep_last",
                    "model.weights_dir")
BOOKKEEPING_SECTIONS = ("tracking.",)


def trains_differently(changes: dict[str, Any]) -> bool:
    """Whether `config_changes`' dict changes what is trained (any key but the bookkeeping ones)."""
    return any(key not in BOOKKEEPING_KEYS and not key.startswith(BOOKKEEPING_SECTIONS) for key in changes)


def describe_changes(changes: dict[str, tuple[Any, Any]], most: int = 8) -> str:
    """'key: old -> new, ...' for `config_changes`' dict, the first `most` of them and how many more."""
    def show(v):
        return v if v is ABSENT else repr(v)

    parts = [f"{k}: {show(old)} -> {show(new)}" for k, (old, new) in list(changes.items())[:most]]
    if len(changes) > most:
        parts.append(f"and {len(changes) - most} more")
    return ", ".join(parts)
