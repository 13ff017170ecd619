"""INT8 quantization for deployment: onnxbn's calibration, onnxruntime's Q/DQ placement, accuracy recovery.

Steps (`quantize`):

1. BN: BatchNormalization nodes are folded first with `onnxbn.fold` (a BN fold cannot place
   keeps its float BN and is listed in the report). The BN parameters of the folded ones are
   kept for `recover="bn"`.
2. Opset: per-channel Q/DQ needs opset 13 (per tensor: 11, for the ranges pass); an older model
   is converted with onnx.version_converter (a UserError when that fails).
3. Ranges: the min/max and histogram of every float activation tensor whose range onnxruntime's
   Q/DQ placement reads (`quantized_tensors`) from one streaming in-graph
   pass (`onnxbn.ranges`, memory flat in the data size), or a ranges file from
   `onnxbn stats --ranges` (of the BN-folded model). `method` turns them into each tensor's
   range: minmax, percentile (99.99 by default), entropy (TensorRT's KL threshold), mse (the
   threshold minimising the expected quantization error); see onnxbn.ranges. The model's own
   outputs always keep their min/max range (clipped logits lose their order).
4. Q/DQ placement: onnxruntime.quantization.quantize_static in QDQ format with those ranges
   handed over as a calibration cache (no CalibrationDataReader: the calibration is onnxbn's).
   Weights INT8 symmetric, per output channel (scale = max|w_c| / 127, zero point 0) unless
   per_channel=False; activations per tensor, uint8 asymmetric (default; onnxruntime's CPU
   choice) or int8 symmetric.
5. Recovery, each selectable (`recover`; default cle,bias, the best of the combinations measured by
   `tools/bench.py quantize`), bias and bn done by editing the Q/DQ parameters of each quantized
   Conv/Gemm, level by level in graph order (one pass over the data per level, every statistic
   an in-graph per-channel reduction: memory flat):
     bias  y_q per output channel gets the float model's mean: b -= E[y_q] - E[y_float]
           (the float bias, re-quantized to int32 with the bias scale);
     bn    for a layer a BN was folded into: BN re-estimation through the Q/DQ nodes. With
           z = a (x - mu) + beta the folded layer (a = gamma / sqrt(var + eps)), re-estimating the
           BN on the quantized x gives z' = |gamma| (z_q - E z_q) / sqrt(Var z_q + a^2 eps) + beta:
           the weight scales (per channel, so the int8 weights stay as they are) and the bias
           scale are multiplied by k = |gamma| / sqrt(Var z_q + a^2 eps), the bias set so the
           mean is beta. Needs per-channel weights.
     cle   cross-layer equalization (Nagel et al. 2019) of Conv pairs joined through ReLU/MaxPool
           (dense or depthwise second layer), before the ranges are gathered: the weights' per-channel
           ranges are balanced, the function is unchanged (see `equalize`).
   With both bias and bn, bn's scale is applied and bias's mean wins (the float model's mean).
6. Verification: `onnxbn.check.compare` of the float (folded) model and the INT8 model on
   onnxruntime; the gate is top-1 agreement and cosine similarity, not element-wise atol.

Refused with a UserError (one line): a model already quantized (QuantizeLinear,
DequantizeLinear, QLinear*, *Integer ops), no float input, no operator onnxruntime quantizes,
--exclude naming no node, onnxruntime's quantizer failing.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from onnxbn.errors import UserError
from onnxbn.graph import GraphIndex, graph_inputs, opset_version, reads, value_types
from onnxbn.points import Point
from onnxbn.ranges import METHODS, activation_tensors, choose_ranges, collect_ranges, load_ranges
from onnxbn.tolerances import INT8_GATES

log = logging.getLogger("onnxbn")

RECOVERIES = ("bias", "bn", "cle")
DEFAULT_RECOVER = ("cle", "bias")  # the best of none/bias/bn/bn,bias/cle/cle,bias measured: see tools/bench.py quantize
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
                 "QGemm", "QAttention", "DynamicQuantizeMatMul", "MatMulNBits"}
LAYERS = ("Conv", "Gemm")
DEFAULT_MIN_COSINE = INT8_GATES["cosine"]  # check's int8 rule
DEFAULT_MIN_TOP1 = INT8_GATES["top1"]


@dataclass
class QuantizeReport:
    method: str
    per_channel: bool
    activations: str
    recover: list[str]
    opset: tuple[int, int]
    bn_folded: list[str] = field(default_factory=list)
    bn_kept: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    ranges: dict = field(default_factory=dict)
    layers: list[dict] = field(default_factory=list)
    equalized: dict = field(default_factory=dict)
    passes: int = 0
    check: dict = field(default_factory=dict)
    min_cosine: float = DEFAULT_MIN_COSINE
    min_top1: float = DEFAULT_MIN_TOP1
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        outs = self.check.get("outputs", {})
        return bool(outs) and all(o["cosine_similarity"] >= self.min_cosine and
                                  o.get("top1_agreement", 1.0) >= self.min_top1 for o in outs.values())

    def to_dict(self) -> dict:
        return {"method": self.method, "per_channel": self.per_channel, "activations": self.activations,
                "recover": self.recover, "opset": list(self.opset), "bn_folded": self.bn_folded,
                "bn_kept": self.bn_kept, "excluded": self.excluded, "ranges": self.ranges, "layers": self.layers,
                "equalized": self.equalized,
                "recovery_passes": self.passes, "check": self.check, "min_cosine": self.min_cosine,
                "min_top1": self.min_top1, "passed": self.passed, "seconds": round(self.seconds, 3)}

    def table(self) -> str:
        lines = [f"INT8 QDQ: weights int8 {'per channel' if self.per_channel else 'per tensor'}, activations "
                 f"{self.activations} per tensor, ranges {self.method}, recovery {','.join(self.recover) or 'none'}"]
        if self.bn_folded or self.bn_kept:
            lines.append(f"BN folded first: {len(self.bn_folded)}" + (f"; kept in float: {', '.join(self.bn_kept)}"
                                                                      if self.bn_kept else ""))
        for name, o in self.check.get("outputs", {}).items():
            top1 = f"  top-1 agreement {o['top1_agreement']:.2%}" if "top1_agreement" in o else ""
            lines.append(f"{name}: cosine {o['cosine_similarity']:.5f}{top1}  max rel error "
                         f"{o['max_rel_error']:.3g}  ({self.check.get('samples')} samples)")
        lines.append(("PASS" if self.passed else "FAIL") + f" (gate: cosine >= {self.min_cosine}, top-1 agreement >= "
                     f"{self.min_top1})")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- checks and preparation

def refuse_unquantizable(model: onnx.ModelProto, exclude: list[str]) -> None:
    """UserError unless `model` is a float model onnxruntime can quantize."""
    for node in model.graph.node:
        if node.op_type in QUANTIZED_OPS or node.op_type.startswith("QLinear"):
            raise UserError(f"the model is already quantized (node {node.name or node.output[0]!r} is "
                            f"{node.op_type}); quantize the float model")
    inits = {t.name for t in model.graph.initializer}
    inputs = graph_inputs(model)
    if not any(i.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.FLOAT16) for i in inputs) and \
            not any(t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16) for t in model.graph.initializer):
        raise UserError("the model has no float tensors to quantize (no float input or weight)")
    names = {n.name for n in model.graph.node}
    unknown = [e for e in exclude if e not in names]
    if unknown:
        raise UserError(f"--exclude: no node named {unknown[0]!r} in the model (node names: "
                        f"{', '.join(sorted(n for n in names if n)[:8])}...)")
    from onnxruntime.quantization.registry import QDQRegistry

    index = GraphIndex(model)
    weighted = [n for n in model.graph.node if n.op_type in QDQRegistry and n.name not in exclude
                and any(i in inits or index.constant(i) is not None for i in n.input if i)]
    if not weighted:
        ops = sorted({n.op_type for n in model.graph.node})
        raise UserError(f"onnxruntime cannot quantize any weighted operator of this model (ops: {', '.join(ops)}; "
                        "it quantizes Conv, ConvTranspose, Gemm, MatMul, ...); nothing to do")


def _bn_parameters(model: onnx.ModelProto) -> dict[str, dict]:
    """Per BN label: |gamma|, beta, a^2 = (gamma / sqrt(var + eps))^2 and eps, in float64."""
    index = GraphIndex(model)
    out = {}
    for bn in model.graph.node:
        if bn.op_type != "BatchNormalization":
            continue
        values = [index.constant_array(n) for n in bn.input[1:5]]
        if any(v is None for v in values):
            continue
        gamma, beta, _, var = (np.asarray(v, np.float64) for v in values)
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        out[bn.name or bn.output[0]] = {"gamma": np.abs(gamma), "beta": beta, "a2": gamma ** 2 / (var + eps), "eps": eps}
    return out


def _fold(model: onnx.ModelProto, report: QuantizeReport) -> tuple[onnx.ModelProto, dict[str, dict]]:
    """(model with its BN folded, per folded layer's node name the BN parameters of `_bn_parameters`)."""
    if not any(n.op_type == "BatchNormalization" for n in model.graph.node):
        return model, {}
    from onnxbn.fold import fold
    from onnxbn.io.model import Model

    params = _bn_parameters(model)
    folded_model, fold_report = fold(Model.open(model))
    folded, decisions = folded_model.to_proto(), fold_report.decisions
    into = {}
    for d in decisions:
        if d["action"] == "folded":
            report.bn_folded.append(d["bn"])
            if d["direction"] == "backward" and d["bn"] in params:
                into[d["into"]] = params[d["bn"]]
        else:
            report.bn_kept.append(f"{d['bn']} ({d['reason']})")
    return folded, into


def _raise_opset(model: onnx.ModelProto, target: int = 13) -> onnx.ModelProto:
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, target)
        onnx.checker.check_model(converted)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:120]
        raise UserError(f"{'per-channel Q/DQ' if target >= 13 else 'quantization'} needs opset {target} and "
                        f"converting the model from opset {opset_version(model)} failed ({type(exc).__name__}: "
                        f"{first}); convert it with onnx.version_converter yourself") from exc
    return converted


def _ensure_bias(model: onnx.ModelProto) -> None:
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
    for _ in range(iterations):
        for a, b in pairs:
            w1, w2 = (numpy_helper.to_array(index.initializers[n]).astype(np.float64) for n in (a.input[1], b.input[1]))
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
            dtype = numpy_helper.to_array(index.initializers[a.input[1]]).dtype
            _set(index, a.input[1], (w1 / scale.reshape((channels,) + (1,) * (w1.ndim - 1))).astype(dtype))
            _set(index, b.input[1], (w2 * scale.reshape(shape2)).astype(dtype))
            if len(a.input) > 2 and a.input[2]:
                _set(index, a.input[2], (_array(index, a.input[2]).astype(np.float64) / scale).astype(dtype))
            total[a.name] = total.get(a.name, 1.0) * scale
    return total


# ----------------------------------------------------------------------------- Q/DQ placement

def place_qdq(model: onnx.ModelProto, tensor_ranges: dict[str, tuple[float, float]], *, per_channel: bool = True,
              activations: str = "uint8", exclude: Sequence[str] = ()) -> onnx.ModelProto:
    """onnxruntime's QDQ quantizer on `model` with these (lo, hi) activation ranges (no calibration run)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    data = TensorsData(CalibrationMethod.MinMax, {
        name: TensorData(lowest=np.array(lo, np.float32), highest=np.array(hi, np.float32))
        for name, (lo, hi) in tensor_ranges.items()})
    with tempfile.TemporaryDirectory(prefix="onnxbn-quantize-") as tmp:
        cache, out = Path(tmp) / "ranges.json", Path(tmp) / "int8.onnx"
        save_tensors_data(data, cache)
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)  # onnxruntime logs "please pre-process" warnings on the root logger
        try:
            quantize_static(model, out, None, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
                            weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude),
                            calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=cache,
                            extra_options={"ActivationSymmetric": activations == "int8", "WeightSymmetric": True})
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"onnxruntime's quantizer failed on this model ({type(exc).__name__}: "
                            f"{(str(exc).strip().splitlines() or [''])[0][:160]}); --exclude the node it names") from exc
        finally:
            logging.disable(previous)
        return onnx.load(str(out))


UNREAD_RANGE = (-1.0, 1.0)  # handed to onnxruntime for the tensors whose ranges it does not read


def quantized_tensors(model: onnx.ModelProto, tensors: list[str], *, activations: str = "uint8",
                      exclude: Sequence[str] = ()) -> list[str]:
    """The tensors of `tensors` whose ranges onnxruntime's QDQ placement reads: those its QuantizeLinear
    scales are made from ("<tensor>_scale"), found by placing Q/DQ once with UNREAD_RANGE everywhere.

    The others need no ranges pass: a Conv output whose ReLU onnxruntime removes (uint8 activations: the
    ReLU's output range is used), the outputs of MaxPool, Flatten, Reshape, ... (their input's scale).
    Not observing them also lets onnxruntime keep Conv+ReLU fused and its blocked layout, which exposing
    a Conv output breaks. All of `tensors` when a scale name maps to none of them (another naming)."""
    # where activations are quantized does not depend on per-channel weights: the per-tensor placement is quicker
    placed = place_qdq(model, dict.fromkeys(tensors, UNREAD_RANGE), per_channel=False, activations=activations,
                       exclude=exclude)
    scales = {n.input[1] for n in placed.graph.node if n.op_type == "QuantizeLinear"}
    used = [t for t in tensors if f"{t}_scale" in scales]
    return used if len(used) == len(scales) else list(tensors)


# ----------------------------------------------------------------------------- recovery

@dataclass
class _Layer:
    node: str
    q_out: str
    f_out: str
    w_scale: str
    b_q: str
    b_scale: str
    level: int = 0
    bn: dict | None = None


def quantized_layers(qdq: onnx.ModelProto, float_model: onnx.ModelProto) -> list[_Layer]:
    """Conv/Gemm nodes of `qdq` whose weight and bias come from DequantizeLinear of initializers (owned by
    that node alone), with the level of each (1 + the most quantized layers on any path above it)."""
    qi = GraphIndex(qdq)
    float_nodes = {n.name: n for n in float_model.graph.node if n.name}
    level: dict[str, int] = {}
    layers = []
    for node in qdq.graph.node:
        above = max((level.get(t, 0) for t in reads(node)), default=0)
        found = None
        if node.op_type in LAYERS and node.name in float_nodes and len(node.input) > 2:
            w_dq, b_dq = qi.producers.get(node.input[1]), qi.producers.get(node.input[2])
            alpha_beta = [a.f for a in node.attribute if a.name in ("alpha", "beta")]
            if (w_dq is not None and b_dq is not None and w_dq.op_type == b_dq.op_type == "DequantizeLinear"
                    and all(v == 1.0 for v in alpha_beta)
                    and all(n in qi.initializers and len(qi.consumers.get(n, [])) == 1
                            for n in (w_dq.input[1], b_dq.input[0], b_dq.input[1]))
                    and len(qi.consumers.get(node.input[1], [])) == 1 and len(qi.consumers.get(node.input[2], [])) == 1):
                found = _Layer(node.name, node.output[0], float_nodes[node.name].output[0], w_dq.input[1], b_dq.input[0],
                               b_dq.input[1], above + 1)
                layers.append(found)
        for o in node.output:
            level[o] = found.level if found else above
    return layers


def _moments(model: onnx.ModelProto, tensors: list[str], open_dataset, batch_size: int, workers, strict: bool,
             device: str, desc: str) -> dict:
    """Per-channel (count, mean, M2) of `tensors` over the data, reduced in the graph (onnxbn.stats)."""
    from onnxbn.feeding import run_batches
    from onnxbn.io.copies import detach_weights
    from onnxbn.runtimes.ort_backend import make_session
    from onnxbn.stats import ChannelMoments, augment_for_stats

    types = value_types(model)
    points = []
    for t in tensors:
        shape = None
        tt = types.get(t)
        if tt is not None and tt.HasField("tensor_type") and tt.tensor_type.HasField("shape"):
            shape = [d.dim_value or None for d in tt.tensor_type.shape.dim]
        points.append(Point(t, "", "", None, shape, "float"))
    light, weights = detach_weights(model)
    graph = augment_for_stats(light, points)
    session = make_session(graph.model, device, weights=weights, arena=False)
    moments = {t: ChannelMoments() for t in tensors}
    for _, _, values in run_batches(session, open_dataset(), graph.fetch, model, batch_size, workers=workers,
                                    strict=strict, desc=desc):
        for t, (mean, m2, count) in graph.batch_moments(dict(zip(graph.fetch, values, strict=True))).items():
            moments[t].merge(count, mean, m2)
    return moments


def _array(index: GraphIndex, name: str) -> np.ndarray:
    return numpy_helper.to_array(index.initializers[name])


def _set(index: GraphIndex, name: str, value: np.ndarray) -> None:
    index.initializers[name].CopyFrom(numpy_helper.from_array(value, name))


def recover_accuracy(qdq: onnx.ModelProto, float_model: onnx.ModelProto, bn_into: dict[str, dict], modes: list[str],
            open_dataset, *, batch_size: int, workers, strict: bool, device: str) -> tuple[list[dict], int]:
    """Apply bias correction and/or BN re-estimation to `qdq` in place (see the module docstring);
    return (one entry per corrected layer, passes over the data)."""
    layers = quantized_layers(qdq, float_model)
    if not layers or not modes:
        return [], 0
    for layer in layers:
        layer.bn = bn_into.get(layer.node)
    index = GraphIndex(qdq)
    float_stats = _moments(float_model, [layer.f_out for layer in layers], open_dataset, batch_size, workers, strict,
                           device, "float stats") if "bias" in modes else {}
    passes = 1 if float_stats else 0
    entries = []
    for level in sorted({layer.level for layer in layers}):
        group = [layer for layer in layers if layer.level == level]
        q_stats = _moments(qdq, [layer.q_out for layer in group], open_dataset, batch_size, workers, strict, device,
                           f"recover level {level}")
        passes += 1
        for layer in group:
            m_q, v_q = q_stats[layer.q_out].mean, q_stats[layer.q_out].var
            w_scale = _array(index, layer.w_scale).astype(np.float64)
            b_scale = _array(index, layer.b_scale).astype(np.float64)
            b_int = _array(index, layer.b_q)
            bias = b_int.astype(np.float64) * b_scale
            k = np.ones_like(m_q)
            target = m_q.copy()
            entry = {"node": layer.node, "level": level, "tensor": layer.q_out}
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
                _set(index, layer.w_scale, (w_scale * k).astype(_array(index, layer.w_scale).dtype))
            _set(index, layer.b_scale, new_b_scale.astype(_array(index, layer.b_scale).dtype))
            info = np.iinfo(b_int.dtype)
            scale32 = new_b_scale.astype(np.float32).astype(np.float64)
            _set(index, layer.b_q, np.clip(np.round(new_bias / scale32), info.min, info.max).astype(b_int.dtype))
            entries.append(entry)
    return entries, passes


# ----------------------------------------------------------------------------- the API

def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


def parse_recover(value) -> list[str]:
    modes = _as_list(value)
    if modes == ["none"]:
        return []
    bad = [m for m in modes if m not in RECOVERIES]
    if bad:
        raise UserError(f"--recover: unknown recovery {bad[0]!r}: use {', '.join(RECOVERIES)} (comma separated) or none")
    return list(dict.fromkeys(modes))


def quantize_with_report(model, data, *, method: str = "minmax", percentile: float = 99.99, per_channel: bool = True,
                         activations: str = "uint8", exclude=None, recover=DEFAULT_RECOVER, ranges=None,
                         verify_data=None, min_cosine: float = DEFAULT_MIN_COSINE, min_top1: float = DEFAULT_MIN_TOP1,
                         batch_size: int = 32, limit: int | None = None, seed: int = 0, preset: str | None = None,
                         workers: int | None = 0, strict: bool = False, device: str = "auto", verify: bool = True
                         ) -> tuple[onnx.ModelProto, QuantizeReport]:
    """(INT8 QDQ model, QuantizeReport); see `quantize`. `verify=False` skips the check against the
    float model (the report's `check` stays empty and `passed` is False)."""
    from onnxbn.check import compare
    from onnxbn.feeding import open_model_data
    from onnxbn.io.load import load_own

    started = time.perf_counter()
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if activations not in ("uint8", "int8"):
        raise UserError(f"--activations must be uint8 or int8 (got {activations!r})")
    modes, exclude = parse_recover(recover), _as_list(exclude)
    if "bn" in modes and not per_channel:
        raise UserError("--recover bn rescales each output channel's weight scale: it needs per-channel weights "
                        "(drop --per-tensor, or use --recover bias)")
    if ranges is not None and "cle" in modes:
        raise UserError("--ranges with --recover cle: equalization rescales activations after the ranges were "
                        "gathered; drop cle from --recover (e.g. --recover bias) or let quantize gather the ranges")
    proto = load_own(model)
    refuse_unquantizable(proto, exclude)
    index = GraphIndex(proto)
    for node in proto.graph.node:  # recovery finds layers by name in the float and the INT8 graphs
        if not node.name:
            node.name = index.unique_name(f"{node.op_type}_{node.output[0]}")
    before = opset_version(proto)
    report = QuantizeReport(method, per_channel, activations, modes, (before, before), excluded=exclude,
                            min_cosine=min_cosine, min_top1=min_top1)
    proto, bn_into = _fold(proto, report)
    needed = 13 if per_channel else 11  # per-channel DequantizeLinear: 13; the ranges pass: 11
    if opset_version(proto) < needed:
        proto = _raise_opset(proto, needed)
    report.opset = (before, opset_version(proto))
    if "cle" in modes:
        scales = equalize(proto)
        report.equalized = {name: [float(v.min()), float(v.max())] for name, v in scales.items()}
        for name, scale in scales.items():  # the layer's output is divided by scale: so is its BN's target
            if name in bn_into:
                bn = bn_into[name]
                bn_into[name] = dict(bn, gamma=bn["gamma"] / scale, beta=bn["beta"] / scale, a2=bn["a2"] / scale ** 2)
    if modes:
        _ensure_bias(proto)
    floats = activation_tensors(proto)
    wanted = quantized_tensors(proto, floats, activations=activations, exclude=exclude)
    if ranges is None:
        found = collect_ranges(proto, data, tensors=wanted, histograms=method != "minmax", batch_size=batch_size,
                               limit=limit, seed=seed, preset=preset, workers=workers, strict=strict, device=device)
    else:
        found = load_ranges(ranges)
        missing = [t for t in wanted if t not in found.tensors]
        if missing:
            raise UserError(f"the ranges file has no tensor {missing[0]!r} of this model; gather the ranges of the "
                            "model as quantized (BN folded: `onnxbn fold`, then `onnxbn stats --ranges`)")
    report.ranges = {"samples": found.meta.get("samples"), "seconds": found.meta.get("seconds"),
                     "tensors": len(wanted), "bins": found.meta.get("bins")}
    chosen = choose_ranges(found, wanted, method, percentile, outputs=[o.name for o in proto.graph.output])
    qdq = place_qdq(proto, {t: chosen.get(t, UNREAD_RANGE) for t in floats}, per_channel=per_channel,
                    activations=activations, exclude=exclude)
    if modes:
        if data is None:
            raise UserError("--recover needs --data (calibration data)")

        def open_dataset():
            return open_model_data(proto, data, preset=preset, limit=limit, seed=seed)

        report.layers, report.passes = recover_accuracy(qdq, proto, bn_into, [m for m in modes if m != "cle"],
                                                        open_dataset, batch_size=batch_size,
                                                        workers=workers if workers is not None else 0, strict=strict,
                                                        device=device)
    if not verify:
        report.seconds = time.perf_counter() - started
        return qdq, report
    check_data = verify_data if verify_data is not None else data
    result = compare(proto, qdq, data=check_data, atol=float("inf"), rtol=0.0, batch_size=batch_size,
                     device=device, limit=limit, seed=seed, preset=preset, strict=strict, workers=workers or 0)
    check = result.to_dict()
    report.check = {"samples": check.get("samples"), "data": "verify" if verify_data is not None else "calibration",
                    "outputs": {k: {m: v[m] for m in ("cosine_similarity", "top1_agreement", "top5_agreement",
                                                      "max_rel_error", "mean_abs_error") if m in v}
                                for k, v in check["outputs"].items()}}
    report.seconds = time.perf_counter() - started
    return qdq, report


def quantize(model, data, **options) -> onnx.ModelProto:
    """An INT8 QDQ copy of `model` (path or ModelProto) calibrated on `data` (image folder, .npz, array).

    Keyword options: method ("minmax", "percentile", "entropy", "mse"), percentile (99.99),
    per_channel (True), activations ("uint8" or "int8"), exclude (node names kept in float),
    recover ("cle,bias" default; any of "bias", "bn", "cle", comma separated, or "none"), ranges (a ranges file or Ranges
    instead of the calibration pass), verify_data, min_cosine, min_top1, batch_size, limit, seed,
    preset, workers, strict, device. See the module docstring; `quantize_with_report` also
    returns the report (ranges, per-layer corrections, the int8 check against the float model).
    """
    return quantize_with_report(model, data, **options)[0]
