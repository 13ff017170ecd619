"""Q/DQ placement through onnxruntime's tooling, and which tensors' ranges it reads.

`place_qdq` runs onnxruntime.quantization.quantize_static in QDQ format with onnxbn's ranges handed over as a
calibration cache (no CalibrationDataReader: the calibration is onnxbn's). Weights INT8 symmetric, per output
channel (scale = max|w_c| / 127, zero point 0) unless per_channel=False; activations per tensor, uint8
asymmetric (default; onnxruntime's CPU choice) or int8 symmetric. `quantized_tensors` finds the tensors whose
ranges that placement reads, so the ranges pass observes only those.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from onnxbn.errors import UserError


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
