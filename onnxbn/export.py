"""Export a torch VGG to ONNX, verified against torch before it is returned.

Dropout layers are kept (as inference-mode Dropout nodes, the identity at run time)
so that fine-tuning the imported graph trains with dropout, as the original VGG did.
Uses torch's TorchScript exporter (`dynamo=False`) on purpose: it needs no onnxscript,
keeps the readable `/features/features.0/Conv` node names, and never folds or
rewrites layers behind our back (the dynamo path with optimize=True folds BN into
Conv). The batch axis is dynamic. After export, onnxruntime and torch run the same
seeded input and must agree to 1e-5 relative (max |ort - torch| / max |torch|).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import onnx

from onnxbn.errors import UserError
from onnxbn.graph import GraphIndex
from onnxbn.io.copies import with_metadata

log = logging.getLogger("onnxbn")
EXPORT_TOLERANCE = 1e-5


def load_state_dict(path: str | os.PathLike) -> dict:
    """A torchvision-style state_dict from a local .pth, never unpickling code."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such weights file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: not a plain torch state_dict (only tensors are loaded, never code): "
                        f"{first[:160]}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a dict of tensors (a torchvision state_dict)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_weights(model, state: dict, source: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) e.g. {missing[0]!r}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s) e.g. {unexpected[0]!r}")
        raise UserError(f"{source}: does not match this VGG ({'; '.join(parts)}); "
                        "is it the right architecture (vgg11/13/16/19, no _bn)?")
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise UserError(f"{source}: {key} has shape {tuple(state[key].shape)}, this VGG expects {tuple(value.shape)}")
    model.load_state_dict({k: v.float() for k, v in state.items()})


def _materialize_shared_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every layer its own bias again.

    The TorchScript exporter deduplicates identical initializers (torchvision's
    zero biases) and feeds them through Identity nodes. Each such Identity becomes
    an initializer of its own, so every layer's parameters are separate tensors that
    fine-tuning can change independently.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    index = GraphIndex(out)
    shared = set()
    for node in [n for n in out.graph.node if n.op_type == "Identity" and n.input[0] in index.initializers]:
        source, name = node.input[0], node.output[0]
        index.remove_node(node)
        index.set_initializer(name, index.initializers[source])
        shared.add(source)
    index.prune(shared)
    return out


def _inference_dropout(model: onnx.ModelProto) -> onnx.ModelProto:
    """Keep the Dropout layers, in inference form.

    Exported from train mode (so the layers are not dropped), a Dropout carries a
    constant training_mode=True input and a mask output; removing both makes it the
    identity at inference while `to_torch` still trains it as nn.Dropout.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    dropped = set()
    for node in out.graph.node:
        if node.op_type == "Dropout":
            dropped.update(node.input[2:])
            del node.input[2:]
            del node.output[1:]
    GraphIndex(out).prune(dropped)
    return out


def export_vgg(arch: str = "vgg16", weights: str | os.PathLike | None = None, opset: int = 17,
               image_size: int = 224, seed: int = 0) -> onnx.ModelProto:
    """ONNX VGG (vgg11/13/16/19) with weights from a local torchvision .pth, or random.

    Random weights (no `weights`) follow torchvision's init, log a warning and are
    marked `onnxbn.weights=random` in metadata_props. The expected preprocessing
    (`onnxbn.preset=imagenet`) is recorded too.
    """
    import torch

    from onnxbn.models.vgg import CONFIGS, vgg

    if arch not in CONFIGS:
        raise UserError(f"unknown architecture {arch!r}: choose one of {', '.join(CONFIGS)}")
    if not 7 <= opset <= onnx.defs.onnx_opset_version():
        raise UserError(f"--opset {opset} is out of range: use 7..{onnx.defs.onnx_opset_version()}")
    if image_size < 32 or image_size % 224:
        raise UserError(f"--image-size {image_size}: VGG's 7x7 average pool exports only for multiples of 224")
    if weights is None:
        model = vgg(arch, seed=seed)
        log.warning("no --weights given: %s has RANDOM weights (torchvision init, seed %d); "
                    "statistics and fine-tuning will be meaningless for real images", arch, seed)
        provenance = "random"
    else:
        state = load_state_dict(weights)
        classes = state.get("classifier.6.weight", torch.empty(1000, 1)).shape[0]
        model = vgg(arch, num_classes=classes, seed=seed)
        _load_weights(model, state, str(weights))
        digest = hashlib.sha256(Path(weights).read_bytes()).hexdigest()[:16]
        provenance = f"{Path(weights).name} sha256:{digest}"
    return export_module(model, (3, image_size, image_size), opset,
                         {"onnxbn.arch": arch, "onnxbn.weights": provenance, "onnxbn.preset": "imagenet"})


def export_module(model, sample_shape: tuple[int, ...], opset: int = 17, metadata: dict | None = None) -> onnx.ModelProto:
    """ONNX of a torch classifier without BN layers (input `input`, output `logits`, dynamic batch).

    Exported from train mode so Dropout survives (made inference-only afterwards),
    then checked: onnxruntime and torch (eval) on the same seeded input must agree
    to EXPORT_TOLERANCE relative (max |ort - torch| / max |torch|), else RuntimeError.
    """
    import torch

    from onnxbn.feeding import rel_error
    from onnxbn.runtimes.ort_backend import make_session

    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise UserError("the module has BatchNorm layers: export it in eval mode with torch.onnx.export directly")
    buffer = io.BytesIO()
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (torch.zeros(1, *sample_shape),),
                          # torch annotates `f` as a path; its TorchScript exporter also writes to a file object
                          buffer,  # pyright: ignore[reportArgumentType]
                          dynamo=False, opset_version=opset, input_names=["input"], output_names=["logits"],
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    model.eval()
    proto = _inference_dropout(_materialize_shared_initializers(onnx.load_from_string(buffer.getvalue())))
    x = np.random.default_rng(0).standard_normal((2, *sample_shape)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    got = np.asarray(make_session(proto, "cpu").run(None, {"input": x})[0])  # the dense logits
    error = rel_error(expected, got)
    if not error <= EXPORT_TOLERANCE:
        raise RuntimeError(f"export check failed: onnxruntime differs from torch by {error:.3g} relative "
                           f"(limit {EXPORT_TOLERANCE}); please report this with your torch/onnxruntime versions")
    return with_metadata(proto, (metadata or {}) | {
        "onnxbn.export": f"torch {torch.__version__} torchscript exporter, opset {opset}, "
                         f"onnxruntime check {error:.2e} relative"})
