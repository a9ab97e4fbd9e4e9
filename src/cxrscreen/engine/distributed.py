"""Multi-process training with DistributedDataParallel, started by torchrun.

`torchrun --nproc_per_node N -m cxrscreen.training --data ... --split ... --out RUN` (or
`cxrscreen train --nproc N ...`, which launches that) runs `training.train.train` in N processes. `context()`
reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and joins the process group:
gloo on the CPU, nccl when the run's device is CUDA (one GPU per process, cuda:LOCAL_RANK). Outside
torchrun it returns a single-process context whose every method is the identity, so `train` has one code
path.

What changes with N processes (everything else is the single-process recipe):

- every process loads the same train/val images (through the shared preprocessing cache) and draws the
  same epoch order from the same seeded generator; :class:`DistributedEpochSampler` gives process r the
  positions r, r + N, ... of that order (the tail that does not divide by N is dropped so every process runs
  the same number of steps). This keeps the recipe's own sampling (balanced sampling, the per-epoch image
  cap) and its resumability (the order comes from the generator state in checkpoint.pt), which torch's
  DistributedSampler, seeded by epoch number and always uniform, would not;
- `cfg.batch_size` stays the global batch: each process takes batch_size // N, so the learning rate of a
  recipe means the same at any N (DDP averages the gradients);
- the train loss is summed over processes (loss x images, images); validation is split over processes
  and the logits gathered in the original order, so every val figure is that of the whole val set;
- a time budget is decided by rank 0 and broadcast, so all processes stop at the same step;
- only rank 0 writes (history.csv, model.safetensors, config.json, checkpoint.pt, logs, progress bars);
  the others wait at a barrier and read back what it wrote. The run directory is the single-process one
  (plus `config["distributed"]`: world size and backend) and resumes the same way; with several nodes it
  must be on a file system every node sees.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from cxrscreen.errors import CXRError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def under_torchrun() -> bool:
    """True in a process started by torchrun (its environment names the rank and world size)."""
    return all(v in os.environ for v in TORCHRUN_VARS)


class DistributedEpochSampler(Sampler[int]):
    """Process `rank`'s share of another sampler's epoch: positions rank, rank + world, ... of its order,
    after dropping the last len % world positions (equal step counts on every process)."""

    def __init__(self, base: Sampler[int], rank: int, world: int) -> None:
        self.base, self.rank, self.world = base, rank, world

    def __iter__(self) -> Iterator[int]:
        order = list(self.base)
        order = order[: len(order) - len(order) % self.world]
        return iter(order[self.rank :: self.world])

    def __len__(self) -> int:
        n = len(self.base) if isinstance(self.base, Sized) else 0
        return n // self.world


@dataclass
class DistContext:
    """Where this process stands in the job; world == 1 means a plain single-process run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """The process's device: cuda:LOCAL_RANK for a CUDA run, else `device` unchanged."""
        if self.enabled and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def info(self) -> dict[str, Any] | None:
        """What config.json records about the job (None for a single process)."""
        return {"world_size": self.world, "backend": self.backend} if self.enabled else None

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def local_batch(self, batch_size: int) -> int:
        """The per-process share of a global batch."""
        if self.enabled and batch_size < self.world:
            raise CXRError(f"batch_size {batch_size} is smaller than the {self.world} processes")
        return max(1, batch_size // self.world)

    def wrap(self, model: nn.Module, device: torch.device, *, staged: bool = False) -> nn.Module:
        """The model the training steps call: DistributedDataParallel around `model` when distributed.
        `model` itself stays the module that is saved, evaluated and frozen (no "module." prefixes).
        staged: some epochs freeze parameters (linear probing), which DDP must be told to expect."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=staged)

    def sampler(self, base: Sampler[int]) -> Sampler[int]:
        return DistributedEpochSampler(base, self.rank, self.world) if self.enabled else base

    def sum(self, *values: float) -> list[float]:
        """Element-wise sums over processes."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().tolist()

    def mean_loss(self, mean_loss: float, seen: int) -> tuple[float, int]:
        """(loss averaged over every process's images, images seen by all processes)."""
        total, n = self.sum(mean_loss * seen, float(seen))
        return total / max(n, 1.0), int(n)

    def agreed(self, flag: Callable[[], bool] | None) -> Callable[[], bool] | None:
        """A deadline every process answers alike: rank 0's answer, broadcast at each call."""
        if flag is None or not self.enabled:
            return flag

        def check() -> bool:
            t = torch.tensor([1.0 if (self.is_main and flag()) else 0.0], device=self._comm_device())
            dist.broadcast(t, src=0)
            return bool(t.item())

        return check

    def _comm_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def check_same(self, value: Any, what: str) -> None:
        """CXRError on every process when `value` differs between processes (e.g. the epoch they resume at)."""
        if not self.enabled:
            return
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        if any(v != values[0] for v in values):
            raise CXRError(f"the processes disagree on {what} ({values}); with several nodes the run directory "
                           "must be on a file system that every node sees")

    def evaluate_epoch(self, model: nn.Module, loader: DataLoader, criterion: nn.Module, *,
                       device: torch.device) -> tuple[float, np.ndarray, np.ndarray]:
        """`engine.evaluate_epoch` over the whole val set, each process predicting a 1/world slice."""
        from cxrscreen.engine.validation import evaluate_epoch, predict_logits

        if not self.enabled:
            return evaluate_epoch(model, loader, criterion, device=device)
        dataset: Dataset = loader.dataset
        n = len(dataset)  # type: ignore[arg-type]
        mine = list(range(self.rank, n, self.world))
        part = DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=loader.batch_size)
        logits, labels = predict_logits(model, part, device=device)
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, (mine, logits, labels))
        idx = np.concatenate([np.asarray(g[0], dtype=np.int64) for g in gathered])
        if not len(idx):
            return float("nan"), np.zeros((0, 0), np.float32), np.zeros((0,), np.int64)
        all_logits = np.concatenate([g[1] for g in gathered if len(g[0])])
        all_labels = np.concatenate([g[2] for g in gathered if len(g[0])])
        order = np.argsort(idx, kind="stable")
        t_logits, t_labels = torch.from_numpy(all_logits[order]), torch.from_numpy(all_labels[order])
        loss = float(criterion(t_logits, t_labels))
        return loss, torch.softmax(t_logits, 1).numpy(), t_labels.numpy()


_CONTEXT: DistContext | None = None


def context(device: str = "auto") -> DistContext:
    """This process's DistContext; under torchrun (WORLD_SIZE > 1) the process group is joined on the first
    call: nccl when `device` is cuda (or auto with a GPU), else gloo."""
    global _CONTEXT
    if _CONTEXT is not None:
        return _CONTEXT
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        _CONTEXT = DistContext()
        return _CONTEXT
    rank, world, local = (int(os.environ[v]) for v in TORCHRUN_VARS)
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    _CONTEXT = DistContext(rank=rank, world=world, local_rank=local, backend=backend)
    return _CONTEXT


def shutdown() -> None:
    """Leave the process group (end of a torchrun process)."""
    global _CONTEXT
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CONTEXT = None


def torchrun_command(nproc: int, train_args: list[str]) -> list[str]:
    """The command `cxrscreen train --nproc N` runs: torchrun on this machine with the other arguments."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "cxrscreen.training", *train_args]


def launch_torchrun(nproc: int, train_args: list[str]) -> int:
    """Run `torchrun_command` and return its exit status."""
    import subprocess

    return subprocess.call(torchrun_command(nproc, train_args))
