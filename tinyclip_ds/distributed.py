"""Everything the library asks of the process group, in one place.

Every helper works without an initialised process group, as the single rank it then is, and
issues no collective at all when there is one rank: a one-process run pays for none of them.
Tests and tools can therefore call evaluation, checkpointing and the losses directly.
"""

from __future__ import annotations

import os
import socket
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if world() > 1 else 0


def barrier() -> None:
    """Wait for every rank."""
    if world() > 1:
        dist.barrier()


def all_true_and_sum(flag: bool, count: int, device: torch.device) -> tuple[bool, int]:
    """(``flag`` true on every rank, ``count`` summed over ranks), in one all-reduce."""
    if world() == 1:
        return flag, count
    value = torch.tensor([0.0 if flag else 1.0, float(count)], device=device)
    dist.all_reduce(value)
    return value[0].item() == 0, int(value[1].item())


def all_true(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` holds on every rank."""
    return all_true_and_sum(flag, 0, device)[0]


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over ranks."""
    if world() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest ``value`` of any rank."""
    if world() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def gather_objects(value) -> list:
    """Every rank's ``value`` (any picklable object), in rank order."""
    if world() == 1:
        return [value]
    gathered = [None] * world()
    dist.all_gather_object(gathered, value)
    return gathered


def sum_counters(*counters: Counter) -> list[Counter]:
    """Each counter summed over ranks (one gather of small objects)."""
    gathered = gather_objects(list(counters))
    return [sum((ranks[i] for ranks in gathered), Counter()) for i in range(len(counters))]


def gather_uneven(local: Tensor) -> list[Tensor]:
    """Every rank's ``local``, whose first dimension may differ between ranks, in rank order."""
    if world() == 1:
        return [local]
    size = torch.tensor([local.shape[0]], device=local.device)
    sizes = [torch.zeros_like(size) for _ in range(world())]
    dist.all_gather(sizes, size)
    longest = max(int(s.item()) for s in sizes)
    padded = torch.cat([local, local.new_zeros((longest - local.shape[0], *local.shape[1:]))])
    gathered = [torch.empty_like(padded) for _ in range(world())]
    dist.all_gather(gathered, padded.contiguous())
    return [part[:int(s.item())] for part, s in zip(gathered, sizes)]


def collective_device() -> torch.device:
    """Where tensors must be for a collective: NCCL moves only CUDA tensors, gloo only CPU ones."""
    if world() > 1 and dist.get_backend() == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for each rank's rows.

    Written with all_gather + all_reduce rather than reduce_scatter because gloo has no
    reduce_scatter; ranks may hold different numbers of rows."""

    @staticmethod
    def forward(ctx, local: Tensor) -> Tensor:
        parts = gather_uneven(local)
        ctx.sizes = [len(part) for part in parts]
        ctx.rank = rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]]


def gather_with_grad(local: Tensor) -> Tensor:
    """Every rank's rows concatenated in rank order; gradients flow back to the rows' owners."""
    if world() == 1:
        return local
    return _GatherWithGrad.apply(local)


def gather(local: Tensor) -> Tensor:
    """Every rank's rows concatenated in rank order, without gradient (bool tensors too)."""
    if world() == 1:
        return local
    with torch.no_grad():
        if local.dtype == torch.bool:  # all_gather of bool is not supported on every backend
            return torch.cat(gather_uneven(local.to(torch.uint8))).bool()
        return torch.cat(gather_uneven(local))


def local_rows(local_count: int, device: torch.device) -> Tensor:
    """Positions of this rank's ``local_count`` rows in a batch gathered in rank order."""
    if world() == 1:
        return torch.arange(local_count, device=device)
    counts = gather_uneven(torch.tensor([local_count], device=device))
    start = sum(int(c.item()) for c in counts[:rank()])
    return torch.arange(start, start + local_count, device=device)


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the process group DeepSpeed's launcher set up (or make a one-rank group); returns
    (rank, world, device)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:  # started without a launcher: a single rank
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    deepspeed.init_distributed()
    accelerator = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)
    else:
        release_shared_memory_segment(dist.get_rank())
    device = torch.device(accelerator.device_name(local_rank) if accelerator.device_name() != "cpu" else "cpu")
    return dist.get_rank(), dist.get_world_size(), device


def shutdown() -> None:
    """Collective, after this rank's last collective: wait for every rank, then destroy the
    process group while Python is still whole. A rank that exits with its gloo group alive can
    abort during interpreter finalisation, because gloo's worker threads still hold work objects
    (pytorch/pytorch#190489): SIGABRT ("terminate called without an active exception") in place
    of its exit status, as a two-rank test worker of this project once did."""
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def shared_memory_segment(rank: int) -> Path:
    """The /dev/shm segment DeepSpeed's CPU backend creates for this rank when every rank runs on
    one machine (its shared-memory all-reduce; named as in deepspeed/ops/csrc/cpu/comm/shm.cpp)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shared_memory_segment(rank: int) -> None:
    """Unlink this rank's ~70 MB shared-memory segment as soon as every rank has mapped it.

    DeepSpeed never unlinks it, so each CPU job would leave 70 MB × ranks of RAM in /dev/shm
    until the machine reboots. After the barrier every rank has mapped every segment (DeepSpeed
    maps its peers' inside init_distributed), so the mappings stay valid and the kernel frees
    the memory when the last rank exits, however it exits."""
    dist.barrier()
    shared_memory_segment(rank).unlink(missing_ok=True)
