"""onnxbn: add batch normalization to a pretrained ONNX network without changing what it computes.

The public API is re-exported here and imported lazily, so `import onnxbn` (and the
command line) stays fast and torch is loaded only by the functions that need it.
Module names differ from the functions they export (check.compare,
training.finetune): importing a submodule binds its name on the package, which
would otherwise shadow the function.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "export_vgg": "onnxbn.export",
    "collect_stats": "onnxbn.stats",
    "merge_stats": "onnxbn.stats",
    "load_stats": "onnxbn.stats",
    "select_points": "onnxbn.points",
    "insert_bn": "onnxbn.insert",
    "compare": "onnxbn.check",
    "save_outputs": "onnxbn.check",
    "load_outputs": "onnxbn.check.golden",
    "fold_bn": "onnxbn.fold",
    "explain_fold": "onnxbn.fold",
    "fold_verified": "onnxbn.deploy",
    "reduce": "onnxbn.check.reduction",
    "to_torch": "onnxbn.torch_import",
    "write_back": "onnxbn.torch_import",
    "finetune": "onnxbn.training",
    "evaluate": "onnxbn.training",
    "recalibrate": "onnxbn.recalibration",
    "quantize": "onnxbn.quantization",
    "collect_ranges": "onnxbn.ranges",
    "merge_ranges": "onnxbn.ranges",
    "UserError": "onnxbn.errors",
    "Model": "onnxbn.io.model",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'onnxbn' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
