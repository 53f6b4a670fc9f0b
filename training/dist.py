"""Where this process sits in a distributed job, read from the launcher's environment."""

from __future__ import annotations

import os


def world_info_from_env() -> tuple[int, int, int]:
    """Return (rank, local_rank, world_size) from torchrun/accelerate, then SLURM, then MPI variables; else (0, 0, 1)."""
    for rank_key, local_key, world_key in (
        ("RANK", "LOCAL_RANK", "WORLD_SIZE"),
        ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"),
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("PMI_RANK", "MPI_LOCALRANKID", "PMI_SIZE"),
    ):
        if rank_key in os.environ and world_key in os.environ:
            return int(os.environ[rank_key]), int(os.environ.get(local_key, 0)), int(os.environ[world_key])
    return 0, 0, 1
