"""`onnx.reference.ReferenceEvaluator` behind `Session`: numpy, slow, independent of every optimising
runtime; the model's own types.
"""

from __future__ import annotations

import numpy as np

from onnxbn.runtimes.base import Session, runtime_version
from onnxbn.runtimes.errors import load_error
from onnxbn.runtimes.precision import RuntimeInfo, model_precision


class ReferenceSession(Session):
    def __init__(self, model, info, evaluator):
        super().__init__(model, info)
        self.evaluator = evaluator

    def run(self, fetch, feeds):
        try:
            values = self.evaluator.run(fetch, feeds)
        except Exception as exc:
            raise self._run_error(exc) from exc
        return [np.asarray(v) for v in values]


def open_reference(model, device, requested, threads):
    from onnx.reference import ReferenceEvaluator

    try:
        evaluator = ReferenceEvaluator(model)
    except Exception as exc:
        raise load_error("reference", exc, model) from exc
    info = RuntimeInfo("reference", runtime_version("reference"), "cpu", model_precision(model), requested,
                       model_precision(model), provider="onnx.reference.ReferenceEvaluator (numpy)")
    return ReferenceSession(model, info, evaluator)
