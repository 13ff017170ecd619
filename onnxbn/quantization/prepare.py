"""Before quantization: the refusals, the BN fold, the opset.

Refused with a UserError (one line): a model already quantized (QuantizeLinear, DequantizeLinear, QLinear*,
*Integer ops), no float input or weight, no operator onnxruntime quantizes, --exclude naming no node.
BatchNormalization nodes are folded with `onnxbn.fold` (a BN fold cannot place keeps its float BN and is listed
in the report); the folded BNs' parameters are kept for `recover="bn"`. Per-channel Q/DQ needs opset 13 (per
tensor: 11, for the ranges pass): an older model is converted with onnx.version_converter.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from onnxbn.errors import UserError
from onnxbn.graph import GraphIndex, graph_inputs, opset_version
from onnxbn.io.model import Model
from onnxbn.quantization.report import QuantizeReport

QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
                 "QGemm", "QAttention", "DynamicQuantizeMatMul", "MatMulNBits"}


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


def _bn_parameters(model: Model) -> dict[str, dict]:
    """Per BN label: |gamma|, beta, a^2 = (gamma / sqrt(var + eps))^2 and eps, in float64."""
    index = GraphIndex(model)
    out = {}
    for bn in model.proto.graph.node:
        if bn.op_type != "BatchNormalization":
            continue
        values = [index.constant_array(n) for n in bn.input[1:5]]
        if any(v is None for v in values):
            continue
        gamma, beta, _, var = (np.asarray(v, np.float64) for v in values)
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        out[bn.name or bn.output[0]] = {"gamma": np.abs(gamma), "beta": beta, "a2": gamma ** 2 / (var + eps), "eps": eps}
    return out


def fold_batchnorm(model: Model, report: QuantizeReport) -> tuple[Model, dict[str, dict]]:
    """(model with its BN folded, per folded layer's node name the BN parameters of `_bn_parameters`)."""
    if not any(n.op_type == "BatchNormalization" for n in model.proto.graph.node):
        return model, {}
    from onnxbn.fold import fold

    params = _bn_parameters(model)
    folded, fold_report = fold(model)
    decisions = fold_report.decisions
    into = {}
    for d in decisions:
        if d["action"] == "folded":
            report.bn_folded.append(d["bn"])
            if d["direction"] == "backward" and d["bn"] in params:
                into[d["into"]] = params[d["bn"]]
        else:
            report.bn_kept.append(f"{d['bn']} ({d['reason']})")
    return folded, into


def raise_opset(model: onnx.ModelProto, target: int = 13) -> onnx.ModelProto:
    """`model` converted to opset `target` by onnx.version_converter and checked; a UserError when that fails."""
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
