"""Work shared by the processes of a multi-process launch (``accelerate launch``, ``torchrun``):
feature extraction split between them, and decisions the first process makes for all.

A launch is recognised by its environment (``WORLD_SIZE`` above 1). The process group is
started on first use, NCCL on GPUs (each process on the GPU of its ``LOCAL_RANK``) and gloo on
CPUs, unless training started it already. Outside a launch every function here is a no-op.
"""

from __future__ import annotations

import math
import os
from typing import TypeVar, cast

import numpy as np
import torch

T = TypeVar("T")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def launched() -> bool:
    """True in a multi-process launch, with its process group started."""
    if world_size() <= 1:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def shard(n: int) -> range:
    """The rows of ``n`` this process embeds: contiguous blocks, in rank order."""
    step = math.ceil(n / world_size())
    return range(min(n, rank() * step), min(n, (rank() + 1) * step))


def gather_rows(local: np.ndarray, n: int) -> np.ndarray:
    """Every process's ``local`` rows (its ``shard(n)``) in order, on every process."""
    import torch.distributed as dist

    step = math.ceil(n / world_size())
    device = _device()
    padded = torch.zeros((step, *local.shape[1:]), dtype=_torch_dtype(local.dtype), device=device)
    padded[: len(local)] = torch.from_numpy(local).to(device)
    buffer = torch.empty((world_size() * step, *local.shape[1:]), dtype=padded.dtype, device=device)
    dist.all_gather(list(buffer.chunk(world_size())), padded)
    return buffer[:n].cpu().numpy()


def from_first(value: T) -> T:
    """The first process's ``value`` (a small picklable object) on every process."""
    if not launched():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0, device=_device())
    return box[0]


def share_array(array: np.ndarray | None) -> np.ndarray:
    """The first process's ``array`` on every process (the others pass None)."""
    if not launched():
        return cast(np.ndarray, array)
    import torch.distributed as dist

    shape, dtype = from_first(None if array is None else (array.shape, array.dtype.str))
    device = _device()
    if rank() == 0:
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(device)
    else:
        tensor = torch.empty(shape, dtype=_torch_dtype(np.dtype(dtype)), device=device)
    dist.broadcast(tensor, src=0)
    return tensor.cpu().numpy()


def _device() -> torch.device:
    """Where collectives take tensors: the process's GPU under NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype
