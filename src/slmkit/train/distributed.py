"""torch.distributed for the Trainer: one process per rank under ``torchrun``, gloo on CPU.

The same entry point runs alone or under ``torchrun --nproc_per_node=N``; the environment torchrun sets
(``WORLD_SIZE``, ``RANK``) decides. Two ways to spread the model: DDP (a full copy per rank, gradients
averaged) and FSDP (``fully_shard``: parameters, gradients and optimizer state sharded per block).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    mode: str = "none"  # none | ddp | fsdp
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def pick_device(name: str) -> torch.device:
    """``auto``: a CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        from ..errors import SlmError

        raise SlmError("run.device is cuda but torch sees no CUDA GPU")
    return torch.device(name)


def init_distributed(mode: str, device: str = "cpu") -> Dist:
    """Join the process group when launched by torchrun (gloo on CPU, NCCL on GPUs), else one process."""
    dev = pick_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if world <= 1:
        return Dist(device=dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), mode=mode, device=dev)


def wrap(module: nn.Module, blocks: list[nn.Module], d: Dist, frozen: list[nn.Module] = ()) -> nn.Module:
    """``module`` (the loss module holding the model) wrapped for ``d.mode``; the ``frozen`` modules inside it
    (teachers) are left alone: a full copy on every rank, never synchronised or sharded."""
    ignored = {p for m in frozen for p in m.parameters()}
    if d.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        names = [n for n, p in module.named_parameters() if p in ignored]
        names += [n for n, b in module.named_buffers() if any(b is x for m in frozen for x in m.buffers())]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
        return DistributedDataParallel(module, device_ids=[d.device] if d.device.type == "cuda" else None)
    if d.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in blocks:
            fully_shard(block)
        fully_shard(module, ignored_params=ignored or None)
        return module
    return module


def set_grad_sync(module: nn.Module, d: Dist, enabled: bool):
    """Turn off gradient communication for the micro-batches of an accumulation step but the last."""
    if d.mode == "fsdp":
        module.set_requires_gradient_sync(enabled)
    elif d.mode == "ddp":
        module.require_backward_grad_sync = enabled


def shutdown(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
