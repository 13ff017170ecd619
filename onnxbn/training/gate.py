"""The write-back gate: the trained torch suffix written back into the ONNX model, and the check that
onnxruntime on the written model gives what fine-tuning computed (prefix in onnxruntime, suffix in torch)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnxbn.feeding import rel_error
from onnxbn.io.copies import metadata, set_metadata
from onnxbn.io.model import Model
from onnxbn.training.cache import Features


@dataclass
class WriteBackProbe:
    """The write-back gate: onnxruntime on the written model must give the torch module's eval-mode
    outputs `expected` for the inputs `x` (fed as `name`) to 1e-5 relative; `reason`: why it cannot run."""

    name: str = ""
    x: np.ndarray | None = None
    expected: np.ndarray | None = None
    reason: str | None = None

    def check(self, open_session) -> dict:
        """Run the written model (`open_session()` makes its session); a RuntimeError past 1e-5."""
        if self.reason is not None or self.x is None or self.expected is None:
            return {"checked": False, "reason": self.reason}
        got = open_session().run(None, {self.name: self.x})[0].astype(np.float32)
        error = rel_error(self.expected, got)
        if not error <= 1e-5:
            raise RuntimeError(f"write-back check failed: onnxruntime on the written model differs from torch by "
                               f"{error:.3g} relative (limit 1e-5)")
        return {"checked": True, "max_rel_error": error}


def make_probe(module, device, name: str, features: Features) -> WriteBackProbe:
    """The model's outputs on the first cached inputs (`features.probe`: one, or the model's fixed batch) as
    fine-tuning computes them: the frozen prefix's outputs from the caching pass (the first rows of
    `features.x`), then the trained torch `module` in eval mode, for the write-back gate (inputs fed as
    `name`). One input is enough: in eval mode no output depends on the batch, so a write-back error shows
    in one row as in many; the prefix's outputs come from the cache, so the gate costs one forward pass
    of the written model in onnxruntime and one of `module`."""
    import torch

    x = features.probe
    with torch.no_grad():
        expected = module(torch.from_numpy(np.array(features.x[:len(x)])).to(device))  # a copy: the cache is read-only
        expected = (expected[0] if isinstance(expected, tuple) else expected).float().cpu().numpy()
    return WriteBackProbe(name, x, expected)


def write_back_suffix(module, suffix: Model, model: Model) -> Model:
    """`write_into` of the trained suffix `module` into the whole `model`: its initializers of the same
    names take the suffix's written values, the Constant nodes `split_model` turned into initializers
    get the trained values in place, and the write-back metadata is the suffix's."""
    from onnxbn.torch_import.writeback import write_into

    written_suffix = write_into(suffix, module)
    trained = {name: written_suffix.arrays[name] for name in module.onnx_tensors.values()}
    out = model.copy()
    initializers = {t.name for t in out.proto.graph.initializer}
    for name in [n for n in trained if n in initializers]:
        out.set_array(name, trained.pop(name))
    for node in out.proto.graph.node:  # the rest were Constant nodes: their values, names and types kept
        if node.op_type == "Constant" and node.output[0] in trained:
            value = next(a.t for a in node.attribute if a.name == "value")
            array = trained.pop(node.output[0])
            value.CopyFrom(numpy_helper.from_array(array.astype(onnx.helper.tensor_dtype_to_np_dtype(value.data_type)),
                                                   value.name))
    set_metadata(out.proto, {"onnxbn.write_back": metadata(written_suffix.proto)["onnxbn.write_back"]})
    return out
