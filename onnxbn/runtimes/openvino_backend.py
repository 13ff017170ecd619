"""OpenVINO behind `Session`: CPU; precision default | f32 | bf16 | f16 through INFERENCE_PRECISION_HINT.

'default' is OpenVINO's own pick: bf16 on CPUs with AVX-512 (native AVX512-BF16/AMX, emulated on plain
AVX-512), f32 elsewhere. A hint the CPU cannot honour is ignored by OpenVINO: the precision it reports
back is the one recorded (and `RuntimeInfo.note` says what was asked).
"""

from __future__ import annotations

import functools

import numpy as np

from onnxbn.runtimes.base import Session, runtime_module, runtime_version, write_temporary
from onnxbn.runtimes.errors import load_error
from onnxbn.runtimes.precision import RuntimeInfo, model_precision


class OpenVinoSession(Session):
    def __init__(self, model, info, compiled, workdir):
        super().__init__(model, info)
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self._workdir = workdir  # OpenVINO may map the weights file: keep it until the session goes

    def run(self, fetch, feeds):
        # Outputs by position: compiled outputs keep the graph's order, not always its names (a
        # tensor read through an inference-mode Dropout takes the Dropout output's name).
        try:
            self.request.infer(feeds)
            values = [np.array(self.request.get_output_tensor(i).data, copy=True) for i in range(len(self.outputs))]
        except Exception as exc:
            raise self._run_error(exc) from exc
        return self._select(fetch, values)


@functools.cache
def _ov_core():
    return runtime_module("openvino").Core()


def open_openvino(model, device, requested, threads):
    ov = runtime_module("openvino")
    core = _ov_core()
    config = {} if requested == "default" else {"INFERENCE_PRECISION_HINT": requested}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    workdir, path = write_temporary(model)
    try:
        compiled = core.compile_model(path, "CPU", config)
    except Exception as exc:
        workdir.cleanup()
        raise load_error("openvino", exc, model) from exc
    precision = compiled.get_property("INFERENCE_PRECISION_HINT")
    precision = precision.to_string() if isinstance(precision, ov.Type) else str(precision)
    precision = {"undefined": model_precision(model), "dynamic": model_precision(model)}.get(precision, precision)
    note = ""
    if requested not in ("default", precision):
        note = (f"asked {requested}, OpenVINO chose {precision}: this CPU has no {requested} arithmetic "
                f"({'AVX512-FP16 or AVX2-VNNI-2' if requested == 'f16' else 'AVX-512 or AVX2-VNNI-2'}), "
                "and OpenVINO ignores a hint it cannot honour")
    flags = _cpu_flags()
    if precision == "bf16" and flags and not flags & {"avx512_bf16", "amx_bf16", "avx_ne_convert"}:
        emulated = "bf16 is emulated: this CPU has no native bf16 instructions (same rounding, slower than f32)"
        note = f"{note}; {emulated}" if note else emulated
    cpu = core.get_property("CPU", "FULL_DEVICE_NAME")
    info = RuntimeInfo("openvino", runtime_version("openvino"), "cpu", precision, requested, model_precision(model),
                       provider=f"CPU ({cpu})", note=note)
    return OpenVinoSession(model, info, compiled, workdir)


@functools.cache
def _cpu_flags() -> frozenset:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()
