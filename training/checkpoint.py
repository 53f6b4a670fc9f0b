"""The checkpoint layout of a run folder: the one module that writes, finds and reads checkpoints.

    RUN_DIR/final.json      written when the run reaches its last step (names the final checkpoint)
    RUN_DIR/checkpoints/step_00001000/
        model.safetensors   full inference weights (catseg.save_weights; gathered under DeepSpeed ZeRO)
        meta.json           {"step", "preset", "mlflow_run_id", "mlflow_tracking_uri", "world_size",
                             "shards_digest", "created"}
        state/              accelerator.save_state output (optimizer, scaler, RNG; model shards under DeepSpeed)
                            plus train_rank<R>.json per process (step, schedule, data-stream position)

A checkpoint is written as checkpoints/.tmp-step_XXXXXXXX and renamed when every process has finished, so a
folder named step_* is always complete. Evaluation and the service use list_checkpoints / latest_checkpoint /
read_meta and the model.safetensors file only.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path

from data_prep.shards import write_json_atomic

CHECKPOINTS = "checkpoints"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
STATE_DIR = "state"
FINAL_FILE = "final.json"  # in the run folder once training reached its last step: {"step", "checkpoint", "weights"}
_NAME = re.compile(r"^step_(\d{8,})$")
log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder and what to do."""


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint after ``step`` optimizer steps."""
    return f"step_{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run folder, sorted by step (oldest first)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and child.is_dir() and (child / META_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run folder, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_meta(ckpt_dir: str | os.PathLike) -> dict:
    """The meta.json of a checkpoint folder (step, preset, MLflow run id and tracking URI, creation time)."""
    path = Path(ckpt_dir) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir} is not a complete checkpoint: {META_FILE} is missing; use a step_* folder "
                              f"from {Path(ckpt_dir).parent}")
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    missing = [k for k in ("step", "preset") if k not in meta]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}")
    return meta


def record_mlflow_run(run_dir: str | os.PathLike, run_id: str, tracking_uri: str) -> list[Path]:
    """Name the MLflow run in the meta.json of the run folder's checkpoints that name none (written while the
    tracking store was down, before the run could open); returns them. The evaluation service logs a checkpoint's
    scores into the run its meta.json names."""
    named = []
    for ckpt_dir in list_checkpoints(run_dir):
        try:
            meta = read_meta(ckpt_dir)
        except CheckpointError:
            continue
        if not meta.get("mlflow_run_id"):
            try:
                write_json_atomic(ckpt_dir / META_FILE, dict(meta, mlflow_run_id=run_id,
                                                             mlflow_tracking_uri=tracking_uri))
            except OSError as e:  # removed meanwhile, say; naming the run must not stop training
                log.warning("could not name MLflow run %s in %s: %s", run_id, ckpt_dir / META_FILE, e)
                continue
            named.append(ckpt_dir)
    return named


def weights_path(ckpt_dir: str | os.PathLike) -> Path:
    """The inference weights (safetensors) of a checkpoint."""
    return Path(ckpt_dir) / WEIGHTS_FILE


def write_final(run_dir: str | os.PathLike, ckpt_dir: Path) -> None:
    """Mark a run finished, naming its final checkpoint and weights."""
    step = read_meta(ckpt_dir)["step"]
    write_json_atomic(Path(run_dir) / FINAL_FILE, {"step": step, "checkpoint": ckpt_dir.name,
                                                   "weights": str(weights_path(ckpt_dir))})


def read_final(run_dir: str | os.PathLike) -> dict | None:
    """The final.json of a finished run, or None while it has not finished."""
    path = Path(run_dir) / FINAL_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def restore_replaced(run_dir: str | os.PathLike) -> None:
    """Put back a checkpoint that a save of the same step had moved aside (``.old-step_N``) when the run was killed
    before the new one took its name. Every process may call this at once: the rename happens once."""
    root = Path(run_dir) / CHECKPOINTS
    for child in root.glob(".old-*") if root.is_dir() else []:
        final = root / child.name[len(".old-"):]
        if not final.exists():
            try:
                os.replace(child, final)
            except FileNotFoundError:  # another process put it back first
                pass


def resolve_resume(run_dir: str | os.PathLike, resume: str) -> Path | None:
    """Turn --resume (auto, none, or a checkpoint folder) into the checkpoint to continue from."""
    restore_replaced(run_dir)
    if resume in ("", "none"):
        earlier = latest_checkpoint(run_dir)
        if earlier is not None:  # its higher steps would outlive the new run's checkpoints and be taken as final
            raise CheckpointError(
                f"--resume none starts a new run, but run folder {run_dir} holds checkpoints of an earlier one (newest "
                f"{earlier.name}); continue it with --resume auto, or give a new --run-dir (or delete {earlier.parent})")
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    step = read_meta(path)["step"]
    later = [p.name for p in list_checkpoints(run_dir) if read_meta(p)["step"] > step]
    if later:  # they would outlive the resumed run's checkpoints and win the next --resume auto
        raise CheckpointError(
            f"resuming {path} (step {step}) in run folder {run_dir}, which holds later checkpoints ({', '.join(later)}); "
            f"move those out of {Path(run_dir) / CHECKPOINTS} to go back to step {step}, or resume in a new --run-dir")
    return path


def check_compatible(ckpt_dir: Path, preset: str, world_size: int | None = None, deepspeed: bool = False) -> dict:
    """Read a checkpoint's meta and refuse one written for another model preset, or by a process count this run
    cannot continue: more processes than wrote it (the new ones have no state), or any other count under DeepSpeed
    (its optimizer state is sharded per process). Every process checks, before anything is written."""
    meta = read_meta(ckpt_dir)
    if meta["preset"] != preset:
        raise CheckpointError(f"checkpoint {ckpt_dir} holds preset {meta['preset']!r} but this run builds "
                              f"{preset!r}; resume with the config that made it or use another --run-dir")
    saved = meta.get("world_size")
    if world_size is not None and saved is not None and saved != world_size and (deepspeed or world_size > saved):
        why = ("its DeepSpeed optimizer state is split over those processes" if deepspeed else
               f"processes {saved}..{world_size - 1} would have no training state")
        raise CheckpointError(f"checkpoint {ckpt_dir} was written by {saved} processes and this run has {world_size}: "
                              f"{why}. Resume with {saved} processes, or start a new run from its weights with --set "
                              f"model.pretrained={ckpt_dir / WEIGHTS_FILE} and another --run-dir")
    return meta


def remove_partial(run_dir: str | os.PathLike) -> None:
    """Delete checkpoint folders left half-written by a killed run (main process only)."""
    root = Path(run_dir) / CHECKPOINTS
    restore_replaced(run_dir)
    for child in root.glob(".old-*") if root.is_dir() else []:  # replaced by a save of the same step, now in place
        shutil.rmtree(child, ignore_errors=True)
    for child in root.glob(".tmp-*") if root.is_dir() else []:
        shutil.rmtree(child, ignore_errors=True)
    for child in root.glob(".del-*") if root.is_dir() else []:
        shutil.rmtree(child, ignore_errors=True)


def prune(run_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints; return the deleted folders."""
    old = list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []
    for path in old:
        # Rename first: a folder that is half deleted must never look like a complete checkpoint.
        doomed = path.with_name(f".del-{path.name}")
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return old


def uses_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _zero3(accelerator) -> bool:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return uses_deepspeed(accelerator) and plugin is not None and plugin.zero_stage == 3


def unwrap(model):
    """The CatSeg module inside DDP / DeepSpeed / torch.compile wrappers."""
    # accelerator.unwrap_model imports DeepSpeed (seconds per process) even when it is not in use.
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)


@contextlib.contextmanager
def whole_parameters(accelerator, module):
    """Within it, `module`'s parameters are whole on every process (collective): ZeRO-3 keeps a shard of each
    parameter per process and gathers them only for its own forward and backward. Elsewhere it does nothing."""
    if not _zero3(accelerator):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        yield


def export_weights(accelerator, model, path: Path) -> None:
    """Write the full model weights as safetensors from the main process (gathering ZeRO-3 partitions first)."""
    import catseg

    unwrapped = unwrap(model)
    with whole_parameters(accelerator, unwrapped):
        if accelerator.is_main_process:
            catseg.save_weights(unwrapped, path)


def _deepspeed_state_types() -> list:
    """The DeepSpeed classes its ZeRO optimizer states pickle (loss scaler, stage enum, fragment addresses)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [DynamicLossScaler, LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads():
    """Every torch.load in the block unpickles with weights_only=True: tensors, containers and the DeepSpeed state
    classes only, never arbitrary code. DeepSpeed's checkpoint engine asks for weights_only=False when it reads its
    model and optimizer states; a checkpoint folder from elsewhere could otherwise run code on every rank."""
    import torch

    real_load, allowed = torch.load, _deepspeed_state_types()

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            return real_load(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real_load


class Checkpointer:
    """Saves and restores complete training checkpoints through Accelerate, with the layout above.

    Outside DeepSpeed the model's weights are stored once, as model.safetensors, and not again inside state/.
    """

    def __init__(self, accelerator, model, run_dir: str | os.PathLike, keep_last: int):
        self.accelerator, self.model, self.run_dir, self.keep_last = accelerator, model, Path(run_dir), keep_last
        self._loading_from: Path | None = None
        if not uses_deepspeed(accelerator):
            accelerator.register_save_state_pre_hook(self._skip_model_weights)
            accelerator.register_load_state_pre_hook(self._load_model_weights)

    def _skip_model_weights(self, models, weights, output_dir) -> None:
        weights.clear()

    def _load_model_weights(self, models, input_dir) -> None:
        import catseg

        catseg.load_weights(unwrap(models[0]), self._loading_from / WEIGHTS_FILE)
        models.clear()

    def save(self, step: int, train_state: dict, meta: dict) -> Path:
        """Write checkpoint ``step`` from every process (collective); return its folder."""
        acc = self.accelerator
        root = self.run_dir / CHECKPOINTS
        final = root / checkpoint_name(step)
        tmp = root / f".tmp-{final.name}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / STATE_DIR).mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp / STATE_DIR))
        write_json_atomic(tmp / STATE_DIR / f"train_rank{acc.process_index}.json", train_state)
        export_weights(acc, self.model, tmp / WEIGHTS_FILE)
        acc.wait_for_everyone()
        if acc.is_main_process:
            write_json_atomic(tmp / META_FILE, dict(meta, step=step, created=datetime.datetime.now(
                datetime.timezone.utc).isoformat(timespec="seconds")))
            replaced = root / f".old-{final.name}"
            if final.exists():  # the same step saved again (a signal right after a periodic save)
                os.replace(final, replaced)
            os.replace(tmp, final)  # only then is the replaced one deleted: a kill in between loses neither
            shutil.rmtree(replaced, ignore_errors=True)
            prune(self.run_dir, self.keep_last)
        acc.wait_for_everyone()
        return final

    def load(self, ckpt_dir: Path) -> dict:
        """Restore model, optimizer, scaler and RNG from a checkpoint; return this process's train state."""
        acc = self.accelerator
        state_file = ckpt_dir / STATE_DIR / f"train_rank{acc.process_index}.json"
        if not state_file.is_file():
            have = sorted(p.name for p in (ckpt_dir / STATE_DIR).glob("train_rank*.json"))
            if not have:
                raise CheckpointError(f"{ckpt_dir} holds no training state ({ckpt_dir / STATE_DIR} has no "
                                      f"train_rank*.json), so it cannot be resumed; start a new run from its weights "
                                      f"with --set model.pretrained={ckpt_dir / WEIGHTS_FILE}")
            raise CheckpointError(f"{ckpt_dir} has no state for process {acc.process_index} (has {', '.join(have)}); "
                                  f"resume with the process count that wrote it ({len(have)})")
        self._loading_from = ckpt_dir
        try:
            with weights_only_loads():
                acc.load_state(str(ckpt_dir / STATE_DIR))
        except ValueError as error:  # torch's optimizer refuses a state with other parameter groups
            if "parameter group" not in str(error):
                raise
            raise CheckpointError(
                f"{ckpt_dir}: its optimizer state has other parameter groups than this version builds ({error}). A "
                f"checkpoint from before the weight-decay groups changed (normalisation layers only) resumes with the "
                f"version that wrote it; or start a new run from its weights with --set "
                f"model.pretrained={ckpt_dir / WEIGHTS_FILE} and another --run-dir") from None
        except pickle.UnpicklingError as error:
            found = re.search(r"GLOBAL (\S+)", str(error))
            raise CheckpointError(f"{ckpt_dir / STATE_DIR} holds pickled objects other than tensors and training state "
                                  f"({found.group(1) if found else 'an unsupported type'}); it was not loaded. Resume "
                                  f"only checkpoints written by catseg training") from None
        except (RuntimeError, OSError, EOFError, KeyError) as error:  # a truncated or missing state file
            raise CheckpointError(f"{ckpt_dir / STATE_DIR} cannot be read ({type(error).__name__}: {error}); the "
                                  f"checkpoint is damaged or incomplete. Resume from an earlier one (--resume PATH) "
                                  f"or start a new run from its weights with --set "
                                  f"model.pretrained={ckpt_dir / WEIGHTS_FILE}") from error
        state = json.loads(state_file.read_text())
        # The highest data round any process used: a run continued with another loader layout restarts every
        # stream past it (StreamState.load_state_dict), since a stream id may have been another process's.
        state["data"]["last_round_any_process"] = last_data_round(ckpt_dir)
        return state


def last_data_round(ckpt_dir: Path) -> int:
    """The highest data round any process of checkpoint `ckpt_dir` had reached (its train_rank*.json files)."""
    return max([p[0] for f in (Path(ckpt_dir) / STATE_DIR).glob("train_rank*.json")
                for p in json.loads(f.read_text()).get("data", {}).get("positions", {}).values()] or [0])
