"""The write-back gate: the trained torch suffix written back into the ONNX model, and the check that
onnxruntime on the written model gives what fine-tuning computed (prefix in onnxruntime, suffix in torch)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnxbn.feeding import model_input, rel_error
from onnxbn.io.copies import metadata, set_metadata
from onnxbn.io.model import Model


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


def make_probe(prefix, module, device, input_shape, proto, seen: list[int] | None, samples: int = 1) -> WriteBackProbe:
    """The model's outputs on `samples` seeded random inputs as fine-tuning computes them (the prefix in
    onnxruntime, `prefix` = (session, input name, cut), then the trained torch `module`), for the
    write-back gate. A dimension the model leaves open (dynamic H and W) takes the size of the
    training inputs (`seen`: one sample's shape). One input: in eval mode no output depends on the batch,
    so a write-back error shows in one row as in many, and each more sample adds two forward passes to
    the gate (VGG16 on 2 cores: ~0.4 s each, against ~6 s for a caching pass over 16 inputs)."""
    import torch

    dims = [d if isinstance(d, int) and d > 0 else None for d in input_shape[1:]]
    if seen is not None and len(seen) == len(dims):
        dims = [s if d is None else d for d, s in zip(dims, seen, strict=True)]
    fixed = [d for d in dims if d is not None]
    if len(fixed) != len(dims):
        return WriteBackProbe(reason="input shape is not fixed")
    session, name, cut = prefix
    dtype = model_input(proto)[1]
    if isinstance(input_shape[0], int) and input_shape[0] > 0:
        samples = input_shape[0]  # a fixed batch axis
    x = np.random.default_rng(0).standard_normal((samples, *fixed)).astype(dtype)
    features = np.asarray(session.run([cut], {name: x})[0], dtype=np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(features).to(device))
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
