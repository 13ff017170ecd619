"""Shared fixtures: small seeded models (built by tests/models.py) and images built here, nothing downloaded."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from models import small_cnn  # test_training, test_distributed and tools/gpu_check import it from here


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


@pytest.fixture(autouse=True)
def crash_logs(tmp_path_factory, monkeypatch):
    """The folder the CLI writes crash logs to in this test (ONNXBN_LOG_DIR, inherited by subprocesses),
    so tests leave no onnxbn-*.log in the system's temporary folder. Kept apart from `tmp_path`, whose
    contents tests check."""
    folder = tmp_path_factory.mktemp("crash-logs")
    monkeypatch.setenv("ONNXBN_LOG_DIR", str(folder))
    return folder


@pytest.fixture
def cli(capsys):
    """`cli(*args)` runs `onnxbn ARGS...` in this process: (exit code, stdout, stderr) of that call.

    Arguments are passed through str(), so paths can be given as they are. The output is what
    was captured since the last read (capsys), so a test may also read capsys itself between calls.
    """
    from onnxbn.cli import main

    def run(*argv) -> tuple[int, str, str]:
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def skewed_fold(monkeypatch):
    """`skew(weight)` makes `onnxbn.fold.fold` return a model whose `weight` is 1% off: a fold whose
    outputs differ from the model's, for the checks that must refuse to write it."""
    import onnxbn.fold

    real = onnxbn.fold.fold

    def skew(weight: str) -> None:
        def skewed(model):
            folded, report = real(model)
            folded.set_array(weight, (folded.array(weight) * 1.01).astype(np.float32))
            return folded, report

        monkeypatch.setattr(onnxbn.fold, "fold", skewed)

    return skew


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


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run where torch sees a GPU, and those marked `ort_gpu` where onnxruntime's
    CUDA provider loads too; elsewhere they are skipped, saying so (CI has no GPU)."""
    from onnxbn.runtimes.ort_backend import cuda_available

    try:
        import torch

        torch_cuda = torch.cuda.is_available()
    except ImportError:
        torch_cuda = False
    ort_cuda = torch_cuda and cuda_available()
    skip_torch = pytest.mark.skip(reason="needs CUDA (torch with a GPU)")
    skip_ort = pytest.mark.skip(reason="needs CUDA (onnxruntime-gpu with a loadable CUDA provider, and torch with a GPU)")
    for item in items:
        if "ort_gpu" in item.keywords and not ort_cuda:
            item.add_marker(skip_ort)
        elif "gpu" in item.keywords and not torch_cuda:
            item.add_marker(skip_torch)
