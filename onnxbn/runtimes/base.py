"""The interface every runtime backend implements (`Session`), naming and finding runtimes.

A runtime is named `NAME` or `NAME:DEVICE` (`parse_runtime`); optional ones are imported only when
selected, and a missing one is a UserError naming the pip command (`runtime_module`).
"""

from __future__ import annotations

import importlib
import os
import tempfile

import numpy as np
import onnx
from onnx import helper

from onnxbn.errors import UserError
from onnxbn.runtimes.errors import first_line
from onnxbn.runtimes.precision import PRECISIONS, RuntimeInfo, supports_precision

RUNTIMES = ("onnxruntime", "openvino", "tract", "reference")
INSTALL = {"onnxruntime": "pip install 'onnxbn[cpu]' (or 'onnxbn[gpu]' on a CUDA machine)",
           "openvino": "pip install 'onnxbn[openvino]'", "tract": "pip install 'onnxbn[tract]'"}
_MODULE = {"onnxruntime": "onnxruntime", "openvino": "openvino", "tract": "tract", "reference": "onnx.reference"}


def parse_runtime(spec: str, device: str = "auto") -> tuple[str, str]:
    """('onnxruntime', 'cuda') from 'onnxruntime:cuda'; the device defaults to `device` for onnxruntime."""
    name, _, dev = str(spec).strip().lower().partition(":")
    if name not in RUNTIMES:
        raise UserError(f"unknown runtime {spec!r}: use one of {', '.join(RUNTIMES)} (optionally NAME:DEVICE, "
                        "e.g. onnxruntime:cuda)")
    if name == "onnxruntime":
        dev = dev or device
        if dev not in ("auto", "cpu", "cuda"):
            raise UserError(f"onnxruntime runs on cpu or cuda, not {dev!r}")
        return name, dev
    if dev and dev != "cpu":
        raise UserError(f"{name} runs on the CPU in onnxbn; {spec!r} names another device")
    if device == "cuda":
        raise UserError(f"--device cuda applies to onnxruntime; {name} runs on the CPU")
    return name, "cpu"


def runtime_module(name: str):
    """The runtime's Python package, or a UserError naming the pip command that installs it."""
    try:
        return importlib.import_module(_MODULE[name])
    except ImportError as exc:
        raise UserError(f"the {name} runtime is not installed: {INSTALL.get(name, 'pip install ' + name)}") from exc


def available(name: str) -> bool:
    try:
        runtime_module(name)
    except UserError:
        return False
    return True


def runtime_version(name: str) -> str:
    mod = runtime_module(name)
    if name == "tract":
        return mod.version()
    if name == "reference":
        return f"onnx {onnx.__version__}"
    return str(mod.__version__).split("-")[0]


class Session:
    """A loaded model on one runtime: `run(fetch, feeds)` returns numpy arrays, `info` says what ran."""

    info: RuntimeInfo

    def __init__(self, model: onnx.ModelProto, info: RuntimeInfo):
        self.info = info
        self.outputs = [o.name for o in model.graph.output]

    def run(self, fetch: list[str] | None, feeds: dict) -> list[np.ndarray]:
        raise NotImplementedError

    def _select(self, fetch, values: list[np.ndarray]) -> list[np.ndarray]:
        if fetch is None:
            return values
        by_name = dict(zip(self.outputs, values, strict=True))
        return [by_name[n] for n in fetch]

    def _run_error(self, exc: Exception) -> UserError:
        return UserError(f"{self.info.runtime} failed while running the model: {first_line(exc)}")


def check_runtime(runtime: str, device: str = "auto", precision: str | None = None) -> tuple[str, str, str]:
    """(name, device, precision asked) for a runtime spec, or a UserError: unknown name or device, a
    precision the runtime cannot take, or a runtime that is not installed (naming the pip command)."""
    name, dev = parse_runtime(runtime, device)
    requested = precision or "default"
    if requested not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if not supports_precision(name, requested):
        raise UserError(f"--precision {requested} needs openvino; {name} runs the model in its own types "
                        "(use --precision default or f32)")
    runtime_module(name)
    return name, dev, requested


def write_temporary(model: onnx.ModelProto) -> tuple[tempfile.TemporaryDirectory, str]:
    """The model as a file in a fresh temporary folder (external data past 1.8 GB)."""
    workdir = tempfile.TemporaryDirectory(prefix="onnxbn-rt-")
    path = os.path.join(workdir.name, "model.onnx")
    large = model.ByteSize() > 1_800_000_000
    onnx.save_model(model, path, save_as_external_data=large, all_tensors_to_one_file=True,
                    location="model.onnx.data" if large else None)
    return workdir, path


def expose(model: onnx.ModelProto, names: list[str], types: dict) -> onnx.ModelProto:
    """A copy of `model` with `names` added as graph outputs (so that any runtime returns them)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    existing = {o.name for o in out.graph.output}
    for name in names:
        if name not in existing:
            out.graph.output.append(helper.make_tensor_value_info(name, types[name].tensor_type.elem_type, None))
    return out
