"""The name the bundled model's metadata gives its source task: `onnxbn.source_task` = "onnxbn.demo_data:source".

models/demo_vgg.onnx was exported (and its sha256 pinned in its card) before the demo became the package
onnxbn/demo/; this alias keeps that "module:task" reference importable. The code is onnxbn.demo.data.
"""

from __future__ import annotations

from onnxbn.demo.data import (
           CLASSES,
           IMAGE_SIZE,
           IMAGENET_MEAN,
           IMAGENET_STD,
           make_task,
           to_model_input,
           write_image_folder,
           write_npz,
)

__all__ = ["CLASSES", "IMAGE_SIZE", "IMAGENET_MEAN", "IMAGENET_STD", "make_task", "to_model_input", "write_image_folder",
           "write_npz"]
