"""Accuracy recovery after INT8 Q/DQ placement: cross-layer equalization, bias correction, BN re-estimation.

bias and bn edit the Q/DQ parameters of each quantized Conv/Gemm, level by level in graph order (one pass over
the data per level, every statistic an in-graph per-channel reduction: memory flat):
  bias  y_q per output channel gets the float model's mean: b -= E[y_q] - E[y_float]
        (the float bias, re-quantized to int32 with the bias scale);
  bn    for a layer a BN was folded into: BN re-estimation through the Q/DQ nodes. With
        z = a (x - mu) + beta the folded layer (a = gamma / sqrt(var + eps)), re-estimating the
        BN on the quantized x gives z' = |gamma| (z_q - E z_q) / sqrt(Var z_q + a^2 eps) + beta:
        the weight scales (per channel, so the int8 weights stay as they are) and the bias
        scale are multiplied by k = |gamma| / sqrt(Var z_q + a^2 eps), the bias set so the
        mean is beta. Needs per-channel weights.
  cle   cross-layer equalization (Nagel et al. 2019) of Conv pairs joined through ReLU/MaxPool
        (dense or depthwise second layer), on the float model before the ranges are gathered: the
        weights' per-channel ranges are balanced, the function is unchanged (see `equalize`).
With both bias and bn, bn's scale is applied and bias's mean wins (the float model's mean).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnxbn.graph import GraphIndex, value_types
from onnxbn.io.model import Model
from onnxbn.recalibration.exact import run_levels
from onnxbn.stats import ChannelMoments

LAYERS = ("Conv", "Gemm")
CACHE_MB = 1024.0  # activations kept between the levels' passes, on disk (recalibration's exact-mode default)


def ensure_bias(model: onnx.ModelProto) -> None:
    """Give every Conv/Gemm without a bias a zero one, so that recovery has a quantized bias to correct."""
    index = GraphIndex(model)
    for node in model.graph.node:
        if node.op_type not in LAYERS or (len(node.input) > 2 and node.input[2]):
            continue
        w = index.constant_array(node.input[1]) if len(node.input) > 1 else None
        if w is None:
            continue
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        channels = w.shape[0] if node.op_type == "Conv" or trans_b else w.shape[1]
        name = index.add_initializer(np.zeros(channels, w.dtype), f"{node.name or node.output[0]}.bias")
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name


HOMOGENEOUS = {"Relu", "MaxPool", "LeakyRelu", "PRelu"}  # f(s x) = s f(x) for s > 0, channel by channel


def _cle_pairs(index: GraphIndex) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """(A, B): Conv A whose output reaches Conv B's data input alone, through positively homogeneous
    single-consumer ops (Relu, MaxPool, ...), B dense (group 1) or depthwise over A's channels."""
    pairs = []
    for a in index.graph.node:
        if a.op_type != "Conv" or index.constant_array(a.input[1]) is None:
            continue
        tensor = a.output[0]
        while True:
            users = index.consumers.get(tensor, [])
            if len(users) != 1 or tensor in index.outputs:
                break
            user = users[0]
            if user.op_type in HOMOGENEOUS and user.input[0] == tensor:
                if user.op_type == "PRelu" and index.constant_array(user.input[1]) is None:
                    break
                tensor = user.output[0]
                continue
            if (user.op_type == "Conv" and user.input[0] == tensor and len(user.input) > 1
                    and index.constant_array(user.input[1]) is not None):
                pairs.append((a, user))
            break
    return pairs


def equalize(model: onnx.ModelProto, iterations: int = 8) -> dict[str, np.ndarray]:
    """Cross-layer equalization (Nagel et al. 2019) in place: for each pair (A, B) of `_cle_pairs`, A's output
    channel c is divided by s_c = sqrt(r1_c / r2_c) and B's input channel c multiplied by it (r1_c: max |W_A[c]|,
    r2_c: max |W_B[:, c]|, or |W_B[c]| for a depthwise B), so that both ranges become sqrt(r1_c r2_c); the model
    computes the same function. Returns, per Conv A, the total scale its output channels were divided by."""
    index = GraphIndex(model)
    pairs = [(a, b) for a, b in _cle_pairs(index)
             if all(n in index.initializers and len(index.consumers.get(n, [])) == 1
                    for n in [a.input[1], b.input[1]] + ([a.input[2]] if len(a.input) > 2 and a.input[2] else []))]
    total: dict[str, np.ndarray] = {}
    held: dict[str, np.ndarray] = {}  # the tensors as they are after each step, in their own dtype

    def array(name: str) -> np.ndarray:
        if name not in held:
            held[name] = _array(index, name)
        return held[name]

    for _ in range(iterations):
        for a, b in pairs:
            w1, w2 = (array(n).astype(np.float64) for n in (a.input[1], b.input[1]))
            channels = w1.shape[0]
            group = next((x.i for x in b.attribute if x.name == "group"), 1)
            depthwise = group == channels and w2.shape[0] == channels and w2.shape[1] == 1
            if not depthwise and (group != 1 or w2.shape[1] != channels):
                continue
            r1 = np.abs(w1).reshape(channels, -1).max(axis=1)
            r2 = (np.abs(w2).reshape(channels, -1) if depthwise else np.abs(np.moveaxis(w2, 1, 0)).reshape(channels, -1)
                  ).max(axis=1)
            scale = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.where(r2 > 0, r2, 1.0)), 1.0)
            shape2 = (channels,) + (1,) * (w2.ndim - 1) if depthwise else (1, channels) + (1,) * (w2.ndim - 2)
            dtype = array(a.input[1]).dtype
            held[a.input[1]] = (w1 / scale.reshape((channels,) + (1,) * (w1.ndim - 1))).astype(dtype)
            held[b.input[1]] = (w2 * scale.reshape(shape2)).astype(dtype)
            if len(a.input) > 2 and a.input[2]:
                held[a.input[2]] = (array(a.input[2]).astype(np.float64) / scale).astype(dtype)
            total[a.name] = total.get(a.name, 1.0) * scale
    for name, value in held.items():
        _set(index, name, value)
    return total


@dataclass
class _Layer:
    """A quantized layer to correct; `exact.run_levels` measures its output (`input`, `key`: q_out) at its level."""

    node: str
    q_out: str
    f_out: str
    w_scale: str
    b_q: str
    b_scale: str
    level: int = 0
    bn: dict | None = None

    @property
    def key(self) -> str:
        return self.q_out

    @property
    def input(self) -> str:
        return self.q_out


def quantized_layers(qdq: onnx.ModelProto, float_model: onnx.ModelProto) -> list[_Layer]:
    """Conv/Gemm nodes of `qdq` whose weight and bias come from DequantizeLinear of initializers (owned by
    that node alone)."""
    qi = GraphIndex(qdq)
    float_nodes = {n.name: n for n in float_model.graph.node if n.name}
    layers = []
    for node in qdq.graph.node:
        if node.op_type in LAYERS and node.name in float_nodes and len(node.input) > 2:
            w_dq, b_dq = qi.producers.get(node.input[1]), qi.producers.get(node.input[2])
            alpha_beta = [a.f for a in node.attribute if a.name in ("alpha", "beta")]
            if (w_dq is not None and b_dq is not None and w_dq.op_type == b_dq.op_type == "DequantizeLinear"
                    and all(v == 1.0 for v in alpha_beta)
                    and all(n in qi.initializers and len(qi.consumers.get(n, [])) == 1
                            for n in (w_dq.input[1], b_dq.input[0], b_dq.input[1]))
                    and len(qi.consumers.get(node.input[1], [])) == 1 and len(qi.consumers.get(node.input[2], [])) == 1):
                layers.append(_Layer(node.name, node.output[0], float_nodes[node.name].output[0], w_dq.input[1],
                                     b_dq.input[0], b_dq.input[1]))
    return layers


def _moments(model: onnx.ModelProto, tensors: list[str], open_dataset, batch_size: int, workers, strict: bool,
             device: str, desc: str) -> dict[str, ChannelMoments]:
    """Per-channel (count, mean, M2) of `tensors` over the data, reduced in the graph (onnxbn.stats)."""
    from onnxbn.feeding import run_batches
    from onnxbn.runtimes.ort_backend import make_session
    from onnxbn.stats import augment_for_stats, tensor_points

    light = Model(model).detached()
    graph = augment_for_stats(light.proto, tensor_points(value_types(model), tensors))
    session = make_session(light.with_graph(graph.model), device, arena=False)
    moments = {t: ChannelMoments() for t in tensors}
    for _, _, values in run_batches(session, open_dataset(), graph.fetch, model, batch_size, workers=workers,
                                    strict=strict, desc=desc):
        for t, (mean, m2, count) in graph.batch_moments(dict(zip(graph.fetch, values, strict=True))).items():
            moments[t].merge(count, mean, m2)
    return moments


def float_layer_outputs(model: onnx.ModelProto) -> list[str]:
    """The outputs of the model's Conv/Gemm nodes: where bias correction reads the float model's means."""
    return [node.output[0] for node in model.graph.node if node.op_type in LAYERS]


def _array(index: GraphIndex, name: str) -> np.ndarray:
    return numpy_helper.to_array(index.initializers[name])


def _set(index: GraphIndex, name: str, value: np.ndarray) -> None:
    index.initializers[name].CopyFrom(numpy_helper.from_array(value, name))


def recover_accuracy(qdq: onnx.ModelProto, float_model: onnx.ModelProto, bn_into: dict[str, dict], modes: list[str],
            open_dataset, *, batch_size: int, workers, strict: bool, device: str,
            float_stats: dict[str, ChannelMoments] | None = None) -> tuple[list[dict], int]:
    """Apply bias correction and/or BN re-estimation to `qdq` in place (see the module docstring);
    return (one entry per corrected layer, passes over the data). `float_stats`: the float model's
    per-channel moments of its layer outputs (`float_layer_outputs`), gathered by the caller (quantize's
    ranges pass); else bias correction runs a pass of the float model for them.

    The levels run as recalibration's exact mode runs its BN levels (`exact.run_levels`): pass k starts
    from the activations the earlier passes kept that no longer change (in .npy files of a temporary
    folder, up to CACHE_MB; anonymous memory stays flat), so all passes together cost about one forward
    pass of the INT8 model instead of one per level."""
    layers = quantized_layers(qdq, float_model)
    if not layers or not modes:
        return [], 0
    for layer in layers:
        layer.bn = bn_into.get(layer.node)
    index = GraphIndex(qdq)
    passes = 0
    if "bias" not in modes:
        float_stats = {}
    elif float_stats is None or any(layer.f_out not in float_stats for layer in layers):
        float_stats = _moments(float_model, [layer.f_out for layer in layers], open_dataset, batch_size, workers,
                               strict, device, "float stats")
        passes = 1
    entries = []
    work = Model(qdq).detached()  # the passes read large weights as arrays; corrections go to `work`, then to qdq

    def correct(group: list[_Layer], q_stats: dict) -> None:
        for layer in group:
            m_q, v_q = q_stats[layer.q_out].mean, q_stats[layer.q_out].var
            w_stored, b_stored = work.array(layer.w_scale), work.array(layer.b_scale)
            w_scale, b_scale = w_stored.astype(np.float64), b_stored.astype(np.float64)
            b_int = work.array(layer.b_q)
            bias = b_int.astype(np.float64) * b_scale
            k = np.ones_like(m_q)
            target = m_q.copy()
            entry = {"node": layer.node, "level": layer.level + 1, "tensor": layer.q_out}
            if "bn" in modes and layer.bn is not None and w_scale.size == m_q.size:
                live = v_q > 0
                bn = layer.bn
                k = np.where(live, bn["gamma"] / np.sqrt(np.where(live, v_q, 1.0) + bn["a2"] * bn["eps"]), 1.0)
                target = layer.bn["beta"].copy()
                entry["bn_scale"] = [float(k.min()), float(k.max())]
            if "bias" in modes:
                target = float_stats[layer.f_out].mean
                entry["mean_error_before"] = float(np.abs(m_q - target).max())
            new_bias = k * (bias - m_q) + target
            new_b_scale = b_scale * k
            if w_scale.size == k.size:
                work.set_array(layer.w_scale, (w_scale * k).astype(w_stored.dtype))
            work.set_array(layer.b_scale, new_b_scale.astype(b_stored.dtype))
            info = np.iinfo(b_int.dtype)
            scale32 = new_b_scale.astype(np.float32).astype(np.float64)
            work.set_array(layer.b_q, np.clip(np.round(new_bias / scale32), info.min, info.max).astype(b_int.dtype))
            entries.append(entry)

    with tempfile.TemporaryDirectory(prefix="onnxbn-recover-") as spill:
        levels, _, _ = run_levels(work, layers, open_dataset(), batch_size, apply=correct, desc="recover level",
                                  workers=workers, strict=strict, device=device, cache_mb=CACHE_MB, spill=spill)
    for layer in layers:
        for name in (layer.w_scale, layer.b_scale, layer.b_q):
            _set(index, name, work.array(name))
    return entries, passes + len(levels)
