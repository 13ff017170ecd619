"""The integers of quantized weights and biases, computed in numpy a whole tensor at a time.

`placement.place_qdq` lets onnxruntime's QDQ quantizer place the Q/DQ nodes on the model with one-element
stand-ins for its large initializers (where Q/DQ nodes go depends on the graph, not on the weights' values);
`fill_weights` then writes the real weights' integers, scales and zero points into that placement, with the
formulas of onnxruntime's quantizer (quant_utils.compute_scale_zp and quantize_nparray,
qdq_quantizer._adjust_weight_scale_for_int32_bias, base_quantizer.quantize_bias_static_impl; onnxruntime
1.20 to 1.32 agree on float32 weights), which computes them one output channel at a time in Python: on VGG16
(138 M weights) 2.4 s there against about 0.45 s here. The result is the model quantize_static writes (test).

Weights, per output channel c along the DequantizeLinear's axis (or per tensor), from the range
[lo, hi] = [min(min w, 0), max(max w, 0)]:

    int8, symmetric:   a = max(-lo, hi),  s = float32(2a / 254),  z = 0          (q in [-127, 127])
    uint8, asymmetric (one range per tensor, through onnxruntime's own compute_scale_zp):
                       s = float32((hi - lo) / 255),  z = round(-lo / s)
    s = 1, z = 0 where the float64 scale is below float32's smallest normal number (a channel of zeros)
    q = clip(round_half_even(w / s) + z)  (float32 arithmetic; clip to the type's range)

Bias b of a node whose input has scale s_x and whose weight has scale s_w (Gemm: times its beta):

    s_w is first raised where s_x * s_w < 1.0001 * 2|b| / (2^32 - 2) (its int32 would overflow), to that bound
    s_b = s_x * s_w * beta (float32),  q_b = clip(round(b / s_b)) to int32 (float64 arithmetic),  z_b = 0
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from onnxbn.graph import GraphIndex
from onnxbn.io.model import Model

QUANTIZED = "_quantized"  # onnxruntime's names: "<weight>_quantized", "<weight>_scale", "<bias>_quantized_scale"
BLOCK_ELEMENTS = 1 << 22  # elements per numpy step: temporaries of 16 MB, not the size of a VGG16 fc6
INT32_RANGE = float(np.iinfo(np.int32).max) - float(np.iinfo(np.int32).min + 1)
# whether a type's range is symmetric: onnxbn asks onnxruntime for symmetric int8 and asymmetric uint8
SYMMETRIC = {int(onnx.TensorProto.INT8): True, int(onnx.TensorProto.UINT8): False}
INT8_STEPS = 254.0  # symmetric int8: q in [-127, 127]


class _Weight:
    """One quantized initializer: its float values, its type, its channel axis (None: per tensor), and the
    scale and zero point computed for it."""

    def __init__(self, values: np.ndarray, qtype: int, axis: int | None):
        self.values, self.qtype, self.axis = values, qtype, axis
        self.scale, self.zero_point = _scale_zero_point(values, qtype, axis)


def _channels(values: np.ndarray, axis: int | None) -> np.ndarray:
    """`values` as (before, channels, after): the channel axis in the middle (one channel when per tensor)."""
    if axis is None:  # rows of the last dimension: blocks of rows, as for a channel axis
        return values.reshape(-1, 1, values.shape[-1] if values.ndim else 1)
    return values.reshape(int(np.prod(values.shape[:axis])), values.shape[axis], -1)


def _blocks(view: np.ndarray) -> Iterator[tuple[slice, slice]]:
    """Slices of a (before, channels, after) view into steps of about BLOCK_ELEMENTS elements."""
    before, channels, after = view.shape
    if before > 1:
        step = max(1, BLOCK_ELEMENTS // max(1, channels * after))
        for i in range(0, before, step):
            yield slice(i, i + step), slice(None)
    else:
        step = max(1, BLOCK_ELEMENTS // max(1, after))
        for i in range(0, channels, step):
            yield slice(None), slice(i, i + step)


def _scale_zero_point(values: np.ndarray, qtype: int, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Per channel (shape [C], symmetric int8) or per tensor (shape []) scale (float32) and zero point (the
    type's dtype). A tensor's one range goes through onnxruntime's own compute_scale_zp, whose float
    arithmetic for an asymmetric range changed between releases (1.32 subtracts in float64); the channels'
    symmetric ranges, where the releases agree (2a is exact in float32), are computed together."""
    view = _channels(values, axis)
    lo = np.full(view.shape[1], np.inf, np.float32)
    hi = np.full(view.shape[1], -np.inf, np.float32)
    for rows, cols in _blocks(view):
        block = view[rows, cols]
        lo[cols] = np.minimum(lo[cols], block.min(axis=(0, 2)))
        hi[cols] = np.maximum(hi[cols], block.max(axis=(0, 2)))
    if axis is None:
        from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType

        low, high = get_qmin_qmax_for_qType(qtype, symmetric=SYMMETRIC[qtype])
        zero_point, scale = compute_scale_zp(lo.reshape(()), hi.reshape(()), low, high, SYMMETRIC[qtype])
        return np.asarray(scale, np.float32).reshape(()), np.asarray(zero_point).reshape(())
    hi = np.maximum(np.abs(np.minimum(lo, np.float32(0))), np.abs(np.maximum(hi, np.float32(0))))
    scale = (hi.astype(np.float64) * 2.0) / INT8_STEPS
    degenerate = scale < np.finfo(np.float32).tiny
    zero_point = np.zeros(scale.shape, onnx.helper.tensor_dtype_to_np_dtype(qtype))
    return np.where(degenerate, np.float32(1.0), scale.astype(np.float32)), zero_point


def _integers(weight: _Weight) -> np.ndarray:
    """round_half_even(w / s) + z clipped to the type's range, per channel, in float32 (onnxruntime's
    quantize_nparray clips to the type's full range)."""
    dtype = onnx.helper.tensor_dtype_to_np_dtype(weight.qtype)
    low, high = np.iinfo(dtype).min, np.iinfo(dtype).max
    view = _channels(weight.values, weight.axis)
    out = np.empty(view.shape, dtype)
    scale = weight.scale.reshape(1, -1, 1)
    shift = weight.zero_point.astype(np.float32).reshape(1, -1, 1)
    for rows, cols in _blocks(view):
        q = np.divide(view[rows, cols], scale[:, cols])
        np.rint(q, out=q)
        if weight.zero_point.any():  # a zero point of 0 (symmetric) adds nothing
            q += shift[:, cols]
        out[rows, cols] = np.clip(q, low, high, out=q)
    return out.reshape(weight.values.shape)


def _raise_for_bias(weight: _Weight, input_scale: np.ndarray, bias: np.ndarray) -> None:
    """Raise the weight's scales where input_scale * scale would put the bias outside int32
    (onnxruntime's _adjust_weight_scale_for_int32_bias; symmetric int8 weights only)."""
    if weight.qtype != onnx.TensorProto.INT8 or weight.zero_point.any() or not weight.scale.size:
        return
    if weight.axis is None:
        absmax = max(abs(min(float(bias.min()), 0.0)), abs(max(float(bias.max()), 0.0)))
        smallest = np.float64(1.0001 * (2.0 * absmax) / INT32_RANGE)
    else:
        smallest = (1.0001 * (2.0 * np.abs(bias))).astype(np.float64) / INT32_RANGE
    candidate = np.float64(input_scale.item()) * weight.scale.astype(np.float64)
    small = (candidate < smallest) & (candidate > 0.0)
    if np.any(small):
        raised = (weight.scale.astype(np.float64) * (smallest / np.where(small, candidate, 1.0))).astype(np.float32)
        weight.scale = np.where(small, raised, weight.scale).astype(np.float32)


def _bias_integers(bias: np.ndarray, input_scale: np.ndarray, weight_scale: np.ndarray, beta: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(int32 bias, its float32 scale flattened): onnxruntime's quantize_bias_static_impl."""
    if beta == 0:
        bias, beta = np.zeros_like(bias), 1.0
    scale = input_scale * weight_scale * beta
    q = np.rint(np.asarray(bias, np.float64) / np.asarray(scale, np.float64))
    q = np.clip(q, float(np.iinfo(np.int32).min), float(np.iinfo(np.int32).max)).astype(np.int32)
    return q.reshape(bias.shape), np.asarray(scale, np.float32).reshape(-1)


def _put(inits: dict[str, onnx.TensorProto], tensor: onnx.TensorProto) -> None:
    inits[tensor.name].CopyFrom(tensor)


def _put_array(inits: dict[str, onnx.TensorProto], name: str, values: np.ndarray) -> None:
    """Initializer `name` holds `values` as raw data, as numpy_helper.from_array writes it (one copy less)."""
    tensor = inits[name]
    tensor.Clear()
    tensor.name, tensor.data_type = name, onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
    tensor.dims.extend(values.shape)
    tensor.raw_data = values.tobytes()


def fill_weights(placed: onnx.ModelProto, model: Model, stubbed: set[str]) -> bool:
    """Write into `placed` (onnxruntime's QDQ placement of `model` in which the initializers `stubbed` were
    one-element stand-ins) the quantized values of the real weights and biases (read where `model` holds
    them: a model file's weights from the file), and put back, with their data, the stand-ins it left in
    float. False when the placement holds something this does not account for (a quantized
    initializer of another name, a weight shared by biases, a type other than int8/uint8 weights and int32
    biases): then `placed` is half written, and the caller places again with the real weights."""
    if not stubbed:  # onnxruntime computed every value from the real tensors
        return True
    source = {t.name: t for t in model.proto.graph.initializer}
    nodes = {n.name: n for n in model.proto.graph.node}
    index = GraphIndex(placed)
    inits, producer, readers = index.initializers, index.producers, index.consumers

    quantized: dict[str, onnx.NodeProto] = {}  # float initializer -> the DequantizeLinear of its integers
    for node in placed.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and node.input[0].endswith(QUANTIZED):
            original = node.input[0][:-len(QUANTIZED)]
            if original not in source:
                return False
            quantized[original] = node
    biases = {name: dq for name, dq in quantized.items() if inits[dq.input[0]].data_type == onnx.TensorProto.INT32}

    pairs = {}  # bias -> (its layer's weight, the scale of the layer's input, Gemm's beta)
    for bias, dq in biases.items():
        users = readers.get(dq.output[0], [])
        if len(users) != 1 or len(users[0].input) < 2:
            return False
        user = users[0]
        if user.op_type == "Gemm" and user.name not in nodes:  # its beta is read from the model's node
            return False
        weight_dq, input_dq = producer.get(user.input[1]), producer.get(user.input[0])
        if (weight_dq is None or input_dq is None or input_dq.op_type != "DequantizeLinear"
                or input_dq.input[1] not in inits or weight_dq.input[0][:-len(QUANTIZED)] not in quantized):
            return False
        beta = 1.0 if user.op_type != "Gemm" else next((a.f for a in nodes[user.name].attribute
                                                         if a.name == "beta"), 1.0)
        pairs[bias] = (weight_dq.input[0][:-len(QUANTIZED)], numpy_helper.to_array(inits[input_dq.input[1]]), beta)

    redo = {w for w in quantized if w in stubbed and w not in biases}
    redo |= {w for b, (w, _, _) in pairs.items() if b in stubbed}
    biases_per_weight = Counter(w for w, _, _ in pairs.values())
    if any(biases_per_weight[w] > 1 for w in redo):
        return False
    weights = {}
    for name in redo:
        dq = quantized[name]
        qtype = inits[dq.input[0]].data_type
        if qtype not in SYMMETRIC or source[name].data_type != onnx.TensorProto.FLOAT:
            return False
        axis = next((a.i for a in dq.attribute if a.name == "axis"), None)
        if axis is not None and qtype != onnx.TensorProto.INT8:  # onnxruntime's channels are symmetric int8
            return False
        values = model.array(name)
        weights[name] = _Weight(values, qtype, None if axis is None else axis % values.ndim)

    for bias, (name, input_scale, beta) in pairs.items():
        if name not in weights:
            continue
        if source[bias].data_type != onnx.TensorProto.FLOAT:
            return False
        values = model.array(bias)
        _raise_for_bias(weights[name], input_scale, values)
        q, scale = _bias_integers(values, input_scale, weights[name].scale, beta)
        dq = biases[bias]
        _put_array(inits, dq.input[0], q)
        _put_array(inits, dq.input[1], scale)
        if scale.size > 1:
            _put_array(inits, dq.input[2], np.zeros(scale.shape, np.int32))
        else:
            _put(inits, onnx.helper.make_tensor(dq.input[2], onnx.TensorProto.INT32, [], [0]))
        del dq.attribute[:]
        if scale.size > 1:
            dq.attribute.append(onnx.helper.make_attribute("axis", 0))

    for name, weight in weights.items():
        dq = quantized[name]
        _put_array(inits, dq.input[0], _integers(weight))
        _put(inits, onnx.helper.make_tensor(dq.input[2], weight.qtype, weight.zero_point.shape,
                                            weight.zero_point.ravel().tolist()))
        _put(inits, onnx.helper.make_tensor(dq.input[1], onnx.TensorProto.FLOAT, weight.scale.shape,
                                            weight.scale.ravel().tolist()))
    for name in stubbed & inits.keys():  # left in float by the placement (an excluded node's weight, ...)
        inits[name].CopyFrom(numpy_helper.from_array(model.array(name), name))
    return True
