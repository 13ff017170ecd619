"""What a runtime computed in, and the tolerance that follows from it.

`RuntimeInfo.precision` is the arithmetic precision the runtime reports for float layers
(f32, f16, bf16, tf32, f64). `lowered` is True when that is below the model's own float
type; `default_tolerance(...)` is then looser than the 1e-5 used for a full-precision run
(TOLERANCES, with the reasons in the README's "Deploying" section).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import onnx

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
_RANK = {"f64": 3, "f32": 2, "tf32": 1, "f16": 1, "bf16": 0}
_ELEM: dict[int, str] = {onnx.TensorProto.FLOAT: "f32", onnx.TensorProto.DOUBLE: "f64", onnx.TensorProto.FLOAT16: "f16",
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
        types.append(max(weights, key=lambda t: weights[t]))
    return min((_ELEM[t] for t in types if t in _ELEM), key=lambda p: _RANK[p], default="f32")
