"""End-to-end training through the real `accelerate launch` on CPU (gloo): DDP, DeepSpeed ZeRO-2, two "machines",
SIGTERM + resume equal to an uninterrupted run, a real MLflow server (also killed mid-run), the SLURM node wrapper.

Every run uses the tiny preset on synthetic shards written once per module."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_training_fixtures import (MLFLOW_SERVER_ENV, PYTHON, REPO, base_env, finish, free_port, launch_cmd, metrics,
                                    miou_on_val, mlflow_server_cmd, run, start, wait_for, write_synthetic)
from training.checkpoint import latest_checkpoint, list_checkpoints, read_meta

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("shards"), train=96, val=24, shard_size=24)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a SQLite store; yields (uri, restart function)."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    cmd = mlflow_server_cmd(root, port)
    uri = f"http://127.0.0.1:{port}"
    procs = []

    def up():
        procs.append(subprocess.Popen(cmd, cwd=root, stdout=open(root / "server.log", "a"), stderr=subprocess.STDOUT,
                                      start_new_session=True, env=dict(os.environ, **MLFLOW_SERVER_ENV)))
        wait_for(lambda: _healthy(uri), 60, "the MLflow server", procs[-1], root / "server.log")

    def down():
        os.killpg(procs[-1].pid, signal.SIGKILL)
        procs[-1].wait()

    up()
    yield uri, up, down
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _healthy(uri: str) -> bool:
    try:
        return urllib.request.urlopen(uri + "/health", timeout=1).status == 200
    except OSError:
        return False


def _args(shards: Path, run_dir: Path, *sets: str) -> list[str]:
    return ["--config", QUICKSTART, "--run-dir", str(run_dir), "--set", f"data.root={shards / 'train'}",
            "train.deterministic=true", "schedule.warmup_steps=2", *sets]


def _losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir)}


def test_ddp_two_processes_loss_decreases_tracked_in_mlflow(shards, mlflow_server, tmp_path):
    uri, _, _ = mlflow_server
    run_dir = tmp_path / "run"
    out = run(launch_cmd(_args(shards, run_dir, "train.steps=30", "train.log_every=5", f"tracking.uri={uri}",
                               "tracking.experiment=launch-test")), tmp_path / "log.txt")
    assert "catseg train: finished step 30/30" in out
    losses = _losses(run_dir)
    assert losses[30] < 0.75 * losses[5], losses

    from mlflow.tracking import MlflowClient

    meta = read_meta(latest_checkpoint(run_dir))
    assert meta["mlflow_tracking_uri"] == uri and meta["preset"] == "catseg_tiny" and meta["world_size"] == 2
    # each process draws its own random numbers (stochastic depth differs between the images of a step)
    states = [torch.load(latest_checkpoint(run_dir) / "state" / f"random_states_{i}.pkl", weights_only=False)
              for i in (0, 1)]  # (written by this test's own run)
    assert not torch.equal(states[0]["torch_manual_seed"], states[1]["torch_manual_seed"])
    client = MlflowClient(uri)
    mlrun = client.get_run(meta["mlflow_run_id"])
    assert mlrun.info.status == "FINISHED"
    params = mlrun.data.params
    assert params["model.preset"] == "catseg_tiny" and params["train.steps"] == "30" and params["world_size"] == "2"
    for key in ("loss", "lr/head", "lr/clip", "images_per_s", "data_wait_fraction", "peak_memory_mb", "grad_norm"):
        assert key in mlrun.data.metrics, key
    history = client.get_metric_history(mlrun.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(5, 31, 5))
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx([losses[s] for s in range(5, 31, 5)])
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert {"config.yaml", "model.safetensors"} <= artifacts


def test_tiny_preset_learns_the_synthetic_task(shards, tmp_path):
    """One CPU process (no launcher) on the quickstart recipe: loss well down, held-out mIoU well above chance."""
    run_dir = tmp_path / "run"
    out = run([PYTHON, "training/train.py", "--config", QUICKSTART, "--run-dir", str(run_dir), "--set",
               f"data.root={shards / 'train'}", "train.steps=200", "train.log_every=10", "data.workers=1"],
              tmp_path / "log.txt", env=dict(base_env(), OMP_NUM_THREADS="2"))
    assert "catseg train: finished step 200/200" in out
    losses = _losses(run_dir)
    assert losses[200] < 0.5 * losses[10], losses
    miou = miou_on_val(Path(json.loads((run_dir / "final.json").read_text())["weights"]), shards / "val")
    assert miou > 0.3, f"mIoU {miou:.3f} on held-out synthetic images (chance is about 0.07)"


def test_compiled_and_channels_last_training_follow_the_eager_loss_curve(shards, tmp_path):
    """train.compile=true compiles the whole model: its forward is one graph with no break (the vocabulary's prompt
    tokens are cached, so the text tower, which trains in the tiny preset, runs inside the graph), and the compiled
    forward and backward give the same losses step by step and the same weight names in the checkpoint.
    train.channels_last=true (the ResNet runs NHWC) gives the same losses too, and its checkpoint is written; so does
    train.stencil_upsampling=true, compiled (the decoder's upsampling and its adjoint fused into pointwise kernels).
    """
    runs = {"eager": "train.compile=false", "compiled": "train.compile=true",
            "channels_last": "train.channels_last=true",
            "compiled_stencil": "train.compile=true train.stencil_upsampling=true"}
    # the runs are independent processes, started together: compiling is mostly one core's work per process
    procs = {name: start([PYTHON, "training/train.py", "--config", QUICKSTART, "--run-dir", str(tmp_path / name),
                          "--set", f"data.root={shards / 'train'}", "train.steps=3", "train.log_every=1",
                          "data.workers=1", "train.deterministic=true", "schedule.warmup_steps=1", *setting.split()],
                         tmp_path / f"{name}.txt", env=dict(base_env(), OMP_NUM_THREADS="1"))
             for name, setting in runs.items()}
    results = {}
    try:
        for name, proc in procs.items():
            run_dir = tmp_path / name
            out = finish(proc, tmp_path / f"{name}.txt", timeout=900)
            assert proc.returncode == 0 and "catseg train: finished step 3/3" in out, out[-4000:]
            assert ("torch.compile made 1 graph(s) with 0 graph break(s)" in out) == name.startswith("compiled"), \
                out[-2000:]
            weights = load_file(run_dir / "checkpoints" / "step_00000003" / "model.safetensors")
            results[name] = (_losses(run_dir), weights)
    finally:  # a failed run leaves none of the others running
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    eager, a = results["eager"]
    for name in ("compiled", "channels_last", "compiled_stencil"):
        losses, b = results[name]
        assert sorted(losses) == [1, 2, 3]
        assert all(abs(losses[s] - eager[s]) <= 1e-4 * abs(eager[s]) for s in eager), (name, eager, losses)
        assert a.keys() == b.keys()  # the channels-last weights were saved (safetensors takes contiguous only)


def test_sigterm_then_resume_continues_the_uninterrupted_loss_curve(shards, tmp_path):
    sets = ("train.steps=24", "train.log_every=1", "train.ckpt_every=100")
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run(launch_cmd(_args(shards, reference, *sets)), tmp_path / "reference.txt")

    log = tmp_path / "killed.txt"
    proc = start(launch_cmd(_args(shards, resumed, *sets)), log)
    wait_for(lambda: len(metrics(resumed)) >= 6, 180, "six logged steps", proc, log)
    proc.send_signal(signal.SIGTERM)  # to `accelerate launch`, which passes it to the training processes
    out = finish(proc, log)
    assert "catseg train: stopped by signal 15 at step" in out
    stopped = read_meta(latest_checkpoint(resumed))["step"]
    assert 6 <= stopped < 24 and (resumed / "final.json").exists() is False

    out = run(launch_cmd(_args(shards, resumed, *sets)), tmp_path / "resumed.txt")
    assert "catseg train: finished step 24/24" in out
    ref, res = _losses(reference), _losses(resumed)
    assert sorted(res) == list(range(1, 25)), "the resumed run logs every step once"
    assert [res[s] for s in range(1, 25)] == [ref[s] for s in range(1, 25)]
    a = load_file(reference / "checkpoints" / "step_00000024" / "model.safetensors")
    b = load_file(resumed / "checkpoints" / "step_00000024" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # both halves of the resumed run went to the same MLflow run
    ids = {read_meta(p)["mlflow_run_id"] for p in list_checkpoints(resumed)}
    assert len(ids) == 1 and None not in ids


def test_ctrl_c_through_accelerate_launch(shards, tmp_path):
    """Ctrl-C in the terminal of a two-process run (SIGINT to the launcher's process group; the launcher passes it
    on): the processes agree at the next log step, write a checkpoint and stop, the MLflow run KILLED. A second Ctrl-C
    makes the launcher send its processes SIGTERM: they stop at once (exit 130, the MLflow run KILLED), not at its
    SIGKILL 30 s later."""
    from mlflow import MlflowClient

    def interrupt(name: str, presses: int) -> tuple[str, list[str], list[Path]]:
        run_dir, log = tmp_path / name, tmp_path / f"{name}.txt"
        proc = start(launch_cmd(_args(shards, run_dir, "train.steps=10000", "train.log_every=40",
                                      "train.ckpt_every=10000")), log)
        wait_for(lambda: len(metrics(run_dir)) >= 1, 180, "the first log step", proc, log)
        # after step 40's log: the processes stop at the next log step where they agree to (80 unless this machine
        # is so slow that the signal reached them before they agreed at step 40)
        time.sleep(0.5)
        for press in range(presses):
            time.sleep(1.5 * press)
            os.killpg(proc.pid, signal.SIGINT)
        out = finish(proc, log, timeout=120)
        runs = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}").search_runs(["1"])
        return out, [r.info.status for r in runs], list_checkpoints(run_dir)

    out, status, saved = interrupt("once", 1)
    stopped = re.search(r"catseg train: stopped by signal 2 at step (\d+)/10000", out)
    assert stopped and int(stopped[1]) in (40, 80), out[-3000:]
    assert [p.name for p in saved] == [f"step_{int(stopped[1]):08d}"] and status == ["KILLED"]
    out, status, saved = interrupt("twice", 2)
    assert "catseg train: interrupted at step" in out and "stopped by signal" not in out, out[-3000:]
    assert "forcefully exiting via 9" not in out and saved == [] and status == ["KILLED"]


def test_deepspeed_zero2_two_processes_on_cpu(shards, mlflow_server, tmp_path):
    """ZeRO-2 through the launch config alone, in its precision (bf16 autocast with fp32 weights, DeepSpeed's
    torch_autocast); the MLflow server is killed mid-run and training still finishes."""
    uri, up, down = mlflow_server
    run_dir = tmp_path / "run"
    log = tmp_path / "log.txt"
    cmd = launch_cmd(_args(shards, run_dir, "train.steps=12", "train.log_every=2", f"tracking.uri={uri}",
                           "tracking.timeout_s=2", "train.mixed_precision="), launch_config="launch/zero2.yaml")
    proc = start(cmd, log, env=base_env(cpu=False))  # DeepSpeed picks its CPU accelerator by itself
    wait_for(lambda: len(metrics(run_dir)) >= 1, 240, "the first logged step", proc, log)
    down()
    try:
        out = finish(proc, log, timeout=240)
    finally:
        up()
    assert proc.returncode == 0, out[-4000:]
    assert "catseg train: finished step 12/12" in out and "MLflow tracking at" in out
    assert f"MLflow tracking at {uri} failed to log metrics" in out, "the server was gone before the run ended"
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(2, 13, 2)), "every metric kept locally while the server was gone"
    assert losses[12] < 0.8 * losses[2]
    from mlflow.tracking import MlflowClient

    params = MlflowClient(uri).get_run(read_meta(latest_checkpoint(run_dir))["mlflow_run_id"]).data.params
    assert params["precision"] == "bf16"  # from launch/ds_zero2.json: the run config leaves it to the launch
    state = latest_checkpoint(run_dir) / "state"
    assert (state / "pytorch_model").is_dir(), "a DeepSpeed engine checkpoint"
    import catseg

    model = catseg.create_model("catseg_tiny", pretrained=latest_checkpoint(run_dir) / "model.safetensors")
    assert sum(p.numel() for p in model.parameters()) > 4_000_000

    # resuming reads DeepSpeed's pickled engine states with weights_only=True: real states load, code does not run
    resume = [c.replace("train.steps=12", "train.steps=14") for c in cmd]
    out = run(resume, tmp_path / "resumed.txt", env=base_env(cpu=False))
    assert "catseg train: finished step 14/14" in out and sorted(_losses(run_dir))[-1] == 14
    marker = tmp_path / "code-ran"
    optim = latest_checkpoint(run_dir) / "state" / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": _RunsCode(str(marker))}, optim)
    proc = start([c.replace("train.steps=12", "train.steps=16") for c in cmd], tmp_path / "planted.txt",
                 env=base_env(cpu=False))
    out = finish(proc, tmp_path / "planted.txt")
    assert proc.returncode != 0 and not marker.exists()
    assert "holds pickled objects other than tensors and training state (posix.system); it was not loaded" in out


def test_deepspeed_zero3_resumes_exactly_and_exports_whole_weights(shards, tmp_path):
    """ZeRO-3 (the launch of the ViT-H/G configs) shards the parameters too: each checkpoint's model.safetensors
    still holds every weight whole, and a run that stopped after its step-3 checkpoint without a later one (a copy
    of the finished run with the step-6 checkpoint removed) ends at step 6 with the uninterrupted run's weights and
    losses, in the same MLflow run."""
    import catseg

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    # launch/zero3.yaml with every parameter sharded: its DeepSpeed settings keep tensors below 1e5 elements whole
    # on each process, which in the tiny preset is all but four
    ds = json.loads((REPO / "launch" / "ds_zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "ds_zero3.json").write_text(json.dumps(ds))
    launch = tmp_path / "zero3.yaml"
    launch.write_text((REPO / "launch" / "zero3.yaml").read_text().replace("launch/ds_zero3.json",
                                                                          str(tmp_path / "ds_zero3.json")))

    def cmd(run_dir: Path) -> list[str]:
        return launch_cmd(_args(shards, run_dir, "train.steps=6", "train.log_every=1", "train.ckpt_every=3"),
                          launch_config=str(launch), extra=["--mixed_precision", "no"])

    run(cmd(whole), tmp_path / "whole.txt", env=base_env(cpu=False))
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000006")
    (resumed / "final.json").unlink()
    out = run(cmd(resumed), tmp_path / "resumed.txt", env=base_env(cpu=False))
    assert "catseg train: finished step 6/6" in out and "logs to a new MLflow run" not in out
    assert (whole / "checkpoints" / "step_00000003" / "state" / "pytorch_model").is_dir(), "a DeepSpeed checkpoint"
    a = load_file(whole / "checkpoints" / "step_00000006" / WEIGHTS)
    b = load_file(resumed / "checkpoints" / "step_00000006" / WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(resumed) == _losses(whole) and sorted(_losses(whole)) == list(range(1, 7))
    # every weight whole (ZeRO-3 holds a shard of each parameter per process, empty elsewhere): the file loads into
    # a fresh model, which refuses a missing or mis-shaped tensor
    catseg.load_weights(catseg.create_model("catseg_tiny"), whole / "checkpoints" / "step_00000003" / WEIGHTS)
    assert {read_meta(p)["mlflow_run_id"] for p in list_checkpoints(resumed)} == \
        {read_meta(whole / "checkpoints" / "step_00000003")["mlflow_run_id"]}


def test_deepspeed_launch_config_with_cpu_forced_is_refused(shards, tmp_path):
    """ACCELERATE_USE_CPU=true makes accelerate drop the launch config's DeepSpeed and run plain DDP without a word;
    the trainer refuses to start, naming the variable and what to do."""
    cmd = launch_cmd(_args(shards, tmp_path / "run", "train.steps=2"), launch_config="launch/zero2.yaml",
                     extra=["--mixed_precision", "no"])
    proc = start(cmd, tmp_path / "log.txt", env=base_env(cpu=True))
    out = finish(proc, tmp_path / "log.txt")
    assert proc.returncode != 0 and "asks for DeepSpeed, but ACCELERATE_USE_CPU is set" in out, out[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_deepspeed_config_storing_weights_in_bf16_is_refused(shards, tmp_path):
    """A DeepSpeed config with bf16.enabled true would store the weights in bf16 (the forward then fails on fp32
    images); the trainer refuses it before building the model, naming the file and what to set."""
    ds = json.loads((REPO / "launch" / "ds_zero2.json").read_text())
    ds["bf16"]["enabled"] = True
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    launch = tmp_path / "zero2.yaml"
    launch.write_text((REPO / "launch" / "zero2.yaml").read_text().replace("launch/ds_zero2.json",
                                                                          str(tmp_path / "ds.json")))
    cmd = launch_cmd(_args(shards, tmp_path / "run", "train.steps=2"), launch_config=str(launch), num_processes=1)
    proc = start(cmd, tmp_path / "log.txt", env=base_env(cpu=False))
    out = finish(proc, tmp_path / "log.txt")
    assert proc.returncode != 0 and f"{tmp_path / 'ds.json'}: bf16.enabled is true" in out, out[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_accelerate_cpu_switch_starting_one_process_is_named(shards, tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process without a word; the trainer says so and names
    the launch that starts two."""
    cmd = [PYTHON, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "training/train.py",
           *_args(shards, tmp_path / "run", "train.steps=2")]
    out = run(cmd, tmp_path / "log.txt")
    assert "starts ONE process whatever N says" in out and "launch/cpu.yaml" in out, out[-3000:]
    assert "catseg train: finished step 2/2" in out


def test_master_port_from_the_shell_is_told_apart_from_one_a_launcher_set():
    """The one-process warning above keys on MASTER_PORT set by the launcher; a shell that exports it for a one-process
    run is not that (before, it got the warning too)."""
    check = [PYTHON, "-c", "from training.train import set_by_launcher; print(set_by_launcher('MASTER_PORT'))"]
    env = {k: v for k, v in base_env().items() if k != "MASTER_PORT"}

    def told(cmd, **extra):
        out = subprocess.run(cmd, cwd=REPO, env=env | extra, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.split()[-1]

    assert told(check) == "False"  # not set at all
    assert told(["bash", "-c", f"MASTER_PORT=29500 {shlex.join(check)}; exit $?"]) == "True"  # set for it only
    assert told(["bash", "-c", f"{shlex.join(check)}; exit $?"], MASTER_PORT="29500") == "False"  # the shell's own


class _RunsCode:
    """Unpickling this runs `touch PATH`: what a planted checkpoint file could do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_two_machines_on_one_host_finish_together(shards, tmp_path):
    port = free_port()
    run_dir = tmp_path / "run"
    procs = []
    for rank in (0, 1):
        cmd = launch_cmd(_args(shards, run_dir, "train.steps=12", "train.log_every=4", "train.batch_size=4"),
                         num_processes=2, port=port,
                         extra=["--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1"])
        procs.append((start(cmd, tmp_path / f"machine{rank}.txt"), tmp_path / f"machine{rank}.txt"))
    for proc, log in procs:
        out = finish(proc, log)
        assert proc.returncode == 0, out[-4000:]
    assert "catseg train: finished step 12/12" in procs[0][1].read_text()
    assert read_meta(latest_checkpoint(run_dir))["world_size"] == 2
    assert sorted(_losses(run_dir)) == [4, 8, 12]


@pytest.mark.parametrize("how", ["SIGUSR1 to the wrapper", "SIGTERM to the whole step"])
def test_slurm_node_wrapper_checkpoints_on_the_preemption_signal(shards, tmp_path, how):
    """`python -m training.slurm_cmd run` as a SLURM step would start it; SIGUSR1 (the time limit's warning) or the
    SIGTERM that SLURM sends every process of the step (preemption, scancel) makes training save and stop; the
    launcher does not end its training processes on that SIGTERM."""
    run_dir = tmp_path / "run"
    env = dict(base_env(), SLURM_JOB_NUM_NODES="1", SLURM_NODEID="0", SLURM_JOB_NODELIST="localhost",
               SLURM_GPUS_ON_NODE="2", SLURM_JOB_ID="4321", MASTER_PORT=str(free_port()))
    cmd = [PYTHON, "-m", "training.slurm_cmd", "run", "--launch-config", "launch/cpu.yaml", "--",
           *_args(shards, run_dir, "train.steps=500", "train.log_every=1")]
    log = tmp_path / "node.txt"
    proc = start(cmd, log, env)
    wait_for(lambda: len(metrics(run_dir)) >= 3, 180, "three logged steps", proc, log)
    if how.startswith("SIGUSR1"):
        proc.send_signal(signal.SIGUSR1)
    else:
        os.killpg(proc.pid, signal.SIGTERM)  # the wrapper was started in a session of its own
    out = finish(proc, log)
    assert proc.returncode == 0, out[-4000:]
    assert "--num_machines 1 --machine_rank 0 --main_process_ip localhost" in out
    assert re.search(r"catseg train: stopped by signal (10|15) at step", out), out[-4000:]
    assert "death signal" not in out, out[-4000:]  # torch's launcher would have ended its processes
    assert read_meta(latest_checkpoint(run_dir))["step"] >= 3
    requeue = subprocess.run([PYTHON, "-m", "training.slurm_cmd", "requeue", "--run-dir", str(run_dir), "--dry-run"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert requeue.returncode == 0 and "not finished: scontrol requeue 4321" in requeue.stdout


@pytest.mark.skipif(shutil.which("sbatch") is None or shutil.which("sinfo") is None, reason="no SLURM installation")
def test_sbatch_script_runs_on_a_real_slurm(shards, tmp_path):
    """With a working SLURM (sinfo answers), submit the ViT-H script with the tiny config and wait for it."""
    if subprocess.run(["sinfo"], capture_output=True, timeout=30).returncode != 0:
        pytest.skip("SLURM is installed but not running")
    run_dir = tmp_path / "run"
    env = dict(base_env(), PYTHON=PYTHON, CONFIG=QUICKSTART, LAUNCH_CONFIG="launch/cpu.yaml", RUN_DIR=str(run_dir),
               CATSEG_PROCS_PER_NODE="2")
    out = subprocess.run(["sbatch", "--wait", "--nodes=1", "--gpus-per-node=0", "--time=10", f"--chdir={REPO}",
                          f"--output={tmp_path / 'slurm.out'}", "launch/slurm/vith14.sbatch", "--set",
                          f"data.root={shards / 'train'}", "train.steps=6", "schedule.warmup_steps=0"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr + (tmp_path / "slurm.out").read_text()
    assert (run_dir / "final.json").exists()
