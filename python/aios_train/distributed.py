"""Data-parallel training on an existing engine: PyTorch DistributedDataParallel under `torchrun` (gloo on CPU,
NCCL on CUDA).

    torchrun --standalone --nproc-per-node 2 -m aios_train train --out runs/x ...

Every rank holds the whole model and draws the same global batch and the same noise (one seeded generator, as in a
one-process run), then runs forward and backward on its contiguous shard of the batch; DDP averages the gradients,
so every rank takes the same optimiser step and a run on N processes follows the one-process run with the same
global batch (up to float summation order). Rank 0 alone logs and checkpoints; every rank resumes from the same
checkpoint. Without torchrun (no WORLD_SIZE), everything is the plain one-process path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: int) -> slice:
        """This rank's contiguous part of a global batch of `batch` (which the world size divides)."""
        per = batch // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def mean(self, x: float) -> float:
        """The mean of `x` over ranks (a loss for the log)."""
        if self.world == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def any(self, flag: bool) -> bool:
        """Whether any rank says so (a time limit reached on one rank stops all of them together)."""
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module forward and backward go through: DDP across ranks, the model itself alone."""
        if self.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def average_gradients(self, params) -> None:
        """DDP's gradient mean, by hand, for training that does not go through the module's `forward` (a
        ControlNet hook, the canvas forward of `aios_train.lcm`)."""
        if self.world == 1:
            return
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str = "cpu") -> Dist:
    """Joins the process group torchrun set up (WORLD_SIZE, RANK, LOCAL_RANK), or runs alone."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: no CUDA device is visible to PyTorch")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device, local) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return Dist(rank=rank, world=world, device=dev)


def run(a, body, resume: bool = True):
    """The entry of the training commands `train`, `distill` and `controlnet`: threads and seed
    from the run config `a`, join the process group, run `body(a, resume, dist)`, always leave the group."""
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    d = setup(a.device)
    try:
        return body(a, resume, d)
    finally:
        d.close()


def end_of_step(step: int, a, dist: Dist, invocation_start: float, checkpoint) -> bool:
    """After global step `step` (0-based) of a run config `a` (steps, ckpt_every, time_limit_min, optional
    stop_after): checkpoints every `ckpt_every` steps and at the last; returns True, having checkpointed, when the
    run must stop early (`stop_after` reached, or `time_limit_min` on any rank)."""
    import time

    from tqdm import tqdm
    last = step + 1 == a.steps
    stop_after = getattr(a, "stop_after", None)
    if stop_after is not None and step + 1 >= stop_after and not last:
        checkpoint()
        return True
    out_of_time = a.time_limit_min is not None and time.time() - invocation_start > 60 * a.time_limit_min
    if a.time_limit_min is not None and dist.any(out_of_time) and not last:
        if dist.main:
            tqdm.write(f"time limit {a.time_limit_min} min reached at step {step + 1}; checkpointing and stopping")
        checkpoint()
        return True
    if (step + 1) % a.ckpt_every == 0 or last:
        checkpoint()
    return False


__all__ = ["Dist", "setup", "run", "end_of_step"]
