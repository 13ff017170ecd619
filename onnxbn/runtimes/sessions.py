"""`open_session`: a model on any runtime, behind one small interface (see the package docstring).
"""

from __future__ import annotations

import os

import onnx

from onnxbn.runtimes.base import Session, check_runtime
from onnxbn.runtimes.openvino_backend import open_openvino
from onnxbn.runtimes.ort_backend import open_onnxruntime
from onnxbn.runtimes.reference_backend import open_reference
from onnxbn.runtimes.tract_backend import open_tract


def open_session(model: onnx.ModelProto | str | os.PathLike, runtime: str = "onnxruntime", *, device: str = "auto",
                 precision: str | None = None, threads: int = 0, folder: str | os.PathLike | None = None) -> Session:
    """Load `model` on `runtime` ('onnxruntime', 'openvino', 'tract', 'reference', or NAME:DEVICE).

    `precision`: None/'default' (the runtime's own choice), 'f32', 'bf16' or 'f16' (openvino
    only). The session's `info` records the precision the runtime reports it chose. A model
    file goes to onnxruntime as its structure, onnxruntime reading the weights from the file
    (`io.load.load_structure`); `folder` is where such a structure model's weights lie.
    """
    from onnxbn.io.load import load_model, load_structure

    name, dev, requested = check_runtime(runtime, device, precision)
    if name == "onnxruntime" and isinstance(model, (str, os.PathLike)):
        model, folder = load_structure(model)
    else:
        model = load_model(model)
    if name == "onnxruntime":
        return open_onnxruntime(model, dev, requested, threads, folder)
    opener = {"openvino": open_openvino, "tract": open_tract, "reference": open_reference}[name]
    return opener(model, dev, requested, threads)
