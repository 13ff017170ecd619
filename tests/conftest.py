"""Shared fixtures: small seeded models and images built here, nothing downloaded."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def small_cnn(opset: int = 17, seed: int = 0, size: int = 8, batch="N") -> onnx.ModelProto:
    """Conv-Relu-MaxPool-Conv-Relu-Flatten-Gemm-Relu-Gemm-Relu-Gemm, VGG in miniature."""
    rng = np.random.default_rng(seed)

    def w(*shape, scale=None):
        fan_in = int(np.prod(shape[1:]))
        return (rng.standard_normal(shape) * (scale or np.sqrt(2.0 / fan_in))).astype(np.float32)

    flat = 8 * (size // 2) * (size // 2)
    inits = {"c1.w": w(4, 3, 3, 3), "c1.b": w(4, scale=0.1), "c2.w": w(8, 4, 3, 3), "c2.b": w(8, scale=0.1),
             "f1.w": w(16, flat), "f1.b": w(16, scale=0.1), "f2.w": w(16, 16), "f2.b": w(16, scale=0.1),
             "f3.w": w(10, 16), "f3.b": w(10, scale=0.1)}
    nodes = [
        helper.make_node("Conv", ["input", "c1.w", "c1.b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "c2.w", "c2.b"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "f1.w", "f1.b"], ["g1"], name="fc1", transB=1),
        helper.make_node("Relu", ["g1"], ["h1"], name="relu3"),
        helper.make_node("Gemm", ["h1", "f2.w", "f2.b"], ["g2"], name="fc2", transB=1),
        helper.make_node("Relu", ["g2"], ["h2"], name="relu4"),
        helper.make_node("Gemm", ["h2", "f3.w", "f3.b"], ["logits"], name="fc3", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "small_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 8)
    onnx.checker.check_model(model)
    return model


def write_images(root, n_per_class=3, classes=("cat", "dog"), size=(40, 30), seed=0, fmt="JPEG"):
    """Seeded smooth colour images with a blob, in class sub-folders (ImageNet layout)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            h, w = size[1], size[0]
            yy, xx = np.mgrid[0:h, 0:w]
            base = rng.uniform(0, 255, 3)
            grad = rng.uniform(-2, 2, 3)
            img = base + grad * (xx[..., None] + yy[..., None]) / 2
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, 10)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
            img += rng.normal(0, 8, img.shape)
            path = root / c / f"{c}_{i:03d}.{'jpg' if fmt == 'JPEG' else fmt.lower()}"
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, fmt)
            paths.append(path)
    return paths


@pytest.fixture
def cnn():
    return small_cnn()


@pytest.fixture
def cnn_inputs():
    return np.random.default_rng(1).standard_normal((24, 3, 8, 8)).astype(np.float32)


@pytest.fixture(scope="session")
def vgg16(tmp_path_factory):
    """Full-size VGG16 with torchvision-style random weights, exported once per session."""
    from onnxbn.export import export_vgg

    path = tmp_path_factory.mktemp("vgg16") / "vgg16.onnx"
    onnx.save(export_vgg("vgg16"), str(path))
    return path


@pytest.fixture(scope="session")
def vgg16_images(tmp_path_factory):
    """16 generated JPEGs of varied sizes in two class folders."""
    root = tmp_path_factory.mktemp("images")
    write_images(root, n_per_class=8, size=(300, 260), seed=3)
    return root
