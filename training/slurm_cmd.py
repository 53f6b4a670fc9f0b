"""SLURM glue: build and run one node's `accelerate launch`, pass the preemption signal on, requeue unfinished runs.

The .sbatch scripts in launch/slurm/ start this once per node (`srun --ntasks-per-node=1`):

    python -m training.slurm_cmd run --launch-config launch/zero3.yaml -- --config configs/X.yaml --run-dir DIR
    python -m training.slurm_cmd requeue --run-dir DIR      # after srun returns, in the batch script

`run` reads the node count, this node's rank, the first node of the allocation (rendezvous) and the GPUs per node
from SLURM's environment, prints the `accelerate launch` command line and runs it. SLURM's warning signal
(`--signal=USR1@T`) reaches every process of the step; the launcher ignores it and the training processes
checkpoint and stop. `requeue` puts the job back in the queue when the run has not finished (it resumes with
`--resume auto`). `--dry-run` (or CATSEG_SLURM_DRY_RUN=1) prints the command without running it.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from training.checkpoint import read_final

TRAIN_SCRIPT = "training/train.py"


class SlurmError(RuntimeError):
    """A SLURM environment this helper cannot use; the message names the variable."""


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a SLURM host list such as 'gpu[01-03,07],login1' into host names, in order."""
    hosts: list[str] = []
    for token in _split_top_level(hostlist):
        hosts.extend(_expand_token(token))
    return hosts


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        depth += (ch == "[") - (ch == "]")
        if depth < 0:
            raise SlurmError(f"host list {text!r} has an unmatched ']'")
        current += ch
    if depth:
        raise SlurmError(f"host list {text!r} has an unmatched '['")
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def _expand_token(token: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", token)
    if not match:
        return [token]
    head, tail = token[:match.start()], token[match.end():]
    out = []
    for part in match.group(1).split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()):
                raise SlurmError(f"host range {part!r} in {token!r} is not numeric")
            names = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
        else:
            names = [part]
        for name in names:
            out.extend(_expand_token(head + name + tail))
    return out


@dataclass
class NodeLaunch:
    """What one node's `accelerate launch` needs to know about the job."""

    num_machines: int  # nodes in the job
    machine_rank: int  # this node's index
    main_ip: str  # the first node of the allocation: the rendezvous host
    main_port: int  # rendezvous port
    procs_per_node: int  # training processes (GPUs) per node


def _env_int(env: dict, names: tuple[str, ...], default: int | None = None) -> int:
    for name in names:
        if env.get(name):
            digits = re.findall(r"\d+", env[name].split("(")[0])  # '4(x2)' and 'a100:4' forms
            if not digits:
                raise SlurmError(f"${name} = {env[name]!r} holds no number")
            return int(digits[-1])
    if default is None:
        raise SlurmError(f"none of ${', $'.join(names)} is set; run this inside a SLURM job step (srun)")
    return default


def node_launch_from_env(env: dict | None = None) -> NodeLaunch:
    """Read the job layout of this node from SLURM's environment variables."""
    env = dict(os.environ if env is None else env)
    nodes = _env_int(env, ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"))
    rank = _env_int(env, ("SLURM_NODEID",))
    hostlist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not hostlist:
        raise SlurmError("$SLURM_JOB_NODELIST is not set; run this inside a SLURM job step (srun)")
    hosts = expand_hostlist(hostlist)
    if len(hosts) != nodes:
        raise SlurmError(f"$SLURM_JOB_NODELIST {hostlist!r} names {len(hosts)} hosts but the job has {nodes} nodes")
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    # CATSEG_PROCS_PER_NODE overrides the GPU count (CPU-only clusters, or fewer processes than GPUs).
    gpus = _env_int(env, ("CATSEG_PROCS_PER_NODE", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"),
                    default=len(visible) or 1)
    # The job id picks the port, so two jobs sharing a first node do not collide.
    port = int(env.get("MASTER_PORT") or 20000 + _env_int(env, ("SLURM_JOB_ID",), default=0) % 20000)
    return NodeLaunch(nodes, rank, hosts[0], port, gpus)


def accelerate_command(node: NodeLaunch, launch_config: str, train_args: list[str],
                       python: str = sys.executable) -> list[str]:
    """The `accelerate launch` command line of one node."""
    return [
        python, "-m", "accelerate.commands.launch",
        "--config_file", launch_config,
        "--num_machines", str(node.num_machines),
        "--machine_rank", str(node.machine_rank),
        "--main_process_ip", node.main_ip,
        "--main_process_port", str(node.main_port),
        "--num_processes", str(node.num_machines * node.procs_per_node),
        "--rdzv_backend", "static",
        "--max_restarts", "0",
        TRAIN_SCRIPT, *train_args,
    ]


def _children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 is the parent pid; the command name (field 2) may hold spaces, so split after its ')'.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _ignore_stop_signals() -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def run_node(cmd: list[str]) -> int:
    """Run the launcher; SIGUSR1/SIGTERM to this process reach the training processes as SIGUSR1.

    The launcher itself ignores both: SLURM sends SIGTERM to every process of the step (preemption, scancel), and
    torch's launcher would answer it by ending its training processes, with SIGKILL 30 s later, before a large
    model's checkpoint is written. It keeps its handlers of SIGINT, SIGHUP and SIGQUIT (torchrun's
    --signals-to-handle, which accelerate launch takes from PET_SIGNALS_TO_HANDLE); the training processes install
    their own handlers of SIGTERM and SIGUSR1.
    """
    env = dict(os.environ, PET_SIGNALS_TO_HANDLE="SIGINT,SIGHUP,SIGQUIT")
    launcher = subprocess.Popen(cmd, preexec_fn=_ignore_stop_signals, env=env)

    def forward(signum, frame):
        # The launcher's children are the training processes; they checkpoint and stop on SIGUSR1.
        for pid in _children(launcher.pid):
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGUSR1, forward)
    signal.signal(signal.SIGTERM, forward)
    while True:
        try:
            return launcher.wait()
        except InterruptedError:
            continue


def run_finished(run_dir: str | os.PathLike) -> bool:
    """Whether a run folder holds a finished run (training wrote final.json at its last step)."""
    return read_final(run_dir) is not None


def requeue_command(env: dict | None = None) -> list[str]:
    """The command that puts this job back in the queue."""
    env = dict(os.environ if env is None else env)
    job = env.get("SLURM_JOB_ID")
    if not job:
        raise SlurmError("$SLURM_JOB_ID is not set; requeue runs inside the batch script of a SLURM job")
    return ["scontrol", "requeue", job]


def main(argv: list[str] | None = None) -> int:
    """CLI: `run` (one node's launcher) or `requeue` (after the step ends)."""
    parser = argparse.ArgumentParser(prog="python -m training.slurm_cmd", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start this node's accelerate launch (arguments after -- go to train.py)")
    run.add_argument("--launch-config", required=True, help="accelerate config, e.g. launch/zero3.yaml")
    run.add_argument("--dry-run", action="store_true", help="print the command only")
    run.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then arguments for training/train.py")
    req = sub.add_parser("requeue", help="requeue this job unless the run finished")
    req.add_argument("--run-dir", required=True, help="the run folder given to train.py")
    req.add_argument("--dry-run", action="store_true", help="print the requeue command only")
    args = parser.parse_args(argv)
    dry = args.dry_run or os.environ.get("CATSEG_SLURM_DRY_RUN") == "1"
    try:
        if args.command == "run":
            if not Path(args.launch_config).is_file():
                raise SlurmError(f"launch config {args.launch_config} not found; the configs are in launch/")
            train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
            if sum(a == "--run-dir" or a.startswith("--run-dir=") for a in train_args) > 1:
                raise SlurmError("--run-dir is given twice: the batch scripts name the run folder themselves, from "
                                 "RUN_DIR, and their requeue step checks that folder; set RUN_DIR=DIR before sbatch "
                                 "instead of passing --run-dir after the script name")
            cmd = accelerate_command(node_launch_from_env(), args.launch_config, train_args)
            print(f"node {os.environ.get('SLURM_NODEID', '?')}: {shlex.join(cmd)}", flush=True)
            return 0 if dry else run_node(cmd)
        if run_finished(args.run_dir):
            print(f"run {args.run_dir} finished; no requeue", flush=True)
            return 0
        cmd = requeue_command()
        print(f"run {args.run_dir} not finished: {shlex.join(cmd)}", flush=True)
        if dry:
            return 0
        if shutil.which(cmd[0]) is None:
            raise SlurmError("scontrol is not on PATH; requeue the job by hand: " + shlex.join(cmd))
        return subprocess.call(cmd)
    except SlurmError as e:
        print(f"slurm_cmd: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
