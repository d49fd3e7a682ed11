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

import importlib
import os
import time
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
        # Before the group exists: torch.distributed.nn.functional binds `group=group.WORLD` as a default
        # argument of its collectives when it is first imported. transformers imports it lazily (through
        # torch.distributed.fsdp -> torch.distributed._shard) the first time a model class is touched,
        # which is after this call in train.py and tests/torchrun_worker.py; imported then, those defaults
        # hold the default group and destroy_process_group can no longer free it (see shutdown).
        # Imported now, they hold None.
        importlib.import_module("torch.distributed.nn.functional")
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, torch.device(f"cuda:{local}" if cuda else "cpu"))


_GLOO_THREADS = ("gloo_tcp_loop", "pt_gloo_runloop")  # thread names set by gloo and by ProcessGroupGloo


def _gloo_threads() -> list:
    """Names of this process's threads that belong to a gloo backend (Linux /proc; [] elsewhere)."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return []
    names = []
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        if name in _GLOO_THREADS:
            names.append(name)
    return names


def shutdown(d: Dist) -> None:
    """Leave the process group; the last distributed call of every rank (train.py, tests/torchrun_worker.py).

    The backend must be gone when this returns, not at interpreter exit. ProcessGroupGloo has no shutdown
    of its own: destroy_process_group frees it only when it drops the last reference to the group, and
    then its destructor drains the work queue and joins gloo's threads (2 `pt_gloo_runloop` workers, the
    `gloo_tcp_loop`). If something else still holds the group, those threads outlive main() and a worker
    can still be releasing its last finished work (a barrier holds the collectives before it, and their
    tensors) while Python finalizes. Releasing a tensor that has a Python object takes the GIL; a thread
    that asks for the GIL during finalization is ended with pthread_exit, whose forced unwinding through
    torch's noexcept destructors calls std::terminate: "terminate called without an active exception",
    SIGABRT, from a rank that had finished its work (seen under CPU load in the torchrun test).
    """
    if not (d.active and dist.is_initialized()):
        return
    dist.destroy_process_group()
    # The destructor has joined them; a joined thread can still be listed for a moment while the kernel
    # finishes its exit, so look again briefly before calling it a leak.
    deadline = time.monotonic() + 5.0
    while (left := _gloo_threads()) and time.monotonic() < deadline:
        time.sleep(0.01)
    if left:
        raise RuntimeError(
            f"gloo threads {left} are still running after "
            "destroy_process_group, so something still holds the process group (e.g. a module that bound "
            "group.WORLD as a default argument when imported after init_process_group); they would be torn "
            "down during interpreter exit, where they can abort the process")
