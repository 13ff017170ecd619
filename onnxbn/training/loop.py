"""The training loop on cached features: epochs of Adam (or SGD) on the negative log-likelihood, over
this rank's shard, with the validation metrics before, after and between epochs."""

from __future__ import annotations

import contextlib
import logging
import os
import time

import numpy as np
import onnx

from onnxbn import distributed
from onnxbn.errors import UserError
from onnxbn.feeding import progress
from onnxbn.training.cache import Features
from onnxbn.training.outputs import are_probabilities, log_probs, output_kind

log = logging.getLogger("onnxbn")


def torch_device(device: str):
    """cuda (this rank's GPU under torchrun) when asked for or available, else cpu; 'auto' takes the
    CPU where this machine's ranks outnumber its GPUs (one GPU per rank: `distributed.gpu_per_rank`)."""
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"unknown device {device!r}: use auto, cpu or cuda")
    own_gpu = device != "cpu" and distributed.gpu_per_rank()
    if device == "cpu" or (device == "auto" and not own_gpu):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA device here; use --device cpu or auto")
    if not own_gpu:
        raise UserError(f"--device cuda: torchrun runs {os.environ.get('LOCAL_WORLD_SIZE')} ranks on this machine "
                        f"and torch sees {torch.cuda.device_count()} GPU(s): start one rank per GPU "
                        "(--nproc-per-node) or use --device cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def evaluate_suffix(suffix, feats: Features, batch_size: int, device, kind: str) -> dict:
    import torch

    suffix.eval()
    loss = correct = correct5 = 0.0
    with torch.no_grad():
        for start in range(0, len(feats.y), batch_size):
            x = torch.from_numpy(np.array(feats.x[start:start + batch_size])).to(device)  # copy off the memmap
            y = torch.from_numpy(np.array(feats.y[start:start + batch_size])).to(device)
            lp = log_probs(suffix(x), kind).float()
            loss += float(torch.nn.functional.nll_loss(lp, y, reduction="sum"))
            top = lp.topk(min(5, lp.shape[1]), dim=1).indices
            correct += float((top[:, 0] == y).sum())
            correct5 += float((top == y[:, None]).any(dim=1).sum())
    loss, correct, correct5, n = distributed.all_sum([loss, correct, correct5, float(len(feats.y))])
    n = max(n, 1.0)
    return {"loss": loss / n, "accuracy": correct / n, "top5": correct5 / n}


def suffix_output_kind(proto: onnx.ModelProto, suffix, train: Features, batch_size: int, device) -> tuple[str, str]:
    """`output_kind` for fine-tuning, decided before the first step: where the graph does not say, from the
    rows the module gives (eval mode) on the first training batch of every rank."""
    import torch

    kind = output_kind(proto)
    if kind[0] != "logits":
        return kind
    suffix.eval()
    with torch.no_grad():
        rows = suffix(torch.from_numpy(np.array(train.x[:batch_size])).to(device)).float().cpu().numpy()
    agree = distributed.all_sum([float(are_probabilities(rows))])[0] == distributed.world()[1]
    return output_kind(proto, agree)


def batch_bounds(samples: int, batch_size: int) -> list[int]:
    """Offsets of the training steps over `samples` shuffled rows: batches of `batch_size`, and a last
    batch of fewer than half of that (or of one row) merged into the one before it. A batch of one
    cannot train BatchNorm, and a tiny batch would move the running statistics that get written
    back with a noisy estimate."""
    if samples < 2:
        raise UserError(f"fine-tuning needs at least 2 training samples (got {samples}): BN cannot train on one")
    starts = list(range(0, samples, batch_size))
    if len(starts) > 1 and samples - starts[-1] < max(2, batch_size / 2):
        starts.pop()
    return starts + [samples]


def train_epochs(suffix, trainable, sets, *, epochs, lr, batch_size, seed, device, kind, optimizer, bf16) -> dict:
    """Epochs over the cached features; `batch_size` is this rank's share of the global batch."""
    import torch

    train = sets["train"]
    rank, ranks = distributed.world()
    model = suffix
    if ranks > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(suffix, device_ids=[device.index] if device.type == "cuda" else None)
    # fused: one kernel per step instead of per-tensor temporaries (about 2x faster on
    # VGG16's 123M dense parameters on a CPU). Built as the first epoch starts: none for --epochs 0
    # (building the torch optimizer imports torch._dynamo: 1.3 s).
    opt: torch.optim.Optimizer | None = None
    generator = np.random.default_rng([seed, rank])
    bounds = batch_bounds(len(train.y), batch_size)
    steps = min(distributed.gather(len(bounds) - 1))  # every rank takes the same number of steps
    history = []
    before = evaluate_suffix(suffix, sets["val"], batch_size, device, kind) if "val" in sets else None
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext())
    for epoch in range(1, epochs + 1):
        if opt is None:
            opt = (torch.optim.Adam(trainable, lr=lr, fused=True) if optimizer == "adam"
                   else torch.optim.SGD(trainable, lr=lr, momentum=0.9, fused=True))
        model.train()
        order = generator.permutation(len(train.y))
        total = correct = seen = 0.0
        started = time.perf_counter()
        with progress(bounds[steps], f"epoch {epoch}/{epochs}") as bar:
            for step in range(steps):
                rows = np.sort(order[bounds[step]:bounds[step + 1]])
                x = torch.from_numpy(train.x[rows]).to(device)  # fancy indexing copies off the memmap
                y = torch.from_numpy(train.y[rows]).to(device)
                with autocast:
                    lp = log_probs(model(x), kind).float()
                    loss = torch.nn.functional.nll_loss(lp, y)
                if not torch.isfinite(loss):
                    raise UserError(f"the training loss is not finite ({float(loss.detach())}) at epoch {epoch}, "
                                    f"step {step + 1}: "
                                    "the model's outputs overflow (inf logits) or --lr is too high; nothing written")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(rows)
                correct += float((lp.argmax(1) == y).sum())
                seen += len(rows)
                bar.update(len(rows))
                bar.set_postfix(loss=f"{total / seen:.4f}")
        total, correct, seen = distributed.all_sum([total, correct, seen])
        entry = {"epoch": epoch, "train_loss": total / seen, "train_accuracy": correct / seen,
                 "seconds": round(time.perf_counter() - started, 3)}
        if "val" in sets:
            v = evaluate_suffix(suffix, sets["val"], batch_size, device, kind)
            entry.update(val_loss=v["loss"], val_accuracy=v["accuracy"], val_top5=v["top5"])
        history.append(entry)
        if rank == 0:
            log.info("epoch %d/%d: " + ", ".join(f"{k} {entry[k]:.4f}" for k in
                                                 ("train_loss", "train_accuracy", "val_loss", "val_accuracy") if k in entry),
                     epoch, epochs)
    after = evaluate_suffix(suffix, sets["val"], batch_size, device, kind) if "val" in sets else None
    return {"history": history, "val_before": before, "val_after": after}
