"""Train CAT-Seg on data_prep shards with Accelerate (one CPU core up to multi-node DeepSpeed ZeRO).

Usage (the launch config alone picks DDP, DeepSpeed ZeRO-2/3 or CPU):

    accelerate launch --config_file launch/zero2.yaml training/train.py [--config configs/<run>.yaml]
        [--set train.steps=500 data.root=DIR ...] [--run-dir DIR] [--resume auto|none|CHECKPOINT]

Accelerate takes `--config_file` (not `--config`). Without --config the ViT-B run config is used. The run stops
cleanly on SIGTERM, SIGUSR1 or a Ctrl-C after writing a checkpoint (a second Ctrl-C stops it at once);
`--resume auto` (the default) continues from the newest complete checkpoint of the run folder.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script by `accelerate launch training/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from training import checkpoint as ckpt
from training.config import (ConfigError, RunConfig, describe_changes, load_config, replace_config,
                             trains_differently)
from training.criterion import PixelBCECriterion
from training.dist import world_info_from_env
from training.data import AugmentConfig, DataError, ShardStream, StreamState, make_loader, open_shards
from training.optim import LRSchedule, build_optimizer
from training.tracking import (LocalLogger, MetricLogger, MLflowLogger, MultiLogger, default_tracking_uri,
                               is_moved_local_store, local_store_uri)

log = logging.getLogger("catseg.train")
REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "catseg_vitb16_r101.yaml"
# optimizer group entries that come from the run config (optim.*), not from a checkpoint's optimizer state
CONFIGURED_HYPERPARAMETERS = ("base_lr", "weight_decay", "betas", "eps")


class StopRequest:
    """Turns SIGTERM / SIGUSR1 (the scheduler's warning before a job ends) and, while the loop runs, a Ctrl-C
    (SIGINT) into a flag the loop checks: the run then writes a checkpoint and stops.

    After that Ctrl-C, a second one or a SIGTERM stops the process at once (KeyboardInterrupt): `accelerate launch`
    answers a second Ctrl-C by sending its processes SIGTERM (and SIGKILL 30 s later). A SIGINT within SAME_PRESS_S
    of the first is the same press (a launcher may pass on a Ctrl-C that the terminal sent its processes too).
    Outside the loop (set-up, the final export) Ctrl-C stops at once.
    """

    SAME_PRESS_S = 1.0

    def __init__(self):
        self.signal: int | None = None
        self.first_interrupt: float | None = None
        self.armed = False  # set while the loop runs: only then can a Ctrl-C end with a checkpoint
        self.clock = time.monotonic
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        now = self.clock()
        if signum == signal.SIGINT and not self.armed:
            raise KeyboardInterrupt
        if self.first_interrupt is not None and (
                signum == signal.SIGTERM or signum == signal.SIGINT and now - self.first_interrupt > self.SAME_PRESS_S):
            raise KeyboardInterrupt
        if signum == signal.SIGINT:
            if self.first_interrupt is not None:
                return
            self.first_interrupt = now
        if self.signal is None:
            self.signal = signum
        if signum == signal.SIGINT and world_info_from_env()[0] == 0:  # one line for a multi-process job
            try:  # a raw write: the handler may run while the progress bar is writing to sys.stderr
                os.write(2, b"\ncatseg train: Ctrl-C: the run writes a checkpoint and stops (press Ctrl-C again to "
                            b"stop at once, without one)\n")
            except OSError:  # stderr gone (a pipe whose reader the Ctrl-C ended): the stop goes on regardless
                pass


def set_by_launcher(name: str) -> bool:
    """Whether environment variable `name` is set here but not in the process that started this one (a launcher
    set it, not the shell). Where the parent's environment cannot be read, whether it is set here."""
    if not os.environ.get(name):
        return False
    try:
        parent = Path(f"/proc/{os.getppid()}/environ").read_bytes().split(b"\0")
    except OSError:
        return True
    return not any(entry.startswith(name.encode() + b"=") for entry in parent)


def make_accelerator(cfg: RunConfig):
    """An Accelerator for this run: gloo on CPU, the launch config's distributed mode and precision otherwise."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, parse_flag_from_env

    ds_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if ds_file and ds_file != "none" and not Path(ds_file).is_file():
        # launch/zero*.yaml name their JSON relative to the repository; allow launching from elsewhere.
        if (REPO / ds_file).is_file():
            os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(REPO / ds_file)
        else:
            raise ConfigError(f"DeepSpeed config {ds_file} (from the accelerate launch config) not found; launch from "
                              f"the repository root or give an absolute deepspeed_config_file")
    forced_cpu, deepspeed = parse_flag_from_env("ACCELERATE_USE_CPU"), parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")
    if forced_cpu and deepspeed:  # accelerate would quietly run DDP instead
        raise ConfigError("the accelerate launch config asks for DeepSpeed, but ACCELERATE_USE_CPU is set in the "
                          "environment, which makes accelerate leave DeepSpeed out and run plain DDP; unset it to run "
                          "DeepSpeed (on a machine without a GPU it uses the CPU by itself), or launch with "
                          "launch/cpu.yaml for DDP on CPU")
    if forced_cpu and world_info_from_env()[2] == 1 and set_by_launcher("MASTER_PORT"):
        # what `accelerate launch --cpu --num_processes N` leaves behind: it sets the rendezvous, then starts one process
        log.warning("one training process, with ACCELERATE_USE_CPU and MASTER_PORT set: `accelerate launch --cpu "
                    "--num_processes N` (or use_cpu: true) starts ONE process whatever N says; for N CPU processes "
                    "use ACCELERATE_USE_CPU=true accelerate launch --config_file launch/cpu.yaml --num_processes N")
    handlers = []
    on_cpu = not torch.cuda.is_available() or forced_cpu
    if on_cpu and world_info_from_env()[2] > 1:  # a backend given to a single process would wait for a group
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    if not deepspeed:
        return Accelerator(mixed_precision=cfg.train.mixed_precision or None,
                           gradient_accumulation_steps=cfg.train.grad_accum, kwargs_handlers=handlers)
    precision = deepspeed_precision(cfg)
    accelerator = Accelerator(gradient_accumulation_steps=cfg.train.grad_accum, kwargs_handlers=handlers)
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    for key in ("bf16", "fp16"):
        if (ds.get(key) or {}).get("enabled") is True:
            where = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or "the DeepSpeed config"
            raise ConfigError(f"{where}: {key}.enabled is true, which makes "
                              f"DeepSpeed store the model's weights in {key} (the model trains in fp32 weights under "
                              f"autocast); set it to \"auto\" and choose the precision with train.mixed_precision or "
                              f"\"torch_autocast\"")
    if precision is not None:
        ds["torch_autocast"] = {**(ds.get("torch_autocast") or {}), "enabled": precision == "bf16",
                                "dtype": "bfloat16"}
    return accelerator


def training_precision(accelerator) -> str:
    """The precision the forward runs in: "bf16" (autocast), "fp16" or "no" (fp32)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:
        return "bf16" if (plugin.deepspeed_config.get("torch_autocast") or {}).get("enabled") else "no"
    return accelerator.mixed_precision


def deepspeed_precision(cfg: RunConfig) -> str | None:
    """Under DeepSpeed the model trains as it does without it: fp32 weights, the forward under torch's bf16
    autocast, which DeepSpeed runs from its config's "torch_autocast" (its own "bf16" mode would store the weights in
    bf16, and accelerate autocasts nothing for it). The precision the run asks for ("bf16" or "no"; None: the
    DeepSpeed config's "torch_autocast" decides), taken out of accelerate's way: its launcher refuses a
    mixed_precision of the launch YAML beside a DeepSpeed config file, and a --mixed_precision bf16 would turn on
    DeepSpeed's bf16 mode."""
    fields = [f for f in os.environ.get("ACCELERATE_CONFIG_DS_FIELDS", "").split(",") if f]
    launch = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    explicit = "mixed_precision" in fields or launch != "no"  # from the launch YAML, or --mixed_precision bf16/fp16
    os.environ["ACCELERATE_CONFIG_DS_FIELDS"] = ",".join(f for f in fields if f != "mixed_precision")
    os.environ["ACCELERATE_MIXED_PRECISION"] = "no"
    precision = cfg.train.mixed_precision or (launch if explicit else None)
    if precision == "fp16":
        raise ConfigError("fp16 under DeepSpeed is not supported (no loss scaling for the autocast forward); use bf16 "
                          "(train.mixed_precision: bf16) or fp32 (no)")
    return precision


def micro_batch_size(cfg: RunConfig, num_processes: int) -> int:
    """Samples per process per forward pass, from the global batch; refuses a batch that does not split evenly."""
    parts = num_processes * cfg.train.grad_accum
    if cfg.train.batch_size % parts:
        raise ConfigError(f"train.batch_size = {cfg.train.batch_size} does not split over {num_processes} processes x "
                          f"{cfg.train.grad_accum} accumulation steps; use a multiple of {parts}")
    return cfg.train.batch_size // parts


def configure_deepspeed(accelerator, cfg: RunConfig, micro: int) -> None:
    """Fill the DeepSpeed config's batch and clipping entries from the run config (before prepare)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = cfg.train.grad_accum
    ds["train_batch_size"] = cfg.train.batch_size
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = cfg.optim.grad_clip


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory allocated by tensors, or the process's peak RSS on CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def freeze_unused(model, image_size: int, class_names: list[str], device) -> list[str]:
    """Freeze trainable parameters that get no gradient (found by one probe step); return their names.

    DDP waits for a gradient of every trainable parameter, so one that the forward never uses stops training
    (for example the last CLIP block's query projection, which the dense last block skips). A single process
    would never update such a parameter either, so freezing it changes nothing numerically.
    """
    buffers = {k: v.clone() for k, v in model.named_buffers()}  # the probe must not move BatchNorm statistics
    with torch.random.fork_rng(devices=[]):
        images = torch.rand(1, 3, image_size, image_size, device=device)
        model(images, class_names).float().mean().backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for name, param in model.named_parameters():
        param.grad = None
        if name in unused:
            param.requires_grad_(False)
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
    if unused:
        log.warning("freezing %d trainable parameter(s) that receive no gradient: %s", len(unused),
                    ", ".join(unused[:5]) + (" ..." if len(unused) > 5 else ""))
    return unused


def compile_summary() -> str:
    """How torch.compile split the training step: graphs made and graph breaks (each break is a Python detour
    between two compiled graphs), with the most frequent break reasons."""
    from torch._dynamo.utils import counters

    breaks = counters["graph_break"]
    text = (f"catseg train: torch.compile made {counters['stats']['unique_graphs']} graph(s) with "
            f"{sum(breaks.values())} graph break(s)")
    return text + "".join(f"\n  {n} x {reason}" for reason, n in breaks.most_common(5))


class Trainer:
    """Holds the run's state; `train()` is the loop."""

    def __init__(self, cfg: RunConfig, resume: str = "auto"):
        import catseg
        from catseg import inference

        self.cfg, self.run_dir = cfg, cfg.run_dir()
        self.stop = StopRequest()  # from here on a signal means "checkpoint and stop", not "die"
        self.shards = open_shards(cfg.data.root)  # fail on missing data before any process group starts
        self.acc = acc = make_accelerator(cfg)
        self.micro = micro_batch_size(cfg, acc.num_processes)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # Training shapes never change, so cuDNN may time its convolution algorithms once per shape and keep the
        # fastest instead of guessing (its guess for the cost embedding's weight gradient was one 14 ms kernel of a
        # 170 ms ViT-B step on an H200). Timed choices can differ between runs, hence not when deterministic.
        torch.backends.cudnn.benchmark = not cfg.train.deterministic
        from accelerate.utils import set_seed

        set_seed(cfg.train.seed)
        self.resume_from = ckpt.resolve_resume(self.run_dir, resume)
        self.chosen_checkpoint = resume not in ("auto", "", "none")  # --resume PATH, not the newest by default
        self.meta = ckpt.check_compatible(self.resume_from, cfg.model.preset, acc.num_processes,
                                          ckpt.uses_deepspeed(acc)) if self.resume_from else {}

        pretrained = cfg.model.pretrained
        model = catseg.create_model(cfg.model.preset, pretrained=pretrained if isinstance(pretrained, bool) else
                                    Path(pretrained), **cfg.model.overrides,
                                    **({"weights_dir": cfg.model.weights_dir} if cfg.model.weights_dir else {}))
        model.set_clip_trainable(cfg.model.clip_finetune or model.config.finetune)
        model.set_grad_checkpointing(cfg.model.activation_checkpointing)
        model.check_inputs = False  # the loader only produces [0, 1] images; skip the per-step host sync
        self.class_names = self.shards.class_names
        self.image_size = cfg.data.crop_size or model.image_size
        if self.image_size != model.image_size:
            raise ConfigError(f"data.crop_size = {cfg.data.crop_size} but preset {cfg.model.preset!r} trains on "
                              f"{model.image_size} px crops; use {model.image_size} or 0")
        model.to(acc.device).train()
        if acc.num_processes > 1:
            freeze_unused(model, model.image_size, self.class_names, acc.device)
        if cfg.train.channels_last:
            inference.channels_last(model)
        inference.stencil_upsampling(model, cfg.train.stencil_upsampling)
        if cfg.train.compile:  # in place: parameter names, checkpoints and the optimizer groups are unchanged
            kwargs = {"mode": cfg.train.compile_mode} if cfg.train.compile_mode else {}
            if cfg.train.compile_scope == "model":
                # One graph for the whole forward (CLIP, backbone, aggregation, decoder) and one for its backward:
                # the ViT-B step's ~2550 eager operators become ~1000 kernel launches (counted by
                # benchmarks/count_compiled_launches.py), autocast's weight casts folded into them.
                model.compile(**kwargs)
            else:
                inference.compile_aggregation(model, **kwargs)
        with torch.no_grad():
            model.text_embeddings(self.class_names)  # the training vocabulary, encoded once and cached in the model
        optimizer = build_optimizer(model, cfg.optim)
        configure_deepspeed(acc, cfg, self.micro)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        # Each process its own random stream from here on (seed + process index), as the release's detectron2 seeds
        # them: with one seed, a Swin guidance backbone's stochastic depth dropped the same blocks for every image
        # of a step. The weights were made with the shared seed above (and DDP / DeepSpeed start from rank 0's).
        set_seed(cfg.train.seed, device_specific=True)
        self.schedule = LRSchedule(self.optimizer, cfg.train.steps, cfg.schedule)
        self.criterion = PixelBCECriterion(self.shards.ignore_index, cfg.loss.mask_ignore)
        self.checkpointer = ckpt.Checkpointer(acc, self.model, self.run_dir, cfg.train.keep_last)
        self.streams = StreamState(cfg.data.workers, acc.process_index, acc.num_processes)
        self.step = 0
        self.window = Window(acc.device)
        if self.resume_from is not None:
            # the optimizer state brings the rates it was saved with; a run continued with other ones uses those
            configured = [{k: group[k] for k in CONFIGURED_HYPERPARAMETERS} for group in self.optimizer.param_groups]
            state = self.checkpointer.load(self.resume_from)
            for group, values in zip(self.optimizer.param_groups, configured):
                group.update(values)
            self.load_state_dict(state)
            with ckpt.whole_parameters(acc, self.unwrapped().clip):  # called outside the engine's forward
                self.unwrapped().text_embeddings(self.class_names)
        self.logger = self.open_logger()

    def unwrapped(self):
        return ckpt.unwrap(self.model)

    def state_dict(self) -> dict:
        """This process's loop state (model and optimizer are saved by Accelerate)."""
        return {"step": self.step, "schedule": self.schedule.state_dict(), "data": self.streams.state_dict(),
                "window": self.window.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue the loop state of a checkpoint."""
        self.step = int(state["step"])
        self.schedule.load_state_dict(state["schedule"])
        self.streams.load_state_dict(state["data"])
        self.window.load_state_dict(state.get("window", {}))  # steps since the last log, so the next log spans them

    def open_logger(self) -> MetricLogger:
        """Local metrics file plus MLflow on the main process (continuing the checkpoint's MLflow run)."""
        if not self.acc.is_main_process:
            return MetricLogger()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_partial(self.run_dir)
        if self.step < self.cfg.train.steps:  # a finished run extended to more steps is unfinished again
            (self.run_dir / ckpt.FINAL_FILE).unlink(missing_ok=True)
        config = self.run_dir / "config.yaml"
        kept, changes = replace_config(self.cfg, config, self.step)
        if kept is not None:
            print(f"catseg train: {'continuing' if self.step else 'starting'} at step {self.step} with another config "
                  f"than {config}'s ({describe_changes(changes)}); the earlier one is kept as {kept.name}", flush=True)
        t = self.cfg.tracking
        uri = default_tracking_uri(t.uri, self.run_dir)
        saved = self.meta.get("mlflow_tracking_uri")
        # the same store, or the run folder's own store moved (or copied) along with the folder
        same = saved == uri or (uri == local_store_uri(self.run_dir) and is_moved_local_store(saved, self.run_dir))
        run_id = self.meta.get("mlflow_run_id") if same else None
        # A run continued with settings that change what is trained, or from a chosen checkpoint, is another training
        # from there on; when its MLflow run already holds later steps, it gets a new MLflow run (MLflow cannot
        # remove those points).
        # Shards moved elsewhere (dataset.json and sizes.json as the checkpoint saw them) feed the same stream.
        moved = self.meta.get("shards_digest") == self.shards.digest
        branch = trains_differently({k: v for k, v in changes.items() if not (moved and k == "data.root")})
        branch = branch or self.chosen_checkpoint
        mlflow = MLflowLogger(uri, self.run_dir, t.experiment, t.run_name or self.run_dir.name, run_id, t.timeout_s,
                              from_step=self.step, branch=branch, artifacts=[config],
                              params=self.cfg.flat() | {"world_size": self.acc.num_processes, "micro_batch": self.micro,
                                                        "precision": training_precision(self.acc)})
        logger = MultiLogger(LocalLogger(self.run_dir, from_step=self.step), mlflow)
        if run_id is not None and kept is not None:  # a continued run's params stay those it started with; the
            logger.log_artifact(config, f"config_from_step_{self.step:08d}")  # config it continues with beside
        return logger

    def make_loader(self):
        cfg = self.cfg
        aug = AugmentConfig(self.image_size, cfg.data.short_side or self.image_size, cfg.data.scale_range,
                            cfg.data.hflip, cfg.data.jitter, self.shards.ignore_index)
        stream = ShardStream(self.shards, aug, self.micro, cfg.train.seed, self.acc.process_index,
                             self.acc.num_processes, cfg.data.workers, cfg.data.shuffle_buffer,
                             self.streams.positions, self.streams.rotation)
        return make_loader(stream, cfg.data.workers, pin_memory=self.acc.device.type == "cuda")

    def train_step(self, batches) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """One optimizer step over grad_accum micro-batches; returns (summed loss, grad norm, data wait s)."""
        total, wait, norm = torch.zeros((), device=self.acc.device), 0.0, None
        for _ in range(self.cfg.train.grad_accum):
            t0 = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - t0
            self.streams.update(batch)
            images = batch["images"].to(self.acc.device, non_blocking=True).float().div_(255)
            labels = batch["labels"].to(self.acc.device, non_blocking=True).long()
            with self.acc.accumulate(self.model):
                loss = self.criterion(self.model(images, self.class_names), labels)
                self.acc.backward(loss)
                if self.acc.sync_gradients:
                    norm = self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip or float("inf"))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            total += loss.detach()
        self.schedule.step()
        return total / self.cfg.train.grad_accum, norm, wait

    def train(self) -> int:
        """Run the loop, then finish; returns the process exit code. An error or an interrupt ends the MLflow run as
        FAILED or KILLED (not RUNNING for ever) and is raised on."""
        try:
            return self.finish(*self.loop())
        except BaseException as error:
            self.logger.close("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
            self.name_mlflow_run()  # the close may have opened a run the store had been down for
            raise

    def loop(self) -> tuple[float, int, "Window"]:
        """The loop: step, maybe log, maybe checkpoint, stop on a signal; returns (seconds, steps done, window)."""
        cfg, acc = self.cfg, self.acc
        batches = iter(self.make_loader())
        window = self.window
        window.start_clock()
        start_step, started = self.step, time.perf_counter()
        bar = progress_bar(acc.is_main_process, self.step, cfg.train.steps)
        self.stop.armed = True
        try:
            while self.step < cfg.train.steps:
                loss, norm, wait = self.train_step(batches)
                self.step += 1
                window.add(loss, norm, wait)
                if self.log_step():
                    metrics = self.log_metrics(window)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['images_per_s']:.1f}")
                bar.update(1)
                stop = self.stop_requested()
                if stop or self.step % cfg.train.ckpt_every == 0 or self.step == cfg.train.steps:
                    self.save_checkpoint()
                if stop:
                    break
        finally:
            self.stop.armed = False
            bar.close()
            # Shut the loader workers down now, also on an error: they ignore SIGTERM (the training process handles
            # preemption), so the interpreter's exit, which terminates and then joins them, would wait for ever.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            del batches
        return time.perf_counter() - started, self.step - start_step, window

    def log_step(self) -> bool:
        """Whether the step just done logs its metrics: every train.log_every steps, and the last one."""
        return self.step % self.cfg.train.log_every == 0 or self.step == self.cfg.train.steps

    def stop_requested(self) -> bool:
        """True on every process once any process got SIGTERM/SIGUSR1 (agreed, so all save together).

        With several processes they agree at log steps only: the reduction makes the host wait for the device, which
        at every step would keep the host from queueing the next step while the device finishes this one.
        """
        local = self.stop.signal is not None
        if self.acc.num_processes == 1:
            return local
        if not self.log_step():
            return False
        flag = self.acc.reduce(torch.tensor(float(local), device=self.acc.device), reduction="sum")
        return bool(flag.item() > 0)

    def log_metrics(self, window: "Window") -> dict:
        local = torch.stack([window.loss_sum, torch.tensor(float(self.streams.corrupt), device=self.acc.device)])
        loss_sum, corrupt = self.acc.reduce(local, "sum").tolist()
        steps = window.steps
        metrics = window.flush(self.cfg.train.batch_size) | {
            "loss": loss_sum / max(1, steps) / self.acc.num_processes,
            "corrupt_samples": corrupt, "peak_memory_mb": peak_memory_mb(self.acc.device),
            **{f"lr/{k}": v for k, v in self.schedule.last_lrs().items()}}
        self.last_metrics = metrics
        self.logger.log_metrics(metrics, self.step)
        return metrics

    def save_checkpoint(self) -> Path:
        meta = {"preset": self.cfg.model.preset, "mlflow_run_id": self.logger.run_id,
                "mlflow_tracking_uri": self.logger.tracking_uri, "world_size": self.acc.num_processes,
                "shards_digest": self.shards.digest}
        saved = self.checkpointer.save(self.step, self.state_dict(), meta)
        self.name_mlflow_run()
        return saved

    def name_mlflow_run(self) -> None:
        """Once the MLflow run is open, name it in the checkpoints written while the store was down (main process)."""
        if self.acc.is_main_process and self.logger.run_id is not None:
            try:
                ckpt.record_mlflow_run(self.run_dir, self.logger.run_id, self.logger.tracking_uri)
            except Exception as e:  # a checkpoint folder removed meanwhile, say: this must not stop training
                log.warning("could not name MLflow run %s in the checkpoints of %s: %s", self.logger.run_id,
                            self.run_dir, e)

    def finish(self, elapsed: float, steps: int, window: "Window") -> int:
        """Export the final weights, close tracking and print the one-line summary."""
        done = self.step >= self.cfg.train.steps
        final = ckpt.latest_checkpoint(self.run_dir)
        if self.acc.is_main_process and done and final is not None:
            ckpt.write_final(self.run_dir, final)
            self.logger.log_artifact(ckpt.weights_path(final))
        self.logger.close("FINISHED" if done else "KILLED")
        self.name_mlflow_run()  # closing is the store's last chance to open the run
        if self.acc.is_main_process:
            rate = steps * self.cfg.train.batch_size / max(elapsed, 1e-9)
            loss = getattr(self, "last_metrics", {}).get("loss", float("nan"))
            how = "finished" if done else f"stopped by signal {self.stop.signal} at"
            print(f"catseg train: {how} step {self.step}/{self.cfg.train.steps} in {elapsed:.0f} s "
                  f"({rate:.1f} img/s, data wait {window.total_wait_fraction():.0%}), loss {loss:.4f}, "
                  f"{self.streams.corrupt} corrupt samples skipped here; checkpoint {final}; "
                  f"MLflow run {self.logger.run_id} at {self.logger.tracking_uri}"
                  + ("" if done else "; continue with --resume auto"), flush=True)
            if self.cfg.train.compile:
                print(compile_summary(), flush=True)
        self.acc.end_training()
        return 0


class Window:
    """Running sums between two log steps (loss stays on the device until logged). Throughput is wall time between
    flushes: steps only queue work on the device, and the flush, which reads the loss, waits for it."""

    def __init__(self, device):
        self.device = device
        self.loss_sum = torch.zeros((), device=device)
        self.steps, self.wait, self.norm = 0, 0.0, None  # steps: in loss_sum, some maybe before a resume
        self.timed = 0  # steps since the clock started or the last flush
        self.start_clock()
        self.all_wait = 0.0

    def start_clock(self) -> None:
        """Time throughput from now (the loop's start, not the set-up before it)."""
        self.started = self.since = time.perf_counter()

    def add(self, loss, norm, wait: float) -> None:
        self.loss_sum += loss
        self.steps += 1
        self.timed += 1
        self.wait += wait
        self.norm = norm if norm is not None else self.norm

    def state_dict(self) -> dict:
        """The loss summed since the last log and the steps it covers (read back from the device)."""
        return {"loss_sum": float(self.loss_sum), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        """Continue the sums of a checkpoint (an empty dict: nothing to continue)."""
        self.loss_sum = torch.tensor(float(state.get("loss_sum", 0.0)), device=self.device)
        self.steps = int(state.get("steps", 0))

    def flush(self, batch_size: int) -> dict:
        now = time.perf_counter()
        seconds = max(now - self.since, 1e-9)
        out = {"images_per_s": self.timed * batch_size / seconds, "data_wait_fraction": self.wait / seconds}
        if self.norm is not None:
            out["grad_norm"] = float(self.norm)
        self.all_wait += self.wait
        self.loss_sum = torch.zeros((), device=self.device)
        self.steps, self.timed, self.wait, self.since = 0, 0, 0.0, now
        return out

    def total_wait_fraction(self) -> float:
        return (self.all_wait + self.wait) / max(time.perf_counter() - self.started, 1e-9)


def progress_bar(enabled: bool, start: int, total: int):
    """A tqdm bar on the main process (a no-op elsewhere)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc="train", unit="step", dynamic_ncols=True,
                mininterval=1.0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="training/train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help=f"run config YAML (default {DEFAULT_CONFIG.relative_to(REPO)})")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config values, e.g. train.steps=50 data.root=/data/shards/coco_stuff/train "
                        "(may be given several times)")
    p.add_argument("--run-dir", default=None, help="run folder (default: train.run_dir, else runs/<config name>)")
    p.add_argument("--resume", default="auto", help="auto (newest checkpoint of the run folder, if any), none, or "
                   "a checkpoint folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse arguments, validate the config and data, train."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # DeepSpeed calls collectives that torch marks deprecated, once per step; the warnings say nothing to users.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    try:
        overrides = list(args.set) + ([f"train.run_dir={args.run_dir}"] if args.run_dir else [])
        cfg = load_config(args.config or DEFAULT_CONFIG, overrides)
        trainer = Trainer(cfg, args.resume)
    except (ConfigError, DataError, ckpt.CheckpointError) as e:
        print(f"catseg train: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:  # the model library's refusals (wrong preset in a weights file,
        print(f"catseg train: error: {e}", file=sys.stderr)  # unknown preset, a weights file that is not there)
        return 2
    except KeyboardInterrupt:
        print("catseg train: interrupted during set-up", file=sys.stderr)
        return 130
    try:
        return trainer.train()
    except DataError as e:  # e.g. a shard that turned out unreadable mid-run
        print(f"catseg train: error at step {trainer.step}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if trainer.acc.is_main_process:
            newest = ckpt.latest_checkpoint(trainer.run_dir)
            print(f"catseg train: interrupted at step {trainer.step}; "
                  + (f"the newest checkpoint is {newest} (continue with --resume auto)" if newest else
                     "no checkpoint written yet"), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
