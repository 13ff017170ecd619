"""onnxruntime sessions with a quiet, honest choice of execution provider.

`device="auto"` uses CUDA when the CUDA execution provider actually loads and the
CPU otherwise. On a machine without a GPU nothing is printed: onnxruntime-gpu's
wall of library-load errors is silenced and the fallback is reported through
`session_provider(session)` instead.
"""

from __future__ import annotations

import ctypes.util
import warnings

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


def make_session(model: onnx.ModelProto | bytes | str, device: str = "auto", threads: int = 0):
    """An InferenceSession for `model` on `device` ('auto', 'cpu' or 'cuda').

    'cuda' fails with a UserError when CUDA does not load; 'auto' falls back to the
    CPU silently. `threads` > 0 caps onnxruntime's intra-op threads.
    """
    if device not in DEVICES:
        raise UserError(f"unknown device {device!r}: use one of {', '.join(DEVICES)}")
    ort = _ort()
    payload = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
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
    if device == "cuda" and session_provider(session) != "cuda":
        raise UserError("--device cuda: the CUDA provider did not load (CUDA 12/13 + cuDNN 9 needed); use --device cpu")
    return session


def session_provider(session) -> str:
    """'cuda' or 'cpu': the provider that runs the session's nodes."""
    return "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
