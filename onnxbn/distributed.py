"""torch.distributed, when onnxbn runs under `torchrun`; a single process otherwise.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; `world()` reads them and starts the
process group on first use (gloo on CPU, nccl when every rank has a GPU). Rank 0
alone writes outputs and logs.
"""

from __future__ import annotations

import os


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        import torch

        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= 1 \
            and os.environ.get("ONNXBN_BACKEND", "") != "gloo" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    return world()[0] == 0


def gather(obj) -> list:
    """Every rank's `obj`, in rank order (just [obj] outside torchrun)."""
    rank, size = world()
    if size == 1:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * size
    dist.all_gather_object(out, obj)
    return out
