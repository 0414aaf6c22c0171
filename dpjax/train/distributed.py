"""Start JAX's multi-process runtime (``jax.distributed.initialize``) when several processes run.

JAX is multi-controller: the same script runs once per host (or per GPU); every process must
call ``jax.distributed.initialize`` before touching devices, after which ``jax.devices()`` lists
the devices of all processes and meshes span them (JAX_NOTES §7). No launcher of our own.

Where the settings come from, first match wins:

1. arguments (the CLI's ``--coordinator``, ``--num_processes``, ``--process_id``);
2. environment: ``JAX_COORDINATOR_ADDRESS`` (host:port), ``JAX_NUM_PROCESSES``,
   ``JAX_PROCESS_ID`` (and ``JAX_LOCAL_DEVICE_IDS``, read by JAX itself);
3. a cluster JAX detects itself (Slurm with more than one task, Open MPI, Kubernetes, ...):
   ``jax.distributed.initialize()`` with no arguments.

Nothing is started for a single process.
"""

from __future__ import annotations

import os

import jax

__all__ = ["initialize", "settings_from_env"]

_SLURM_TASKS = "SLURM_NTASKS"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError as err:
        raise ValueError(f"environment variable {name}={value!r}: expected an integer") from err


def settings_from_env() -> tuple[str | None, int | None, int | None]:
    """``(coordinator, num_processes, process_id)`` from ``JAX_*`` environment variables."""
    return (
        os.environ.get("JAX_COORDINATOR_ADDRESS") or None,
        _env_int("JAX_NUM_PROCESSES"),
        _env_int("JAX_PROCESS_ID"),
    )


def _in_cluster() -> bool:
    slurm = _env_int(_SLURM_TASKS)
    if slurm is not None and slurm > 1 and "SLURM_STEP_NODELIST" in os.environ:
        return True
    return (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Initialise the distributed runtime if this is a multi-process run.

    Args:
      coordinator: ``host:port`` of process 0's coordinator service (every process the same).
      num_processes: total number of processes.
      process_id: this process's index in ``[0, num_processes)``.

    Returns:
      True if ``jax.distributed.initialize`` was called (or had been already), False for a
      single-process run.

    Raises:
      ValueError: inconsistent settings (e.g. a process id without a process count).
    """
    env = settings_from_env()
    coordinator = coordinator or env[0]
    num_processes = num_processes if num_processes is not None else env[1]
    process_id = process_id if process_id is not None else env[2]
    if jax.distributed.is_initialized():
        return True
    if num_processes is None and coordinator is None and process_id is None:
        if _in_cluster():
            jax.distributed.initialize()
            return True
        return False
    if num_processes is None or num_processes < 1:
        raise ValueError(
            f"num_processes: expected a positive integer with coordinator={coordinator!r} / "
            f"process_id={process_id!r}, got {num_processes!r} (flag --num_processes or "
            "JAX_NUM_PROCESSES)"
        )
    if num_processes == 1:
        return False
    if coordinator is None:
        raise ValueError(
            f"num_processes={num_processes} needs a coordinator address host:port (flag "
            "--coordinator or JAX_COORDINATOR_ADDRESS), the same for every process"
        )
    if process_id is None or not 0 <= process_id < num_processes:
        raise ValueError(
            f"process_id: expected an integer in [0, {num_processes}), got {process_id!r} "
            "(flag --process_id or JAX_PROCESS_ID)"
        )
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
    return True
