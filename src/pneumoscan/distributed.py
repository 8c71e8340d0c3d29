"""Running under ``torchrun``: process group from the environment, rank 0 as the writer, small collectives.

``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every process;
a plain ``python -m pneumoscan ...`` sets none of them and runs as a world of one, with no
process group and every helper here a no-op. Backend: NCCL when training on CUDA, else gloo.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def is_main(self) -> bool:
        """Rank 0 writes outputs and logs to files; the others only compute."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world() -> World:
    """Rank and world size as torchrun set them (a world of one without torchrun); no process group yet.

    Raises:
        ValueError: the variables are set but inconsistent.
    """
    try:
        rank = int(os.environ.get("RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them): {exc}") from exc
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK {rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE {world_size}); start with torchrun")
    return World(rank, world_size, local_rank)


def in_group() -> bool:
    """Whether this process has joined a process group already (a k-fold run holds one for all its folds)."""
    return dist.is_available() and dist.is_initialized()


def init_world(device_type: str = "cpu") -> World:
    """Join the run's process group when started by torchrun (NCCL for CUDA, else gloo); else a world of one."""
    world = env_world()
    if not world.distributed:
        return world
    backend = "nccl" if device_type == "cuda" else "gloo"
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(backend=backend)
    log.debug("rank %d of %d joined the %s process group", world.rank, world.world_size, backend)
    return World(world.rank, world.world_size, world.local_rank, backend)


@contextmanager
def joined_world(device_type: str = "cpu") -> Iterator[World]:
    """The process group for the work in the block (``init_world``), left when it ends (``close_world``: after a
    barrier if the block finished, without one if it raised), unless this process had joined one already: a
    k-fold run holds one for all its folds, since leaving it and joining again between folds hung the ranks."""
    owned = not in_group()
    world = init_world(device_type)
    clean = False
    try:
        yield world
        clean = True
    finally:
        if owned:
            close_world(world, clean)


def close_world(world: World, clean: bool = True) -> None:
    """Leave the process group: after a barrier when this rank finished its work (``clean``), so that no rank
    exits while another still waits on it; without one when it failed, since the others then wait in another
    collective, and a barrier would hold every rank until the group's timeout (30 min) instead of letting this
    one exit, which torchrun answers by stopping the others.

    Objects left in reference cycles (a DDP model's reducer, finished gloo work holding tensors) are collected
    first, while the group and the interpreter are alive: destroyed later, during interpreter shutdown, such
    objects are a known cause of a rank aborting at exit ("terminate called without an active exception")."""
    if world.distributed and dist.is_initialized():
        gc.collect()
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def broadcast(obj, world: World):
    """Rank 0's ``obj`` on every rank (any picklable value; the ranks' own values are ignored)."""
    if not world.distributed:
        return obj
    box = [obj if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(values: list[float], world: World) -> list[float]:
    """Element-wise sum of ``values`` over all ranks."""
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if world.backend == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()


def _outcome(fn) -> tuple:
    """("ok", ``fn()``, None) or ("error", the exception it raised made picklable, the exception)."""
    try:
        return "ok", fn(), None
    except Exception as exc:
        try:
            sent = pickle.loads(pickle.dumps(exc))
        except Exception:  # an exception that cannot travel: its type and message do
            sent = RuntimeError(f"{type(exc).__name__}: {exc}")
        return "error", sent, exc


def from_main(fn, world: World, send_result: bool = True):
    """``fn()`` run on rank 0 only, its result on every rank (None on the others if not
    ``send_result``); if it raises, every rank raises it.

    Without the second half a rank-0 error (a missing checkpoint, a full disk) would leave the other
    ranks waiting for a result that never comes, until the process group's timeout (30 minutes).
    """
    if not world.distributed:
        return fn()
    outcome = _outcome(fn) if world.is_main else None
    box = [(outcome[0], outcome[1] if send_result or outcome[0] == "error" else None) if outcome else None]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise outcome[2] if outcome else value  # rank 0 raises its own exception, with its traceback
    return outcome[1] if outcome else value


def main_first(world: World, fn):
    """``fn()`` on rank 0, then on the other ranks (e.g. rank 0 fills a cache the others then read).
    If it raises on rank 0, every rank raises it without running it."""
    result = from_main(fn, world, send_result=False)
    return result if world.is_main else fn()
