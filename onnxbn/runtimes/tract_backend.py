"""tract (the `tract` wheel, sonos/tract) behind `Session`: CPU, the model's own types.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxbn.errors import UserError
from onnxbn.runtimes.base import Session, runtime_module, runtime_version, write_temporary
from onnxbn.runtimes.errors import load_error
from onnxbn.runtimes.precision import RuntimeInfo, model_precision


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


class TractSession(Session):
    """`runnable` for a model whose inputs are all fixed; otherwise `build(facts)` makes one per set of
    feed shapes (tract needs every input's shape determined: the data gives it)."""

    def __init__(self, model, info, runnable, feed_order, build=None, workdir=None):
        super().__init__(model, info)
        self.runnable = runnable
        self.feed_order = feed_order
        self._build = build
        self._by_shapes: dict = {}
        self._workdir = workdir  # the model file the builds read: kept until the session goes

    def run(self, fetch, feeds):
        arrays = [np.ascontiguousarray(feeds[n]) for n in self.feed_order]
        runnable = self.runnable
        if runnable is None:
            assert self._build is not None  # a session without a runnable is given `build`
            key = tuple((a.shape, a.dtype.str) for a in arrays)
            if key not in self._by_shapes:
                self._by_shapes = {key: self._build([tract_fact(a) for a in arrays])}  # one shape set held
            runnable = self._by_shapes[key]
        try:
            values = [t.to_numpy() for t in runnable.run(arrays)]
        except Exception as exc:
            raise self._run_error(exc) from exc
        return self._select(fetch, values)


def open_tract(model, device, requested, threads):
    """A model whose inputs are all fixed is built once; any other is built for each set of input shapes
    the data brings (tract's explicit input facts), as tract cannot run an undetermined input."""
    tract = runtime_module("tract")
    from onnxbn.graph import graph_inputs

    workdir, path = write_temporary(model)

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
    return TractSession(model, info, runnable, [i.name for i in graph_inputs(model)],
                        None if runnable is not None else build, workdir)
