"""Equivalence assertions for a user's own test suite (pytest, unittest, or plain asserts).


    def test_fold_keeps_the_outputs():
        assert_equivalent("model_bn.onnx", "model_deploy.onnx", data="val.npz")

`assert_equivalent` runs both models on the same inputs (`onnxbn.compare`) and raises
`AssertionError` whose message is the comparison table, plus the first diverging tensor
when `layerwise=True`; bad input still raises `onnxbn.UserError`.
"""

from __future__ import annotations

from onnxbn.check.comparison import compare
from onnxbn.check.report import Report


def assert_equivalent(reference, candidate, data=None, random: int = 8, atol: float = 1e-5, rtol: float = 1e-5,
                      layerwise: bool = False, **options) -> Report:
    """Pass when every output element satisfies |a - b| <= atol + rtol*|a|; else AssertionError.

    `data`: image folder, .npz, array, (x, y), torch Dataset/DataLoader or iterable of batches;
    without it, `random` seeded normal inputs. `options` go to `onnxbn.compare` (device, runtime,
    preset, limit, min_samples, ...). Returns the report when it passes.
    """
    report = compare(reference, candidate, data=data, random=None if data is not None else random, atol=atol,
                     rtol=rtol, layerwise=layerwise, **options)
    if not report.passed:
        raise AssertionError("the models are not equivalent:\n" + report.table())
    return report
