"""onnxruntime sessions with a quiet, honest choice of execution provider.

`device="auto"` uses CUDA when the CUDA execution provider actually loads and the
CPU otherwise. On a machine without a GPU nothing is printed: onnxruntime-gpu's
wall of library-load errors is silenced and the fallback is reported through
`session_provider(session)` instead.
"""

from __future__ import annotations

import ctypes.util
import warnings

import numpy as np
import onnx

from onnxbn.errors import UserError

DEVICES = ("auto", "cpu", "cuda")


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise UserError(
            "onnxruntime is not installed: pip install 'onnxbn[cpu]' (or 'onnxbn[gpu]' on a CUDA machine)"
        ) from exc
    return onnxruntime


def _cuda_driver_present() -> bool:
    return ctypes.util.find_library("cuda") is not None


def cuda_available() -> bool:
    """True when onnxruntime offers CUDA and an NVIDIA driver is installed."""
    ort = _ort()
    return "CUDAExecutionProvider" in ort.get_available_providers() and _cuda_driver_present()


def make_session(model: onnx.ModelProto | bytes | str, device: str = "auto", threads: int = 0,
                 weights: dict | None = None):
    """An InferenceSession for `model` on `device` ('auto', 'cpu' or 'cuda').

    'cuda' fails with a UserError when CUDA does not load; 'auto' falls back to the
    CPU silently. `threads` > 0 caps onnxruntime's intra-op threads. A ModelProto's
    large weights go to onnxruntime as arrays (see graph.detach_weights); `weights`
    supplies them for a model that is already detached.
    """
    from onnxbn.graph import IN_MEMORY, detach_weights

    if device not in DEVICES:
        raise UserError(f"unknown device {device!r}: use one of {', '.join(DEVICES)}")
    ort = _ort()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    arrays: list = []
    if isinstance(model, onnx.ModelProto):
        if weights is None:
            model, weights = detach_weights(model)
        names = [t.name for t in model.graph.initializer
                 if any(e.key == "location" and e.value == IN_MEMORY for e in t.external_data)]
        arrays = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(weights[n])) for n in names]
        if names:
            options.add_external_initializers(names, arrays)
        payload = model.SerializeToString()
    else:
        payload = model
    want_cuda = device == "cuda" or (device == "auto" and cuda_available())
    if device == "cuda" and not cuda_available():
        raise UserError("--device cuda: onnxruntime has no usable CUDA provider here; use --device cpu or auto")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if want_cuda else ["CPUExecutionProvider"]
    # Warnings (e.g. "initializer also listed as input" in IR 3 models) are noise to a
    # user; the CUDA library probe logs at ERROR when it fails, so silence it entirely.
    ort.set_default_logger_severity(4 if want_cuda else 3)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            session = ort.InferenceSession(payload, options, providers=providers)
    except Exception as exc:
        if "INVALID_GRAPH" in str(exc) or "INVALID_PROTOBUF" in str(exc) or "NOT_IMPLEMENTED" in str(exc):
            raise UserError(f"onnxruntime cannot run this model: {str(exc).splitlines()[0]}") from exc
        raise
    finally:
        ort.set_default_logger_severity(3)
    session._onnxbn_weights = arrays  # onnxruntime reads the arrays in place: keep them alive
    if device == "cuda" and session_provider(session) != "cuda":
        raise UserError("--device cuda: the CUDA provider did not load (CUDA 12/13 + cuDNN 9 needed); use --device cpu")
    return session


def session_provider(session) -> str:
    """'cuda' or 'cpu': the provider that runs the session's nodes."""
    return "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
