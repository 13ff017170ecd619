"""Q/DQ placement through onnxruntime's tooling, and which tensors' ranges it reads.

`place_qdq` runs onnxruntime's QDQ quantizer (onnxruntime.quantization.QDQQuantizer, what quantize_static runs
in QDQ format) with onnxbn's ranges handed over as TensorsData (no CalibrationDataReader: the calibration is
onnxbn's). Weights INT8 symmetric, per output channel (scale = max|w_c| / 127, zero point 0) unless
per_channel=False; activations per tensor, uint8 asymmetric (default; onnxruntime's CPU choice) or int8
symmetric. `quantized_tensors` finds the tensors whose ranges that placement reads, so the ranges pass
observes only those.

The quantizer is called in memory, not through quantize_static, which copies the model, writes it to a
temporary folder, reloads it for shape inference and writes its result to a file that is then read back (on
VGG16, 553 MB, 4.3-5.1 s a placement). It places the Q/DQ nodes on the model with one-element stand-ins for
its large initializers, and `weights.fill_weights` computes the weights' integers with onnxruntime's formulas
a whole tensor at a time (onnxruntime loops over output channels in Python): on VGG16 a placement takes
0.5-0.6 s that way against 2.4 s with onnxruntime's own weight quantization. The quantizer gets the model with
`value_info` from onnx shape inference on its skeleton (the graph, weights reduced to types and dims; what
quantize_static's reload infers), marked as inferred as quantize_static marks it, so its result is the same
model (test: node for node and tensor for tensor against quantize_static, with weights computed either way;
on VGG16 byte for byte).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx

from onnxbn.errors import UserError
from onnxbn.graph import GraphIndex
from onnxbn.io.copies import skeleton
from onnxbn.io.model import Model
from onnxbn.io.tensors import element_count
from onnxbn.quantization.weights import fill_weights

log = logging.getLogger("onnxbn")

UNREAD_RANGE = (-1.0, 1.0)  # handed to onnxruntime for the tensors whose ranges it does not read
STUB_ELEMENTS = 1024  # quantized_tensors: initializers larger than this become one-element stand-ins


def _stand_ins(model: onnx.ModelProto) -> set[str]:
    """The initializers the placement replaces by one-element stand-ins: those of more than STUB_ELEMENTS."""
    return {t.name for t in model.graph.initializer if element_count(t) > STUB_ELEMENTS}


def _quantizer_input(model: onnx.ModelProto, stub_weights: bool) -> onnx.ModelProto:
    """A copy of `model` as onnxruntime's quantizer takes it: every tensor's type and shape in value_info (onnx
    shape inference on the skeleton, as quantize_static infers them) and the metadata saying so. With
    `stub_weights`, every initializer of more than STUB_ELEMENTS elements is a tensor of ones of the same
    type and rank with one element (the placement of activations' Q/DQ reads the graph and the types, not
    the weights' values; `quantized_tensors`)."""
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    light = skeleton(model, keep_elements=STUB_ELEMENTS)
    inferred = onnx.shape_inference.infer_shapes(light)
    out = light if stub_weights else onnx.ModelProto()
    if stub_weights:
        stubbed = _stand_ins(model)
        for tensor in out.graph.initializer:
            if tensor.name in stubbed:
                ones = np.ones([1] * len(tensor.dims), onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
                tensor.CopyFrom(onnx.numpy_helper.from_array(ones, tensor.name))
    else:
        out.CopyFrom(model)
    del out.graph.value_info[:]
    out.graph.value_info.extend(inferred.graph.value_info)
    add_infer_metadata(out)
    return out


def _quantizer(model: onnx.ModelProto, tensor_ranges: dict[str, tuple[float, float]], per_channel: bool,
               activations: str, exclude: Sequence[str], stub_weights: bool) -> onnx.ModelProto:
    """onnxruntime's QDQ quantizer on `_quantizer_input(model, stub_weights)` with these activation ranges."""
    from onnxruntime.quantization import CalibrationMethod, QDQQuantizer, QuantType, TensorData, TensorsData
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    ranges = TensorsData(CalibrationMethod.MinMax, {
        name: TensorData(lowest=np.array(lo, np.float32), highest=np.array(hi, np.float32))
        for name, (lo, hi) in tensor_ranges.items()})
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # onnxruntime logs on the root logger (e.g. tensors it leaves in float)
    try:
        quantizer = QDQQuantizer(
            _quantizer_input(model, stub_weights), per_channel, False,  # reduce_range: off, as quantize_static's
            QuantType.QInt8, QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8, ranges,
            [], list(exclude), sorted(set(QLinearOpsRegistry) | set(QDQRegistry)),  # quantize_static's op types
            {"ActivationSymmetric": activations == "int8", "WeightSymmetric": True})
        quantizer.quantize_model()
        quantizer.model.topological_sort()  # as quantize_static does before it writes the model
        return quantizer.model.model
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"onnxruntime's quantizer failed on this model ({type(exc).__name__}: "
                        f"{(str(exc).strip().splitlines() or [''])[0][:160]}); --exclude the node it names") from exc
    finally:
        logging.disable(previous)


def place_qdq(model: onnx.ModelProto | Model, tensor_ranges: dict[str, tuple[float, float]], *, per_channel: bool = True,
              activations: str = "uint8", exclude: Sequence[str] = (), stub_weights: bool = False) -> onnx.ModelProto:
    """onnxruntime's QDQ quantizer on `model` with these (lo, hi) activation ranges (no calibration run); a new
    model, `model` (a ModelProto or a Model, whose initializers of up to STUB_ELEMENTS elements are inline)
    left as it is.

    The quantizer places the Q/DQ nodes on the model with one-element stand-ins for the initializers of more
    than STUB_ELEMENTS elements; `weights.fill_weights` then writes the real weights' and biases' integers with
    onnxruntime's formulas (a whole tensor at a time, where onnxruntime loops over channels in Python). Should
    that placement hold something fill_weights does not account for, the quantizer runs again on the real
    weights. `stub_weights`: the stand-ins are left in (the Q/DQ nodes of activations are where they would be;
    the weights' scales and quantized values are not)."""
    options = {"per_channel": per_channel, "activations": activations, "exclude": exclude}
    source = Model.open(model)
    placed = _quantizer(source.proto, tensor_ranges, stub_weights=True, **options)
    if stub_weights or fill_weights(placed, source, _stand_ins(source.proto)):
        return placed
    log.debug("placement: the stand-in placement holds what fill_weights does not account for; real weights")
    return _quantizer(source.whole(), tensor_ranges, stub_weights=False, **options)


def constant_ranges(model: onnx.ModelProto) -> dict[str, tuple[float, float]]:
    """(min, max) of every float tensor a Constant (or ConstantOfShape of a fixed shape) node makes: the
    quantizer treats them as activations and needs their ranges (a LayerNorm written out by the TorchScript
    exporter adds its epsilon and raises to the power 2 from Constants); their values are known, no data is."""
    index = GraphIndex(model)
    found = {}
    for node in model.graph.node:
        if node.op_type in ("Constant", "ConstantOfShape"):
            value = index.constant_array(node.output[0])
            if value is not None and value.size and value.dtype in (np.float32, np.float16):
                found[node.output[0]] = (float(value.min()), float(value.max()))
    return found


def quantized_tensors(model: onnx.ModelProto, tensors: list[str], fixed: dict[str, tuple[float, float]] | None = None,
                      *, per_channel: bool = True, activations: str = "uint8", exclude: Sequence[str] = ()
                      ) -> list[str]:
    """The tensors of `tensors` whose ranges onnxruntime's QDQ placement reads: those its QuantizeLinear
    scales are made from ("<tensor>_scale"), found by placing Q/DQ once with UNREAD_RANGE everywhere on the
    model with stand-in weights (where activations are quantized depends on the graph, not on the weights'
    values; on VGG16 this placement takes 0.1 s, with the real weights 4.3 s).

    The others need no ranges pass: a Conv output whose ReLU onnxruntime removes (uint8 activations: the
    ReLU's output range is used), the outputs of MaxPool, Flatten, Reshape, ... (their input's scale).
    Not observing them also lets onnxruntime keep Conv+ReLU fused and its blocked layout, which exposing
    a Conv output breaks. All of `tensors` when a scale name maps to none of them (another naming). `fixed`:
    the ranges of tensors with known values (`constant_ranges`), handed over as they are."""
    placed = place_qdq(model, {**(fixed or {}), **dict.fromkeys(tensors, UNREAD_RANGE)}, per_channel=per_channel,
                       activations=activations, exclude=exclude, stub_weights=True)
    return read_ranges(placed, tensors, fixed or {})


def read_ranges(placed: onnx.ModelProto, tensors: list[str], fixed=()) -> list[str]:
    """The tensors of `tensors` whose ranges the placed model's activation QuantizeLinear nodes were made from
    ("<tensor>_scale"); all of `tensors` when a scale name maps to none of them nor of `fixed` (another naming)."""
    scales = {n.input[1] for n in placed.graph.node if n.op_type == "QuantizeLinear"}
    used = [t for t in tensors if f"{t}_scale" in scales]
    named = {f"{t}_scale" for t in [*tensors, *fixed]}
    return used if scales <= named else list(tensors)
