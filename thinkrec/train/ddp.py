"""Data parallelism over ranks: one global batch is split into contiguous shards, one per rank.

Started by `torchrun --nproc-per-node G train.py ...` (RANK / WORLD_SIZE / LOCAL_RANK in the environment):
NCCL on GPUs, gloo on CPUs. Each rank computes its shard's loss as a sum over its rows divided by the
GLOBAL batch's row and token counts (thinkrec/train/losses.py), so summing the gradients over ranks gives
exactly the gradient of the whole batch's loss, also when shards differ in size. Only trainable
parameters are reduced, once per optimizer step (after gradient accumulation), in one flat buffer: LoRA
gradients are ~0.4M numbers for SmolLM2 and 3.4M for Llama-3-8B at r=8, so one all-reduce per step costs
far less than the step and overlapping it with the backward (what torch DDP's buckets buy) is not worth
its constraints (no layer swapping inside forward, no_sync for accumulation).
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def all_reduce_grads(self, params) -> None:
        """grad <- sum over ranks (parameters without a grad this step count as zeros)."""
        if not self.active:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        off = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[off:off + n].view_as(p).to(p.dtype)
            off += n

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def init_from_env() -> Dist:
    """Join the process group torchrun describes; a single process without torchrun gets Dist()."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world <= 1:
        return Dist(0, 1, torch.device("cuda" if cuda else "cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, torch.device(f"cuda:{local}" if cuda else "cpu"))


def shutdown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()
