"""torch.distributed, when onnxbn runs under `torchrun`; a single process otherwise.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; `world()` reads them and starts the
process group on first use and destroys it at exit: gloo, and nccl for CUDA tensors too when every
rank on the machine has a GPU of its own (`cpu:gloo,cuda:nccl`: a run on the CPU, `--device cpu` on a
GPU machine, and the object gathers of statistics stay on gloo).
Rank 0 alone writes outputs and logs.
"""

from __future__ import annotations

import atexit
import os


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        import torch

        backend = "gloo"
        if gpu_per_rank() and os.environ.get("ONNXBN_BACKEND", "") != "gloo":
            backend = "cpu:gloo,cuda:nccl"
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        # the group's threads are joined before the interpreter's teardown (left running, a rank could end
        # with "terminate called without an active exception")
        atexit.register(dist.destroy_process_group)
    return dist.get_rank(), dist.get_world_size()


def gpu_per_rank() -> bool:
    """True when torch sees a GPU for each of this machine's ranks (torchrun's LOCAL_WORLD_SIZE; one outside it)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


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


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum of `values` over the ranks."""
    return [sum(v) for v in zip(*gather(list(values)), strict=True)]


def sync_batchnorm_class():
    """A BatchNorm that normalises with the statistics of the global batch on every backend.

    torch's nn.SyncBatchNorm needs GPUs; this one also runs on gloo (CPU). In training,
    per channel: mean = sum_ranks(sum x) / n, var = sum_ranks(sum (x - mean)^2) / n,
    through differentiable all-reduces, so gradients see the global batch exactly as
    one process with the whole batch would. Running statistics follow torch's BN
    (momentum, unbiased variance). Outside torchrun, and in eval, it is plain BN.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
        def _check_input_dim(self, input):  # noqa: A002 - torch's name
            if input.dim() < 2:
                raise ValueError(f"expected at least 2D input (got {input.dim()}D)")

        def forward(self, x):
            # converted BNs are imported ones (torch_import): a float momentum, running statistics tracked
            assert self.momentum is not None, "GlobalBatchNorm needs a float momentum"
            if not self.training or world()[1] == 1:
                return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                    self.training, self.momentum, self.eps)
            from torch.distributed.nn.functional import all_reduce

            dims = [0] + list(range(2, x.dim()))
            shape = [1, -1] + [1] * (x.dim() - 2)
            count = all_reduce(torch.tensor([float(x.numel() // x.shape[1])], device=x.device))
            mean = all_reduce(x.sum(dims)) / count
            var = all_reduce(((x - mean.view(shape)) ** 2).sum(dims)) / count
            with torch.no_grad():
                assert self.running_mean is not None and self.running_var is not None \
                    and self.num_batches_tracked is not None, "GlobalBatchNorm tracks running statistics"
                self.num_batches_tracked += 1
                self.running_mean.mul_(1 - self.momentum).add_(mean.detach(), alpha=self.momentum)
                unbiased = var.detach() * count / (count - 1).clamp_min(1)
                self.running_var.mul_(1 - self.momentum).add_(unbiased, alpha=self.momentum)
            y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
            return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y

    return GlobalBatchNorm


def convert_sync_batchnorm(module) -> int:
    """Replace every BatchNorm submodule of `module` in place by the global-batch one; returns how many."""
    from torch import nn

    cls = sync_batchnorm_class()
    replaced = 0
    for name, child in list(module.named_modules()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, cls):
            new = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.to(next(child.buffers()).device)
            parent_name, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, attr, new)
            replaced += 1
    return replaced
