"""`open_session`: a model on any runtime, behind one small interface (see the package docstring).
"""

from __future__ import annotations

import os

import onnx

from onnxbn.io.load import load_model
from onnxbn.io.model import Model
from onnxbn.runtimes.base import Session, check_runtime
from onnxbn.runtimes.openvino_backend import open_openvino
from onnxbn.runtimes.ort_backend import open_onnxruntime
from onnxbn.runtimes.reference_backend import open_reference
from onnxbn.runtimes.tract_backend import open_tract


def open_session(model: Model | onnx.ModelProto | str | os.PathLike, runtime: str = "onnxruntime", *,
                 device: str = "auto", precision: str | None = None, threads: int = 0) -> Session:
    """Load `model` on `runtime` ('onnxruntime', 'openvino', 'tract', 'reference', or NAME:DEVICE).

    `precision`: None/'default' (the runtime's own choice), 'f32', 'bf16' or 'f16' (openvino
    only). The session's `info` records the precision the runtime reports it chose. onnxruntime
    reads the weights where the Model holds them (`Model.open`: a model file as its structure, the
    weights read by onnxruntime from the file); the other runtimes get a proto with every weight inside.
    """
    name, dev, requested = check_runtime(runtime, device, precision)
    if name == "onnxruntime":
        return open_onnxruntime(Model.open(model), dev, requested, threads)
    proto = model.whole() if isinstance(model, Model) else load_model(model)
    opener = {"openvino": open_openvino, "tract": open_tract, "reference": open_reference}[name]
    return opener(proto, dev, requested, threads)
