"""Model: an ONNX graph and, for each initializer, where its bytes live.

A `Model` is a ModelProto plus the two places a weight's data may be besides inside the proto,
like onnx-ir's `ExternalTensor` (a tensor that names a file range) beside its in-memory tensors:

    inline     the initializer's own raw_data / typed fields (small tensors, models built in Python)
    file       external data: `length` bytes at `offset` of a file in `folder` (a model opened from a
               path keeps its large weights in its own file: `io.load.load_structure`)
    array      a numpy array in `arrays`, the initializer a stub naming it (location IN_MEMORY); what a
               transform writes (folded weights, recalibrated statistics, fine-tuned parameters)

so a transform reads and writes weights without ever holding the ones it does not touch, and a
VGG16 goes from file to file in 1 MiB reads. Every transform is `transform(model: Model, ...) ->
Model` (plus a report where it has one) and leaves its input as it was; the public `ModelProto ->
ModelProto` functions wrap one (`Model.open(x)` in, `.to_proto()` out).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx

from onnxbn.io.copies import detach_weights, model_sha256
from onnxbn.io.load import load_structure
from onnxbn.io.save import StagedOutput, save_model
from onnxbn.io.tensors import IN_MEMORY, FileRange, data_source, materialize, memory_stub, tensor_array


class Model:
    """`proto` with its initializers' data inline, in files of `folder`, or in `arrays` (see the module docstring).

    `proto` may be read and edited (a transform's own copy); weights are read with `array` and written
    with `set_array`, which never touch the files in `folder`.
    """

    def __init__(self, proto: onnx.ModelProto, arrays: dict[str, np.ndarray] | None = None,
                 folder: str | os.PathLike | None = None):
        self.proto = proto
        self.arrays = {} if arrays is None else arrays
        self.folder = None if folder is None else Path(folder)

    @classmethod
    def open(cls, source: str | os.PathLike | onnx.ModelProto | Model) -> Model:
        """The Model of `source`: a path is read as its structure (large weights stay in the file), a
        ModelProto is wrapped as it is (transforms copy before they edit, so it is never changed), a Model
        is returned as it is."""
        if isinstance(source, Model):
            return source
        if isinstance(source, onnx.ModelProto):
            return cls(source)
        proto, folder = load_structure(source)
        return cls(proto, folder=folder)

    def copy(self) -> Model:
        """A copy whose proto and array map may be edited without changing this one (arrays are shared
        until replaced: `set_array` never writes into an array)."""
        proto = onnx.ModelProto()
        proto.CopyFrom(self.proto)
        return Model(proto, dict(self.arrays), self.folder)

    def with_graph(self, proto: onnx.ModelProto) -> Model:
        """`proto` (a graph cut from or built on this model's) reading its weights where this model holds
        them: the same array map (shared, not copied) and folder."""
        return Model(proto, self.arrays, self.folder)

    def detached(self) -> Model:
        """A light copy whose large inline weights are arrays too (`io.copies.detach_weights`): onnxruntime
        takes arrays as they are, so a VGG16 is neither serialised nor parsed again to build a session."""
        light, arrays = detach_weights(self.proto)
        return Model(light, {**self.arrays, **arrays}, self.folder)

    def held_arrays(self) -> dict[str, np.ndarray]:
        """The arrays of the initializers held as arrays (their stubs' location IN_MEMORY), in graph order."""
        return {t.name: self.arrays[t.name] for t in self.proto.graph.initializer
                if any(e.key == "location" and e.value == IN_MEMORY for e in t.external_data)}

    # -- weights

    def initializer(self, name: str) -> onnx.TensorProto:
        for tensor in self.proto.graph.initializer:
            if tensor.name == name:
                return tensor
        raise KeyError(f"the model has no initializer {name!r}")

    def source(self, name: str) -> np.ndarray | FileRange | onnx.TensorProto:
        """Where initializer `name`'s bytes live: an array, a file range, or the tensor itself (inline)."""
        tensor = self.initializer(name)
        where = data_source(tensor, self.arrays, self.folder)
        return tensor if where is None else where

    def array(self, name: str) -> np.ndarray:
        """The values of initializer `name`, wherever they live."""
        return self.tensor_array(self.initializer(name))

    def tensor_array(self, tensor: onnx.TensorProto) -> np.ndarray:
        """The values of `tensor` (an initializer or a Constant node's value) of this model."""
        return tensor_array(tensor, self.arrays, self.folder)

    def set_array(self, name: str, value: np.ndarray) -> None:
        """Initializer `name` holds `value` from now on, in its own element type (added, of `value`'s type,
        when the model has none of that name); the file its old bytes were in is not touched."""
        tensor = next((t for t in self.proto.graph.initializer if t.name == name), None)
        if tensor is None:
            tensor = self.proto.graph.initializer.add()
            data_type = onnx.helper.np_dtype_to_tensor_dtype(np.asarray(value).dtype)
        else:
            data_type = tensor.data_type
        value = np.asarray(value, dtype=onnx.helper.tensor_dtype_to_np_dtype(data_type))
        tensor.CopyFrom(memory_stub(name, data_type, value.shape))
        self.arrays[name] = value

    # -- out

    def save(self, path: str | os.PathLike, inputs: Iterable = (), force: bool = False) -> Path:
        """Write the model to `path` atomically (`io.save.save_model`): never over one of `inputs` unless `force`."""
        return save_model(self.proto, path, inputs, force, weights=self.arrays, folder=self.folder)

    def stage(self, path: str | os.PathLike, inputs: Iterable = (), force: bool = False) -> StagedOutput:
        """The model written next to `path` for a check before it takes `path`'s place (`io.save.StagedOutput`)."""
        return StagedOutput(self.proto, path, inputs, force, weights=self.arrays, folder=self.folder)

    def sha256(self) -> str:
        """The provenance hash of graph and weights (`io.copies.model_sha256`), files read in 1 MiB pieces."""
        return model_sha256(self.proto, self.arrays, self.folder)

    def whole(self) -> onnx.ModelProto:
        """A ModelProto with every initializer's data inside it, this Model left as it is: its own proto
        when that holds them all already, else a filled-in copy (`to_proto` of `copy`)."""
        if not self.arrays and self.folder is None:
            return self.proto
        return self.copy().to_proto()

    def to_proto(self) -> onnx.ModelProto:
        """The ModelProto with every initializer's data inside it. The Model's own proto is filled in and
        returned (no copy), and the Model keeps pointing at it."""
        materialized = materialize(self.proto, self.arrays, self.folder)
        self.arrays, self.folder = {}, None
        return materialized
