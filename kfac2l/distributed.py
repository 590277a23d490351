"""Data-parallel training on PyTorch's own engine (``torch.distributed``, DDP): docs/distributed.md.

One process per device, launched by ``torchrun`` on one machine or as SLURM tasks on a cluster
(``init_from_env`` reads either environment). Every process holds the whole (in-memory) data set
and draws the same mini-batch and the same Fisher-batch indices from generators seeded alike;
it then takes its contiguous shard of each (``DataParallel.shard``):

* gradients: the loss on the shard, backward through ``DistributedDataParallel`` (which averages
  the gradients over processes; the shard's loss is weighted so that the average is the gradient
  of the whole mini-batch's mean loss even when the shards are unequal);
* curvature: the Fisher pass on the shard; the targets are sampled from the outputs of the whole
  Fisher batch (gathered), so the union of the shards is the single-process Fisher batch, targets
  included; every sum over its samples is completed by ``DataParallel.reduce`` (an all-reduce),
  which the preconditioner calls (``CurvaturePreconditioner(reduce=...)``, ``FisherShard``).

Everything after the reductions (eigendecompositions, coarse solves, the KL-clip product) is
computed redundantly on every process from identical inputs, so the processes stay in step
without further communication.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from kfac2l.curvature.likelihood import sample_targets
from kfac2l.optim.step import Task, autocast_forward, batchnorm_statistics_kept, fisher_inputs

BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class Placement:
    """This process's place: global rank, number of processes, rank on its node."""

    rank: int
    world: int
    local_rank: int


def placement_from_env(env=os.environ) -> Placement | None:
    """The placement ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK) or a SLURM task (SLURM_PROCID,
    SLURM_NTASKS, SLURM_LOCALID) gives this process; None outside both."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return Placement(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return Placement(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[03-05,09],cpu1' -> 'gpu03'."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = head.group(1), head.group(3)
    return prefix if ranges is None else prefix + ranges.split(",")[0].split("-")[0]


def rendezvous_env(env=os.environ) -> dict:
    """MASTER_ADDR / MASTER_PORT for a SLURM task that ``torchrun`` did not set: the job's first
    node, and a port derived from the job id (the same on every task of the job)."""
    out = {}
    if "MASTER_ADDR" not in env and "SLURM_JOB_NODELIST" in env:
        out["MASTER_ADDR"] = first_host(env["SLURM_JOB_NODELIST"])
    if "MASTER_PORT" not in env and "SLURM_JOB_ID" in env:
        out["MASTER_PORT"] = str(15000 + int(env["SLURM_JOB_ID"]) % 20000)
    return out


def init_from_env(backend: str = "auto", device: str = "auto", timeout_s: int = 1800) -> DataParallel:
    """Join the process group of this launch (torchrun or SLURM tasks) and choose the device:
    ``cuda:<local rank>`` when CUDA is used (modulo the GPUs this process sees), else the CPU;
    backend 'auto' is nccl on CUDA, gloo on the CPU."""
    where = placement_from_env()
    if where is None:
        raise RuntimeError("distributed.enabled=true but neither torchrun (RANK, WORLD_SIZE) nor SLURM "
                           "(SLURM_PROCID, SLURM_NTASKS) set this process's rank; see docs/distributed.md")
    os.environ.update(rendezvous_env())
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    # one GPU per process: cuda:<local rank>, or cuda:0 where SLURM binds each task to its own GPU
    chosen = torch.device(f"cuda:{where.local_rank % torch.cuda.device_count()}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(chosen)
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=where.rank, world_size=where.world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DataParallel(chosen)


class DataParallel:
    """This process's part of data-parallel training (an initialised default process group);
    ``device`` the one its model lives on. ``control``: a gloo group for the CPU flags (stop
    requests, barriers), so that they never synchronise a GPU stream."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device, self.backend = torch.device(device), dist.get_backend()
        self.control = dist.new_group(backend="gloo") if self.backend != "gloo" else None
        self.module: nn.Module | None = None
        self.ddp: nn.Module | None = None

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the processes, in place; returns it (the preconditioner's hook)."""
        dist.all_reduce(t)
        return t

    def shard(self, n: int) -> slice:
        """This process's contiguous part of n items (sizes differ by at most one)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def gather(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """The n rows of which every process holds its ``shard(n)``, on every process."""
        size = -(-n // self.world)
        padded = t.new_zeros(size, *t.shape[1:])
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        base, extra = divmod(n, self.world)
        return torch.cat([p[: base + (r < extra)] for r, p in enumerate(parts)])

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any process (a one-number all-reduce on the CPU)."""
        t = torch.tensor([float(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return bool(t.item())

    def barrier(self) -> None:
        """Wait for every process."""
        dist.barrier(group=self.control)

    def wrap(self, model: nn.Module, sync_batchnorm: bool = False) -> nn.Module:
        """Wrap ``model`` (already on its device) in DistributedDataParallel, BatchNorm layers
        optionally converted to SyncBatchNorm first; keeps both (``module``, ``ddp``)."""
        if sync_batchnorm:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        params = next(model.parameters())
        ids = [params.device.index] if params.device.type == "cuda" else None
        self.module, self.ddp = model, nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return model

    def training_step(self, optimizer, task: Task, x: torch.Tensor, y: torch.Tensor | None,
                      fisher_fraction: float = 0.25, generator: torch.Generator | None = None,
                      autocast: torch.dtype | None = None, resample: bool = True) -> torch.Tensor:
        """``kfac2l.optim.step.training_step`` on this process's shards of the mini-batch (x, y),
        which every process holds whole: the same Fisher batch on every process (the same generator
        state; the mini-batch itself with ``resample=False``), each process's Fisher pass on its
        slice, targets sampled from the gathered outputs of the whole Fisher batch, then the loss on
        its shard through DDP; ``autocast`` and ``optimizer.grad_scaler`` as in ``training_step``.
        Returns the whole mini-batch's loss (an all-reduce of one number; alike everywhere)."""
        target = x if task.autoencoder else y
        total = x.shape[0]
        if optimizer.needs_curvature():
            fisher_x = fisher_inputs(x, fisher_fraction, generator, resample)
            size = fisher_x.shape[0]
            mine = self.shard(size)
            with batchnorm_statistics_kept(self.module):
                # the plain module: DDP's hooks are for the loss pass
                out = autocast_forward(self.module, x.device.type, autocast)(fisher_x[mine])
                targets = sample_targets(self.gather(out.detach(), size), task.likelihood, generator)[mine]
                optimizer.update_curvature(out, task.likelihood, targets=targets, batch=size)
        optimizer.zero_grad()
        rows = self.shard(total)
        share = (rows.stop - rows.start) / total
        loss = task.loss(autocast_forward(self.ddp, x.device.type, autocast)(x[rows]), target[rows])
        weighted = loss * (share * self.world)  # DDP averages: the gradient of the whole batch's mean loss
        scaler = optimizer.grad_scaler
        (weighted if scaler is None else scaler.scale(weighted)).backward()
        optimizer.step()
        return self.reduce(loss.detach() * share)
