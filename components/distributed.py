"""Data-parallel training under `torchrun`: process-group setup and each rank's share of a batch.

`torchrun --nproc_per_node=N` starts N copies of a command and tells each its place through
environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). `session()` joins
the process group they describe (gloo on CPU, nccl when each rank has a GPU) and leaves it on exit;
without torchrun it does nothing, so one code path serves one process and many.

The trainer (`components/trainer.py`) does the rest: it wraps the model in
DistributedDataParallel, which averages gradients across ranks, keeps this rank's rows of every
global batch (`shard_batch`), and lets only rank 0 write checkpoints and report metrics.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(minutes=30)  # a rank that waits longer than this has lost its peers


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job; rank 0 of 1 when not launched by torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "DistEnv":
        def read(name: str, default: int) -> int:
            raw = os.environ.get(name)
            if raw is None:
                return default
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not an integer: launch with torchrun, which sets it") from None

        env = cls(read("RANK", 0), read("WORLD_SIZE", 1), read("LOCAL_RANK", 0))
        if env.world_size < 1 or not 0 <= env.rank < env.world_size:
            raise ValueError(f"RANK={env.rank} WORLD_SIZE={env.world_size} is not a valid place in a job: "
                             "launch with torchrun rather than setting these by hand")
        return env

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def active() -> bool:
    """True when this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process may write files and report: rank 0, or the only process."""
    return rank() == 0


DEVICE_ENV = "ZOETROPE_DEVICE"


def device() -> torch.device:
    """The device this process computes on.

    Under torchrun: its own GPU with nccl, the CPU with gloo. One process: `$ZOETROPE_DEVICE`
    (`cpu`, `cuda`, `cuda:1`) when set, else the first GPU when CUDA has one, else the CPU.
    """
    if active():
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    asked = os.environ.get(DEVICE_ENV, "").strip().lower()
    if asked in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(asked)
    except RuntimeError:
        raise ValueError(f"{DEVICE_ENV}={asked!r} is not a device: use cpu, cuda or cuda:N") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{DEVICE_ENV}={asked} but PyTorch sees no GPU: install a CUDA build of torch "
                           f"or unset {DEVICE_ENV} to use the CPU")
    if chosen.type not in ("cpu", "cuda"):
        raise ValueError(f"{DEVICE_ENV}={asked!r}: Zoetrope trains on cpu or cuda")
    return chosen


def init(backend: str | None = None) -> DistEnv:
    """Join the process group torchrun described; a no-op for a single process.

    `backend` defaults to nccl when CUDA has a GPU for every local rank, else gloo.
    """
    env = DistEnv.from_env()
    if env.world_size == 1 or (dist.is_available() and dist.is_initialized()):
        return env
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed: "
                           "install a build with distributed support or run one process")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={env.world_size} but {name} is unset: launch with "
                               "`torchrun --nproc_per_node=N ...`, which sets it")
    if backend is None:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        backend = "nccl" if gpus > env.local_rank else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size, timeout=TIMEOUT)
    return env


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(backend: str | None = None) -> Iterator[DistEnv]:
    """`with session():` around a training job; leaves the group only if it joined it."""
    joined = not (dist.is_available() and dist.is_initialized())
    env = init(backend)
    try:
        yield env
    finally:
        if joined:
            cleanup()


def barrier() -> None:
    if active():
        dist.barrier()


def mean_scalar(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over ranks (the loss of the global batch when every shard is equal)."""
    if not active():
        return value
    buf = value.detach().float().reshape(1).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf[0] / dist.get_world_size()


def agree(value: int, what: str) -> None:
    """Fail on every rank when ranks hold different values of `what` (they would deadlock)."""
    if not active():
        return
    buf = torch.tensor([value, -value], dtype=torch.int64, device=device())
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    if int(buf[0]) != -int(buf[1]):
        raise RuntimeError(f"processes disagree on {what}: between {-int(buf[1])} and {int(buf[0])}; put the "
                           "checkpoint folder on a file system that every node sees")


# ----------------------------------------------------------------------------------------------
# Each rank's share of a batch
# ----------------------------------------------------------------------------------------------


def shard_bounds(global_batch: int, rank_: int, world: int) -> tuple[int, int]:
    """Rows [start, stop) of a global batch that rank `rank_` of `world` trains on."""
    if global_batch % world:
        raise ValueError(f"a global batch of {global_batch} does not split evenly over {world} processes: "
                         f"use a batch size that is a multiple of {world}, or another process count")
    per = global_batch // world
    return rank_ * per, (rank_ + 1) * per


def shard_batch(batch: Any, global_batch: int, rank_: int, world: int) -> Any:
    """This rank's rows of every tensor whose first dimension is the global batch.

    Tuples, lists and dicts are walked; anything else (a generator, a scalar tensor, a shared
    null caption of one row) is passed through unchanged.
    """
    start, stop = shard_bounds(global_batch, rank_, world)

    def cut(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x[start:stop] if x.dim() > 0 and x.shape[0] == global_batch else x
        if isinstance(x, tuple):
            return tuple(cut(v) for v in x)
        if isinstance(x, list):
            return [cut(v) for v in x]
        if isinstance(x, dict):
            return {k: cut(v) for k, v in x.items()}
        return x

    return cut(batch)
