"""Data-parallel retraining on PyTorch's own engine: ``torchrun`` + ``DistributedDataParallel``.

``edgeprune compress`` runs unchanged under ``torchrun``; this module is everything that knows
about it. With ``WORLD_SIZE`` unset or 1 nothing here does anything: no process group, the model and
the loaders are used as they are.

The contract under several processes ("ranks"):

- ``--batch-size`` is the GLOBAL batch. The training loader draws exactly the batches a single
  process would (same shuffle, same augmentation, from the same generator on every rank) and each
  rank keeps its contiguous ``1/world`` slice of every batch (:class:`ShardedLoader`). DDP averages
  the ranks' gradients, so a step is the single-process step of that global batch (BatchNorm
  statistics aside). Because the generator advances identically at any process count, a checkpoint
  written by 4 ranks resumes on 1 (or 8) with the same data order.
- Only rank 0 writes files (``RunDir.writer``); every rank reads them, so RUN_DIR must be on a
  filesystem that all nodes see. Ranks meet at a barrier after every file other ranks will read.
- Masks are computed on every rank from identical weights and their checksums compared
  (:meth:`Distributed.agree`); weights are compared the same way before each level is saved.
- Evaluation: each rank scores its slice of every test batch; the counts are summed over all ranks,
  so the accuracy is over the whole test set.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from compressor.train.data import TensorLoader
from compressor.train.devices import resolve_device
from compressor.errors import CompressorError, ConfigError

Batch = Tuple[torch.Tensor, torch.Tensor]



class DistributedError(CompressorError):
    """The ranks of a distributed run disagree (diverged weights or masks, a RUN_DIR some cannot see)."""


# Long enough for rank 0 to evaluate and write a big checkpoint while the others wait at a barrier.
TIMEOUT = datetime.timedelta(minutes=30)


def env_world_size() -> int:
    """The process count torchrun announced (``WORLD_SIZE``), 1 when not launched by torchrun."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError as error:
        raise ConfigError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from error


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """Each process on a multi-GPU node drives the GPU numbered by its ``LOCAL_RANK``."""
    if device.type != "cuda":
        return device
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices here: "
                          "start at most one process per GPU (--nproc_per_node)")
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def session(device_name: str = "auto") -> Iterator[None]:
    """Join torchrun's process group for the duration of the block (nothing when not under torchrun).

    The backend follows the device: ``nccl`` for CUDA, ``gloo`` for the CPU. The rendezvous
    (address, port, rank, world size) comes from the environment torchrun sets.
    """
    if env_world_size() == 1 or dist.is_initialized():
        yield
        return
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; run without torchrun")
    device = rank_device(resolve_device(device_name), _local_rank())
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before init, so NCCL binds each rank to its own GPU
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def current(device: torch.device) -> "Distributed":
    """The distributed context of this process: the initialised process group, or a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return Distributed(device=device)
    return Distributed(world_size=dist.get_world_size(), rank=dist.get_rank(), local_rank=_local_rank(),
                       device=rank_device(device, _local_rank()))


def is_main_process() -> bool:
    """False only on the ranks other than 0 of an initialised process group (they print nothing)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def require_shared(path: Path, rank: int) -> None:
    """``DistributedError`` unless this rank sees ``path``, which rank 0 has just written."""
    if not path.is_file():
        raise DistributedError(f"rank {rank} cannot see {path}, which rank 0 wrote: RUN_DIR must be on a "
                               "filesystem that every node shares")


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """A checksum of named tensors (names, dtypes, shapes and bytes), independent of their device."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Distributed:
    """Who this process is in the job, and the few collective operations the pipeline needs.

    Every method is a no-op (or the identity) for a single process, so the pipeline calls them
    unconditionally.
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def active(self) -> bool:
        """True when several processes share the work."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files, prints and shows progress bars."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every rank gets here (e.g. until rank 0 has written a file the others read)."""
        if self.active:
            dist.barrier()

    def wrap(self, model: nn.Module) -> nn.Module:
        """``DistributedDataParallel(model)`` for training; the model itself for one process.

        The wrapper shares the model's parameters, so masks and optimizers built on the model apply.
        """
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def shard(self, loader: Iterable[Batch], train: bool) -> Iterable[Batch]:
        """This rank's share of ``loader`` (see :class:`ShardedLoader`); the loader itself for one process."""
        if not self.active:
            return loader
        if not isinstance(loader, TensorLoader):
            raise ConfigError(
                f"under torchrun the data must be in-memory (digits, cifar10:DIR, or a factory returning "
                f"map-style datasets); a {type(loader).__name__} cannot be split between ranks")
        if train and loader.batch_size < self.world_size:
            raise ConfigError(f"--batch-size {loader.batch_size} is the global batch: it must be at least "
                              f"the number of processes ({self.world_size})")
        return ShardedLoader(loader, self.rank, self.world_size, drop_small=train)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over all ranks (float64 on the CPU in, the same out)."""
        if not self.active:
            return values
        # NCCL reduces only CUDA tensors; gloo takes CPU ones.
        moved = values.to(self.device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        return moved.cpu()

    def agree(self, what: str, tensors: Mapping[str, torch.Tensor]) -> List[str]:
        """Every rank's checksum of its ``tensors`` (by rank), after checking that they are all equal.

        Raises ``DistributedError`` naming the ranks that differ from rank 0.
        """
        checksum = tensors_sha256(tensors)
        if not self.active:
            return [checksum]
        everyone: List[Optional[str]] = [None] * self.world_size
        dist.all_gather_object(everyone, checksum)
        differ = [rank for rank, other in enumerate(everyone) if other != everyone[0]]
        if differ:
            raise DistributedError(f"the ranks' {what} diverged: ranks {differ} differ from rank 0 "
                                   f"(different data or code on some node?)")
        return [str(c) for c in everyone]

    def broadcast_state(self, model: nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers.

        DDP keeps the parameters equal, but each rank updates its BatchNorm statistics from its own
        slice; after this, every rank evaluates (and prunes) exactly the model rank 0 saves.
        """
        if not self.active:
            return
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor.data, src=0)


class ShardedLoader:
    """One rank's contiguous ``1/world`` slice of every batch of a :class:`TensorLoader`.

    The wrapped loader still draws (and augments) whole global batches, so its generator advances
    exactly as in a single process: the batch sequence is the same at any process count, which is
    what lets a run resume with a different number of processes. Augmenting the whole batch on every
    rank costs little next to the forward and backward passes.

    Training (``drop_small``): a last batch smaller than the process count is skipped by every rank
    (some rank would get nothing, and DDP needs every rank in every step). Evaluation never skips:
    ranks simply yield nothing for an empty slice.
    """

    def __init__(self, loader: TensorLoader, rank: int, world_size: int, drop_small: bool) -> None:
        self.loader, self.rank, self.world_size, self.drop_small = loader, rank, world_size, drop_small

    @property
    def generator(self) -> Optional[torch.Generator]:
        """The wrapped loader's generator: checkpoints save it, and it is the same on every rank."""
        return self.loader.generator

    @property
    def batch_size(self) -> int:
        """The global batch size."""
        return self.loader.batch_size

    def __len__(self) -> int:
        steps = len(self.loader)
        last = len(self.loader.inputs) - (steps - 1) * self.loader.batch_size
        return steps - 1 if self.drop_small and last < self.world_size else steps

    def __iter__(self) -> Iterator[Batch]:
        for inputs, labels in self.loader:
            size = len(labels)
            if self.drop_small and size < self.world_size:
                continue
            start, stop = _slice(size, self.rank, self.world_size)
            if start < stop:
                yield inputs[start:stop], labels[start:stop]


def _slice(size: int, rank: int, world_size: int) -> Tuple[int, int]:
    """``[start, stop)`` of rank's share of ``size`` items; shares differ by at most one item."""
    base, extra = divmod(size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)
