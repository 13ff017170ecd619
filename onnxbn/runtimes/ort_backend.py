"""onnxruntime behind `Session` (sessions themselves come from `make_session`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import re
import warnings

import numpy as np
import onnx

from onnxbn.errors import UserError
from onnxbn.io.model import Model
from onnxbn.runtimes.base import Session, runtime_version
from onnxbn.runtimes.precision import RuntimeInfo, model_precision


class OrtSession(Session):
    def __init__(self, model, info, session):
        super().__init__(model, info)
        self.session = session

    def run(self, fetch, feeds):
        return self.session.run(fetch, feeds)


def open_onnxruntime(model: Model, device, requested, threads):

    own = model_precision(model.proto)
    session = make_session(model, device, threads, tf32=None if requested == "default" else False)
    provider = session_provider(session)
    precision = own
    if provider == "cuda" and own == "f32":
        options = session.get_provider_options().get("CUDAExecutionProvider", {})
        if str(options.get("use_tf32", "0")) == "1":
            precision = "tf32"
    info = RuntimeInfo("onnxruntime", runtime_version("onnxruntime"), provider, precision, requested, own,
                       provider=session.get_providers()[0])
    return OrtSession(model.proto, info, session)


DEVICES = ("auto", "cpu", "cuda")
FATAL, ORT_DEFAULT_LOG_SEVERITY = 4, 2  # onnxruntime log severities: FATAL only; its default logger's own level
# onnxruntime's status codes that mean the model (or a file it names) is bad, not onnxbn
MODEL_ERRORS = ("FAIL", "INVALID_ARGUMENT", "INVALID_GRAPH", "INVALID_PROTOBUF", "NOT_IMPLEMENTED")
_quiet = {"active": False, "default_logger_set": False}


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise UserError(
            "onnxruntime is not installed: pip install 'onnxbn[cpu]' (or 'onnxbn[gpu]' on a CUDA machine)"
        ) from exc
    return onnxruntime


def _cuda_provider_loads(ort) -> bool:
    """True when onnxruntime's CUDA provider library and everything it links (CUDA, cuDNN) load."""
    capi = os.path.join(os.path.dirname(ort.__file__), "capi")
    try:
        ctypes.CDLL(os.path.join(capi, "libonnxruntime_providers_shared.so"), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(os.path.join(capi, "libonnxruntime_providers_cuda.so"))
    except OSError:
        return False
    return True


@contextlib.contextmanager
def quiet_onnxruntime():
    """Inside the block, `make_session` also sets onnxruntime's process-wide default logger to FATAL;
    on leaving, a logger onnxbn set goes back to onnxruntime's default (WARNING): onnxruntime offers
    no getter, so a level the caller set before the block is not known and not restored."""
    _quiet["active"] = True
    try:
        yield
    finally:
        _quiet["active"] = False
        if _quiet["default_logger_set"]:
            _quiet["default_logger_set"] = False
            _ort().set_default_logger_severity(ORT_DEFAULT_LOG_SEVERITY)


def _onnxruntime_status(exc: Exception) -> str | None:
    """The status code of an onnxruntime error ('FAIL', 'INVALID_GRAPH', ...), or None."""
    match = re.search(r"\[ONNXRuntimeError\] : \d+ : ([A-Z_]+) :", str(exc))
    return match.group(1) if match else None


@functools.cache
def cuda_available() -> bool:
    """True when onnxruntime offers CUDA, an NVIDIA driver is installed and the CUDA provider loads."""
    ort = _ort()
    return ("CUDAExecutionProvider" in ort.get_available_providers() and ctypes.util.find_library("cuda") is not None
            and _cuda_provider_loads(ort))


def make_session(model: Model | onnx.ModelProto | bytes | str | os.PathLike, device: str = "auto", threads: int = 0,
                 tf32: bool | None = False, arena: bool = True, prepack: bool = True):
    """An InferenceSession for `model` on `device` ('auto', 'cpu' or 'cuda').

    'cuda' fails with a UserError when CUDA does not load; 'auto' falls back to the
    CPU silently. `threads` > 0 caps onnxruntime's intra-op threads. A Model's (`onnxbn.io.model`)
    arrays and its large inline weights go to onnxruntime as arrays (`Model.detached`), and the
    weights in its files are read by onnxruntime from its folder (Python never holds them); a path
    or ModelProto is opened as a Model (`Model.open`: a path as its structure). `arena=False`
    turns onnxruntime's CPU memory arena off: every tensor is freed when its last reader
    is done, instead of the arena keeping (and growing to) its high-water mark. `prepack=False`
    keeps onnxruntime from repacking Conv/Gemm weights into copies laid out for speed at load
    (VGG16: ~0.5 s and 70 MiB less to open, for a session that runs once). `tf32`
    sets the CUDA provider's `use_tf32`: off by default, so that float32 statistics, caches and
    checks on CUDA are float32 (TF32 keeps 10 mantissa bits); None leaves onnxruntime's default. A model onnxruntime
    cannot load is a UserError naming the operator it lacks (see runtimes.errors.load_error); one whose IR
    version is newer than onnxruntime reads is a UserError saying to upgrade onnxruntime; any other
    model onnxruntime refuses (status FAIL, INVALID_ARGUMENT, INVALID_GRAPH, INVALID_PROTOBUF or
    NOT_IMPLEMENTED: a damaged or invalid model) is a UserError quoting onnxruntime's first line.
    The session logs only FATAL messages (see the module docstring).
    """
    if device not in DEVICES:
        raise UserError(f"unknown device {device!r}: use one of {', '.join(DEVICES)}")
    ort = _ort()
    options = ort.SessionOptions()
    options.log_severity_level = FATAL
    options.enable_cpu_mem_arena = arena
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        options.intra_op_num_threads = threads
    arrays: list = []  # the OrtValues live as long as the session is being made
    proto = None
    if isinstance(model, bytes):
        payload = model
    else:
        light = Model.open(model).detached()
        if light.folder is not None:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(light.folder))
        held = light.held_arrays()
        arrays = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in held.values()]
        if held:
            options.add_external_initializers(list(held), arrays)
        proto = light.proto
        payload = proto.SerializeToString()
    want_cuda = device == "cuda" or (device == "auto" and cuda_available())
    if device == "cuda" and not cuda_available():
        raise UserError("--device cuda: onnxruntime has no usable CUDA provider here; use --device cpu or auto")
    cuda = ("CUDAExecutionProvider", {"use_tf32": str(int(tf32))}) if tf32 is not None else "CUDAExecutionProvider"
    providers = [cuda, "CPUExecutionProvider"] if want_cuda else ["CPUExecutionProvider"]
    if _quiet["active"] and not _quiet["default_logger_set"]:
        ort.set_default_logger_severity(FATAL)
        _quiet["default_logger_set"] = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            session = ort.InferenceSession(payload, options, providers=providers)
    except Exception as exc:
        status = _onnxruntime_status(exc)
        too_new = re.search(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)", str(exc))
        if too_new:  # e.g. onnx 1.23's helper.make_model writes IR 14, onnxruntime 1.30 reads up to 13
            raise UserError(f"the model is ONNX IR version {too_new[1]} and onnxruntime {ort.__version__} reads IR "
                            f"versions up to {too_new[2]}: upgrade onnxruntime (pip install -U onnxruntime, "
                            f"or onnxruntime-gpu)") from exc
        if status == "NOT_IMPLEMENTED" and proto is not None:
            from onnxbn.runtimes.errors import load_error

            error = load_error("onnxruntime", exc, proto)
            if "no implementation of operator" in str(error):
                raise error from exc
        if status in MODEL_ERRORS:
            raise UserError(f"onnxruntime cannot run this model: {str(exc).splitlines()[0]}") from exc
        raise
    # onnxruntime reads the arrays in place: keep them alive as long as the session (an attribute it does not declare)
    vars(session)["_onnxbn_weights"] = arrays
    if device == "cuda" and session_provider(session) != "cuda":
        raise UserError("--device cuda: the CUDA provider did not load (CUDA 12/13 + cuDNN 9 needed); use --device cpu")
    return session


def session_provider(session) -> str:
    """'cuda' or 'cpu': the provider that runs the session's nodes."""
    return "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
