"""Data parallelism on JAX's own runtime: one `jit` over a device mesh, on one host or many.

The train step is written for one global batch; placing that batch with a `NamedSharding` split
along a 'data' mesh axis, and the state replicated, lets XLA's SPMD partitioner run it on every
device and insert the gradient all-reduce. Batch-norm statistics are therefore global batch
statistics with no `axis_name`, and per-example dropout and augmentation keys make results
independent of the device count. Why not `pmap`: since JAX 0.8 it is implemented as
`jit(shard_map)` and kept in maintenance mode, and it needs a leading device axis in every array,
which the rest of cnnjax would have to know about; with `jit` the device count is a run-time fact.

Across hosts each process runs the same program under `jax.distributed`; every process computes
the same global batch order and loads only its own rows of each batch, which
`jax.make_array_from_process_local_data` assembles into the global array.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Joins a multi-process run when asked to by arguments or by the environment.

    Arguments win over JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID. Returns False
    (and does nothing) for a single-process run. Must run before any other JAX call.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    if coordinator_address is None:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise ValueError("a multi-process run needs --coordinator-address HOST:PORT (or "
                             "JAX_COORDINATOR_ADDRESS) as well as the process count and id.")
        return False
    if num_processes is None or process_id is None:
        raise ValueError(f"coordinator {coordinator_address} given without --num-processes and "
                         f"--process-id (or JAX_NUM_PROCESSES / JAX_PROCESS_ID).")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id} is not in [0, {num_processes}).")
    # Cross-process collectives on CPU need gloo; accelerators bring their own (NCCL, ICI).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """All devices of all processes on one 'data' axis."""

    mesh: Mesh

    @classmethod
    def create(cls) -> "DataParallel":
        return cls(Mesh(np.asarray(jax.devices()), (AXIS,)))

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    @property
    def is_primary(self) -> bool:
        """Only process 0 writes logs, plots and summaries (orbax coordinates checkpoints itself)."""
        return jax.process_index() == 0

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def batch_sharded(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(AXIS))

    def check_batch_size(self, batch_size: int, name: str = "train.batch_size") -> None:
        """Raises ValueError naming the nearest valid sizes when the batch does not split evenly."""
        d = self.num_devices
        if batch_size % d:
            lower, upper = (batch_size // d) * d, (batch_size // d + 1) * d
            choices = f"{lower} or {upper}" if lower else f"{upper}"
            raise ValueError(f"{name}={batch_size} does not divide evenly across {d} devices; "
                             f"choose a multiple of {d}, e.g. {choices}.")

    def eval_batch_size(self, requested: int, num_examples: int) -> int:
        """The smallest multiple of the device count holding min(requested, num_examples) rows;
        the extra rows are padding that evaluation masks out."""
        rows = min(requested, num_examples)
        return -(-rows // self.num_devices) * self.num_devices

    @property
    def part(self) -> tuple[int, int]:
        """(this process, process count): which rows of each global batch this process loads."""
        return jax.process_index(), jax.process_count()

    def shard_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Assembles each process's rows of a batch into global arrays split along the batch axis."""
        count = jax.process_count()
        return {k: jax.make_array_from_process_local_data(
                    self.batch_sharded, v, (v.shape[0] * count, *v.shape[1:]))
                for k, v in local.items()}

    def abstract(self, tree: Any) -> Any:
        """Shapes of `tree` (arrays or ShapeDtypeStructs) placed replicated: the target for
        restoring a checkpoint onto this run's devices, whatever devices wrote it."""
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated),
                            tree)
