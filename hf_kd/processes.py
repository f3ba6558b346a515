"""The processes of a distributed run, for state that every process must hold alike (a memory bank, a random draw).

Read from ``torch.distributed``: one process when it is not initialised. Under the trainer each process takes the
micro-batches ``rank, rank + world_size, ...`` of an optimizer step's global batch (accelerate's batch sharding), so
the ``d``-th micro-batch of process ``rank`` is micro-batch ``(d - 1) * world_size + rank + 1`` of the step, the one a
single process with ``world_size`` times the gradient accumulation would run at that position.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_count() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def close_process_group() -> None:
    """Destroy the default process group, if one is up: the last call of a script that ran on several processes.
    Without it gloo's worker threads outlive the interpreter and a process can abort (SIGABRT) while exiting, after
    its work is done. Call it only when every process finished normally: it waits for the others."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no process tears its connections down while another still talks to it
        dist.destroy_process_group()


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The rows of ``tensor`` from every process, concatenated in rank order (``tensor`` itself with one process).
    Processes may hold different numbers of rows. Not differentiable: for state updates."""
    rank, count = rank_and_count()
    if count == 1:
        return tensor
    sizes = [torch.zeros((), dtype=torch.long, device=tensor.device) for _ in range(count)]
    dist.all_gather(sizes, torch.tensor(len(tensor), device=tensor.device))
    longest = max(int(size) for size in sizes)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: len(tensor)] = tensor
    parts = [torch.empty_like(padded) for _ in range(count)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[: int(size)] for part, size in zip(parts, sizes)])
