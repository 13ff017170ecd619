"""Runtimes behind one small interface: onnxruntime, OpenVINO, tract and the ONNX reference.

    session = open_session(model, "openvino", precision="bf16")
    session.run(["logits"], {"input": x})        # list of numpy arrays, like onnxruntime
    session.info                                 # RuntimeInfo: what actually ran

A runtime is named `NAME` or `NAME:DEVICE`:

    onnxruntime   cpu or cuda (without a device: the `device` argument, 'auto' = CUDA when
                  it loads); runs the model in its own types. On CUDA, precision 'f32'
                  turns TF32 off (`use_tf32=0`); 'default' leaves onnxruntime's own choice,
                  reported as 'tf32' when the provider allows it.
    openvino      CPU; precision default | f32 | bf16 | f16 through INFERENCE_PRECISION_HINT.
                  'default' is OpenVINO's own pick: bf16 on CPUs with AVX-512 (native
                  AVX512-BF16/AMX, emulated on plain AVX-512), f32 elsewhere. A hint the CPU
                  cannot honour is ignored by OpenVINO: the precision it reports back is
                  the one recorded (and `RuntimeInfo.note` says what was asked).
                  Dynamic dimensions compile as they are (OpenVINO resolves them per request).
    tract         CPU (the `tract` wheel, sonos/tract); the model's own types. tract runs only
                  determined input shapes: a model whose inputs are not all fixed is built for
                  the shapes and types each batch brings (explicit input facts, one build held).
    reference     `onnx.reference.ReferenceEvaluator`: numpy, slow, independent of every
                  optimising runtime; the model's own types.

OpenVINO and tract are optional (`pip install 'onnxbn[openvino]'`, `'onnxbn[tract]'`) and
imported only when selected; selecting one that is missing is a UserError naming the pip
command. A model a runtime cannot load (an operator it lacks) is a UserError of one line
naming the runtime, the operator and the node.

`RuntimeInfo.precision` is the arithmetic precision the runtime reports for float layers
(f32, f16, bf16, tf32, f64). `lowered` is True when that is below the model's own float
type; `default_tolerance(...)` is then looser than the 1e-5 used for a full-precision run
(TOLERANCES, with the reasons in the README's "Deploying" section).
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import helper

from onnxbn.errors import UserError

RUNTIMES = ("onnxruntime", "openvino", "tract", "reference")
PRECISIONS = ("default", "f32", "bf16", "f16")
# (atol, rtol, scaled) by the precision a comparison runs at: an element passes when
#     |a - b| <= atol + scaled * max|a of its sample| + rtol * |a|.
# At f32 the rule is onnxbn's plain 1e-5. Below it, rounding error follows the magnitude of the
# sums a layer computes, i.e. the sample's scale, not each element (a logit near 0 next to one of
# 100 carries an error of about u*100), so the looser defaults add a term relative to the largest
# |reference| value of the sample. u = unit roundoff: bf16 2**-8 = 3.9e-3 (7 stored mantissa bits),
# f16 and tf32 2**-11 = 4.9e-4 (10 bits); the defaults are about 8u. Measured, folded VGG16 on
# OpenVINO bf16 needs 9.6e-3, the demo model 8.3e-3; a wrong fold is off by the scale itself.
TOLERANCES = {"f64": (1e-5, 1e-5, 0.0), "f32": (1e-5, 1e-5, 0.0), "tf32": (1e-5, 4e-3, 4e-3),
              "f16": (1e-5, 4e-3, 4e-3), "bf16": (1e-5, 3e-2, 3e-2)}
INSTALL = {"onnxruntime": "pip install 'onnxbn[cpu]' (or 'onnxbn[gpu]' on a CUDA machine)",
           "openvino": "pip install 'onnxbn[openvino]'", "tract": "pip install 'onnxbn[tract]'"}
_MODULE = {"onnxruntime": "onnxruntime", "openvino": "openvino", "tract": "tract", "reference": "onnx.reference"}
_RANK = {"f64": 3, "f32": 2, "tf32": 1, "f16": 1, "bf16": 0}
_ELEM = {onnx.TensorProto.FLOAT: "f32", onnx.TensorProto.DOUBLE: "f64", onnx.TensorProto.FLOAT16: "f16",
         onnx.TensorProto.BFLOAT16: "bf16"}


@dataclass
class RuntimeInfo:
    """What a session actually runs with."""

    runtime: str          # onnxruntime, openvino, tract, reference
    version: str
    device: str           # cpu, cuda
    precision: str        # what the runtime reports for float layers
    requested: str        # the precision asked for (default = the runtime's own choice)
    model_precision: str  # the model's own float type (see model_precision)
    provider: str = ""    # onnxruntime's execution provider, OpenVINO's device name, ...
    note: str = ""

    @property
    def lowered(self) -> bool:
        return _RANK.get(self.precision, 2) < _RANK.get(self.model_precision, 2)

    def label(self) -> str:
        """'openvino 2026.4.1 on cpu, bf16 (OpenVINO's default)'."""
        how = {"default": "the runtime's default"}.get(self.requested, f"asked {self.requested}")
        return f"{self.runtime} {self.version} on {self.device}, {self.precision} ({how})"

    def to_dict(self) -> dict:
        return {**asdict(self), "lowered": self.lowered}


def tolerance_choice(*infos: RuntimeInfo) -> tuple[str, str]:
    """(the precision whose TOLERANCES apply to a comparison of these sides, why).

    Two sides on the same runtime, device and precision, neither below its model's type,
    compare the same arithmetic: the model's own float type sets the tolerance ('f32' for
    f32 and f64 models; 'f16' or 'bf16' for a model that computes in them, whose outputs
    move by that type's rounding when BN is inserted or folded). Otherwise the lowest
    precision either side computes in: bf16, f16 or tf32 when a runtime lowered the model,
    or an f16 model's own type when two different runtimes round it.
    """
    keys = {(i.runtime, i.device, i.precision) for i in infos}
    if len(infos) == 2 and len(keys) == 1 and not any(i.lowered for i in infos):
        own = min(("f32", *(i.model_precision for i in infos)), key=lambda p: _RANK.get(p, 2))
        if own == "f32":
            return own, "both sides run the same arithmetic at full precision"
        return own, f"the model computes in {own}: a change to it moves the outputs by {own} rounding"
    low = min(infos, key=lambda i: _RANK.get(i.precision, 2))
    why = f"{low.runtime} on {low.device} computes in {low.precision}"
    if low.lowered:
        why += f", below the model's {low.model_precision}"
    return low.precision, why


def tolerance_precision(*infos: RuntimeInfo) -> str:
    """The precision whose TOLERANCES apply to a comparison of these sides (see tolerance_choice)."""
    return tolerance_choice(*infos)[0]


def default_tolerance(*infos: RuntimeInfo) -> tuple[float, float, float]:
    """(atol, rtol, scaled) for comparing these sides (one side: against a full-precision reference)."""
    return TOLERANCES.get(tolerance_precision(*infos), TOLERANCES["f32"])


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


def supports_precision(name: str, precision: str | None) -> bool:
    """Whether `precision` can be asked of runtime `name` (openvino takes every one; the others run the model's types)."""
    return precision in (None, "default", "f32") or name == "openvino"


def model_precision(model: onnx.ModelProto) -> str:
    """The model's own float type: the lowest-precision float type among its graph inputs and
    outputs (f16 I/O around f32 layers, or f32 I/O around f16 layers, both round at f16), and the
    type that holds most of its float initializer elements; 'f32' for a model with neither."""
    from onnxbn.graph import graph_inputs

    types = [v.type.tensor_type.elem_type for v in (*graph_inputs(model), *model.graph.output)]
    weights: dict[int, int] = {}
    for t in model.graph.initializer:
        if t.data_type in _ELEM:
            weights[t.data_type] = weights.get(t.data_type, 0) + math.prod(t.dims)
    if weights:
        types.append(max(weights, key=weights.get))
    return min((_ELEM[t] for t in types if t in _ELEM), key=lambda p: _RANK[p], default="f32")


# ----------------------------------------------------------------------------- sessions

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
        by_name = dict(zip(self.outputs, values))
        return [by_name[n] for n in fetch]

    def _run_error(self, exc: Exception) -> UserError:
        return UserError(f"{self.info.runtime} failed while running the model: {_first_line(exc)}")


class OrtSession(Session):
    def __init__(self, model, info, session):
        super().__init__(model, info)
        self.session = session

    def run(self, fetch, feeds):
        return self.session.run(fetch, feeds)


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


class TractSession(Session):
    """`runnable` for a model whose inputs are all fixed; otherwise `build(facts)` makes one per set of
    feed shapes (tract needs every input's shape determined: the data gives it)."""

    def __init__(self, model, info, runnable, feed_order, build=None):
        super().__init__(model, info)
        self.runnable = runnable
        self.feed_order = feed_order
        self._build = build
        self._by_shapes: dict = {}

    def run(self, fetch, feeds):
        arrays = [np.ascontiguousarray(feeds[n]) for n in self.feed_order]
        runnable = self.runnable
        if runnable is None:
            key = tuple((a.shape, a.dtype.str) for a in arrays)
            if key not in self._by_shapes:
                self._by_shapes = {key: self._build([tract_fact(a) for a in arrays])}  # one shape set held
            runnable = self._by_shapes[key]
        try:
            values = [t.to_numpy() for t in runnable.run(arrays)]
        except Exception as exc:
            raise self._run_error(exc) from exc
        return self._select(fetch, values)


class ReferenceSession(Session):
    def __init__(self, model, info, evaluator):
        super().__init__(model, info)
        self.evaluator = evaluator

    def run(self, fetch, feeds):
        try:
            values = self.evaluator.run(fetch, feeds)
        except Exception as exc:
            raise self._run_error(exc) from exc
        return [np.asarray(v) for v in values]


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


def open_session(model: onnx.ModelProto | str | os.PathLike, runtime: str = "onnxruntime", *, device: str = "auto",
                 precision: str | None = None, threads: int = 0, folder: str | os.PathLike | None = None) -> Session:
    """Load `model` on `runtime` ('onnxruntime', 'openvino', 'tract', 'reference', or NAME:DEVICE).

    `precision`: None/'default' (the runtime's own choice), 'f32', 'bf16' or 'f16' (openvino
    only). The session's `info` records the precision the runtime reports it chose. A model
    file goes to onnxruntime as its structure, onnxruntime reading the weights from the file
    (`modelio.load_structure`); `folder` is where such a structure model's weights lie.
    """
    from onnxbn.modelio import load_model, load_structure

    name, dev, requested = check_runtime(runtime, device, precision)
    if name == "onnxruntime" and isinstance(model, (str, os.PathLike)):
        model, folder = load_structure(model)
    else:
        model = load_model(model)
    if name == "onnxruntime":
        return _open_ort(model, dev, requested, threads, folder)
    opener = {"openvino": _open_openvino, "tract": _open_tract, "reference": _open_reference}[name]
    return opener(model, dev, requested, threads)


def _open_ort(model, device, requested, threads, folder=None):
    from onnxbn.runtime import make_session, session_provider

    own = model_precision(model)
    session = make_session(model, device, threads, tf32=None if requested == "default" else False, folder=folder)
    provider = session_provider(session)
    precision = own
    if provider == "cuda" and own == "f32":
        options = session.get_provider_options().get("CUDAExecutionProvider", {})
        if str(options.get("use_tf32", "0")) == "1":
            precision = "tf32"
    info = RuntimeInfo("onnxruntime", runtime_version("onnxruntime"), provider, precision, requested, own,
                       provider=session.get_providers()[0])
    return OrtSession(model, info, session)


@functools.cache
def _ov_core():
    return runtime_module("openvino").Core()


def _write(model: onnx.ModelProto) -> tuple[tempfile.TemporaryDirectory, str]:
    """The model as a file in a fresh temporary folder (external data past 1.8 GB)."""
    workdir = tempfile.TemporaryDirectory(prefix="onnxbn-rt-")
    path = os.path.join(workdir.name, "model.onnx")
    large = model.ByteSize() > 1_800_000_000
    onnx.save_model(model, path, save_as_external_data=large, all_tensors_to_one_file=True,
                    location="model.onnx.data" if large else None)
    return workdir, path


def _open_openvino(model, device, requested, threads):
    ov = runtime_module("openvino")
    core = _ov_core()
    config = {} if requested == "default" else {"INFERENCE_PRECISION_HINT": requested}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    workdir, path = _write(model)
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


def fixed_inputs(model: onnx.ModelProto) -> bool:
    """True when every run-time input's shape is known: every dimension a number."""
    from onnxbn.graph import graph_inputs, tensor_shape

    shapes = [tensor_shape(i.type) for i in graph_inputs(model)]
    return all(shape is not None and all(isinstance(d, int) and d > 0 for d in shape) for shape in shapes)


_TRACT_TYPES = {"float32": "f32", "float64": "f64", "float16": "f16", "int64": "i64", "int32": "i32",
                "int16": "i16", "int8": "i8", "uint8": "u8", "uint16": "u16", "bool": "bool"}


def tract_fact(array: np.ndarray) -> str:
    """tract's input fact for `array`: '2,3,224,224,f32'."""
    kind = _TRACT_TYPES.get(array.dtype.name)
    if kind is None:
        raise UserError(f"tract: onnxbn cannot give tract an input of type {array.dtype.name}")
    return ",".join([*map(str, array.shape), kind])


def _open_tract(model, device, requested, threads):
    """A model whose inputs are all fixed is built once; any other is built for each set of input shapes
    the data brings (tract's explicit input facts), as tract cannot run an undetermined input."""
    tract = runtime_module("tract")
    from onnxbn.graph import graph_inputs

    workdir, path = _write(model)

    def build(facts=()):
        try:
            inference = tract.onnx().load(path)
            for i, fact in enumerate(facts):
                inference.set_input_fact(i, fact)
            return inference.into_model().into_runnable()
        except Exception as exc:
            raise load_error("tract", exc, model) from exc

    try:
        runnable = build() if fixed_inputs(model) else None
    except UserError:
        workdir.cleanup()
        raise
    if runnable is not None:
        workdir.cleanup()
    info = RuntimeInfo("tract", runtime_version("tract"), "cpu", model_precision(model), requested,
                       model_precision(model), provider="CPU (default runtime, one thread)")
    session = TractSession(model, info, runnable, [i.name for i in graph_inputs(model)],
                           None if runnable is not None else build)
    session._workdir = workdir  # the model file the builds read: kept until the session goes
    return session


def _open_reference(model, device, requested, threads):
    from onnx.reference import ReferenceEvaluator

    try:
        evaluator = ReferenceEvaluator(model)
    except Exception as exc:
        raise load_error("reference", exc, model) from exc
    info = RuntimeInfo("reference", runtime_version("reference"), "cpu", model_precision(model), requested,
                       model_precision(model), provider="onnx.reference.ReferenceEvaluator (numpy)")
    return ReferenceSession(model, info, evaluator)


# ----------------------------------------------------------------------------- load errors

def _first_line(exc: BaseException) -> str:
    """The first line of an error that says something (runtimes lead with file:line banners), with
    the first cause when the runtime gives one (tract: 'Caused by:'); never a stack trace."""
    lines = [line.strip() for line in str(exc).split("Stack backtrace:")[0].splitlines()]
    lines = [line for line in lines if line and not line.startswith(("Exception from src/", "Check '"))]
    if not lines:
        return type(exc).__name__
    first = lines[0]
    if "Caused by:" in lines[1:]:
        cause = lines[lines.index("Caused by:", 1) + 1:]
        if cause:
            first = f"{first}: {cause[0]}"
    return first[:300]


_OP_PATTERNS = {
    # onnxruntime: Could not find an implementation for Det(22) node with name 'det'
    "onnxruntime": re.compile(r"implementation for (?P<op>[\w.]+)\((?P<opset>\d+)\) node with name '(?P<node>[^']*)'"),
    # OpenVINO: No conversion rule found for operations: Det-18, com.example.MyOp
    "openvino": re.compile(r"No conversion rule found for operations: (?P<ops>[^\n]+)"),
    # tract: Translating node #2 "bad_node" Unimplemented(LpPool) ToTypedTranslator
    "tract": re.compile(r"node #\d+ \"(?P<node>[^\"]*)\" Unimplemented\((?P<op>[\w.]+)\)"),
    # onnx.reference: No registered schema for operator 'MyOp' and domain ''; Node type 'MyOp' from domain ...
    "reference": re.compile(r"(?:operator|Node type) '(?P<op>[\w.]+)'"),
}


def load_error(runtime: str, exc: BaseException, model: onnx.ModelProto) -> UserError:
    """One line: which runtime cannot load the model, and the operator (and node) it lacks when it says so."""
    text = str(exc)
    match = _OP_PATTERNS.get(runtime) and _OP_PATTERNS[runtime].search(text)
    if match:
        if runtime == "openvino":
            ops = [o.strip() for o in match["ops"].split(",") if o.strip()]
            op = re.sub(r"-\d+$", "", ops[0]).split(".")[-1]
            more = f" (and {', '.join(ops[1:])})" if len(ops) > 1 else ""
        else:
            op, more = match["op"], ""
        node = match.groupdict().get("node") or next(
            (n.name or n.output[0] for n in model.graph.node if n.op_type == op), "")
        where = f" (node {node!r})" if node else ""
        return UserError(f"{runtime} cannot load the model: it has no implementation of operator {op}{where}{more}; "
                         f"run it on another runtime, or replace that operator")
    tract_node = re.search(r"Building node (?P<node>\S+) \((?P<op>[\w.]+)\)", text)
    if runtime == "tract" and tract_node:
        return UserError(f"tract cannot load the model: it cannot build operator {tract_node['op']} "
                         f"(node {tract_node['node']!r}); run it on another runtime, or replace that operator")
    return UserError(f"{runtime} cannot load the model: {_first_line(exc)}")


# ----------------------------------------------------------------------------- intermediates

def expose(model: onnx.ModelProto, names: list[str], types: dict) -> onnx.ModelProto:
    """A copy of `model` with `names` added as graph outputs (so that any runtime returns them)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    existing = {o.name for o in out.graph.output}
    for name in names:
        if name not in existing:
            out.graph.output.append(helper.make_tensor_value_info(name, types[name].tensor_type.elem_type, None))
    return out
