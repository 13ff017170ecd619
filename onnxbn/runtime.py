"""Running models: onnxruntime sessions, feeding a dataset through them, and the error measure.

`device="auto"` uses CUDA when the CUDA execution provider can load and the CPU
otherwise. Whether it can is probed once, quietly, by loading onnxruntime's CUDA
provider library with ctypes (which fails when CUDA or cuDNN is missing), so
onnxruntime-gpu on a machine without a GPU never prints its wall of library-load
errors. The provider that ran is reported through `session_provider(session)`.

onnxruntime's own log lines stay off stderr: a session logs only FATAL messages (a
failure's text still reaches onnxbn in the exception). onnxruntime's process-wide
default logger is left as the caller set it, except inside `quiet_onnxruntime()` (the
command line runs every command in it), where sessions made by `make_session` set it to
FATAL too; on leaving, it is set back to onnxruntime's default, WARNING:
onnxruntime has no getter for it, so a level set before the block is not restored.

`run_batches` is the one loop that feeds a dataset to a session (stats, check, eval):
batches cast to the model's input type, checked against its input shape, with a
progress bar. `rel_error(a, b) = max|a - b| / max|a|` is the one relative error.
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
from onnx import helper

from onnxbn.data import open_data
from onnxbn.errors import UserError
from onnxbn.graph import graph_inputs, tensor_shape
from onnxbn.modelio import IN_MEMORY, detach_weights, load_structure, metadata

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


def make_session(model: onnx.ModelProto | bytes | str, device: str = "auto", threads: int = 0,
                 weights: dict | None = None, tf32: bool | None = None, folder: str | os.PathLike | None = None,
                 arena: bool = True, prepack: bool = True):
    """An InferenceSession for `model` on `device` ('auto', 'cpu' or 'cuda').

    'cuda' fails with a UserError when CUDA does not load; 'auto' falls back to the
    CPU silently. `threads` > 0 caps onnxruntime's intra-op threads. A ModelProto's
    large weights go to onnxruntime as arrays (see graph.detach_weights); `weights`
    supplies them for a model that is already detached. A path is read as its structure
    (`modelio.load_structure`): onnxruntime reads its weights from the file. `folder`: where the model's external
    data files lie (a `modelio.load_structure` model points into its own file there, so
    onnxruntime reads the weights from disk and Python never holds them). `arena=False`
    turns onnxruntime's CPU memory arena off: every tensor is freed when its last reader
    is done, instead of the arena keeping (and growing to) its high-water mark. `prepack=False`
    keeps onnxruntime from repacking Conv/Gemm weights into copies laid out for speed at load
    (VGG16: ~0.5 s and 70 MiB less to open, for a session that runs once). `tf32`
    sets the CUDA provider's `use_tf32` (None: onnxruntime's default). A model onnxruntime
    cannot load is a UserError naming the operator it lacks (see runtimes.load_error); any other
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
    if folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    arrays: list = []
    if isinstance(model, (str, os.PathLike)):  # read as its structure: onnxruntime takes the weights from the file
        model, folder = load_structure(model)
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
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
        if status == "NOT_IMPLEMENTED" and isinstance(model, onnx.ModelProto):
            from onnxbn.runtimes import load_error

            error = load_error("onnxruntime", exc, model)
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


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |a| in float64: the error relative to the reference's scale (0 when both are 0)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff = float(np.abs(a - b).max()) if a.size else 0.0
    scale = float(np.abs(a).max()) if a.size else 0.0
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


# ----------------------------------------------------------------------------- feeding data

def model_input(model: onnx.ModelProto) -> tuple[str, np.dtype, list]:
    """(name, numpy dtype, shape) of the model's single run-time input."""
    inputs = graph_inputs(model)
    if len(inputs) != 1:
        raise UserError(f"the model has {len(inputs)} run-time inputs ({', '.join(i.name for i in inputs)}); "
                        "onnxbn feeds data to single-input models")
    vi = inputs[0]
    dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
    return vi.name, dtype, tensor_shape(vi.type) or []


def fixed_batch(input_shape: list) -> int | None:
    """The model's batch size when its batch axis is fixed, else None."""
    return input_shape[0] if input_shape and isinstance(input_shape[0], int) and input_shape[0] > 0 else None


def fit_batch_size(input_shape: list, batch_size: int, samples: int | None) -> int:
    """`batch_size`, or the model's own when its batch axis is fixed (then `samples` must fill whole
    batches; a stream of unknown length is checked batch by batch in `run_batches`)."""
    fixed = fixed_batch(input_shape)
    if fixed is None:
        return batch_size
    if samples is not None and samples % fixed:
        raise UserError(f"the model's batch size is fixed at {fixed} and {samples} samples do not fill whole "
                        f"batches; give a multiple of {fixed} samples (--limit, --random)")
    return fixed


def image_size_for(model: onnx.ModelProto) -> int:
    """The spatial size a model expects (its input's H when fixed, else 224)."""
    _, _, shape = model_input(model)
    if len(shape) == 4 and isinstance(shape[2], int) and shape[2] > 0:
        return shape[2]
    return 224


def check_batch_shape(x: np.ndarray, shape: list, source: str) -> None:
    expected = shape[1:]
    if len(x.shape) != len(shape) or any(isinstance(e, int) and e > 0 and e != g
                                         for e, g in zip(expected, x.shape[1:], strict=True)):
        raise UserError(f"{source}: inputs have shape {tuple(x.shape[1:])} per sample, the model expects "
                        f"{tuple(e if isinstance(e, int) and e > 0 else '?' for e in expected)}")


def open_model_data(model: onnx.ModelProto, data, *, preset=None, limit=None, seed=0, shard=None):
    """open_data with the preset and image size taken from the model when not given, and a .npz's
    inputs found under `x` or the model's input name."""
    return open_data(data, preset=preset or metadata(model).get("onnxbn.preset") or "imagenet",
                     size=image_size_for(model), limit=limit, seed=seed, shard=shard, input_name=model_input(model)[0])


def progress(total: int, desc: str, unit: str = "img"):
    """A tqdm bar on a terminal, silent in logs and pipes."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=None, leave=False, dynamic_ncols=True)


def run_batches(session, dataset, fetch: list[str], model: onnx.ModelProto, batch_size: int, *, workers: int = 0,
                strict: bool = False, start: int = 0, desc: str = "run"):
    """Feed `dataset` through `session` batch by batch; yield (x, y, outputs of `fetch`).

    x is cast to the model's input type and checked against its input shape; the
    progress bar counts items read (skipped ones included) from item `start` on.
    """
    name, dtype, shape = model_input(model)
    fixed = fixed_batch(shape)
    with progress(dataset.total, desc) as bar:
        bar.update(start)
        for x, y in dataset.batches(batch_size, workers, strict=strict, start=start, dtype=dtype):
            check_batch_shape(x, shape, dataset.description)
            if fixed is not None and len(x) != fixed:
                raise UserError(f"{dataset.description}: a batch of {len(x)} samples reached a model whose batch size "
                                f"is fixed at {fixed}; give a multiple of {fixed} samples")
            yield x, y, session.run(fetch, {name: x})
            bar.update(dataset.consumed - bar.n)
