"""INT8 quantization for deployment, one job per module (imports run down this list):

  report     `QuantizeReport`: what was done, the INT8 check and its gate
  prepare    the refusals, the BN fold, the opset
  placement  Q/DQ placement through onnxruntime's quantizer; which tensors' ranges it reads
  recovery   accuracy recovery: cross-layer equalization, bias correction, BN re-estimation
  api        `quantize` / `quantize_with_report`: the steps in order (see its docstring)

The names below are the package's public API (`onnxbn.quantize` is `quantize`).
"""

from onnxbn.quantization.api import DEFAULT_RECOVER, RECOVERIES, parse_recover, quantize, quantize_with_report
from onnxbn.quantization.placement import UNREAD_RANGE, place_qdq, quantized_tensors
from onnxbn.quantization.prepare import refuse_unquantizable
from onnxbn.quantization.recovery import equalize, recover_accuracy
from onnxbn.quantization.report import DEFAULT_MIN_COSINE, DEFAULT_MIN_TOP1, QuantizeReport

__all__ = ["DEFAULT_MIN_COSINE", "DEFAULT_MIN_TOP1", "DEFAULT_RECOVER", "RECOVERIES", "UNREAD_RANGE", "QuantizeReport",
           "equalize", "parse_recover", "place_qdq", "quantize", "quantize_with_report", "quantized_tensors",
           "recover_accuracy", "refuse_unquantizable"]
