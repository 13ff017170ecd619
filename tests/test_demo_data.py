"""The procedural demo tasks and the bundled demo model (models/demo_vgg.onnx)."""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

import numpy as np
import pytest

from onnxbn.demo import data as demo_data
from onnxbn.demo.data import CLASSES, make_task, to_model_input, write_image_folder, write_npz

MODEL = Path(__file__).resolve().parents[1] / "models" / "demo_vgg.onnx"


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("task", ["source", "target"])
def test_same_seed_same_bytes_other_seed_differs(task):
    a = make_task(task, 300, 7)
    b = make_task(task, 300, 7)
    c = make_task(task, 300, 8)
    assert _digest(*a) == _digest(*b)
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[1], c[1])


def test_tasks_differ_for_same_seed():
    s, _ = make_task("source", 64, 3)
    t, _ = make_task("target", 64, 3)
    assert not np.array_equal(s, t)


@pytest.mark.parametrize("task,n", [("source", 1003), ("target", 501), ("source", 2500)])
def test_shapes_dtypes_balance(task, n):
    x, y = make_task(task, n, 1)
    k = len(CLASSES[task])
    assert x.shape == (n, 32, 32, 3) and x.dtype == np.uint8
    assert y.shape == (n,) and y.dtype == np.int64
    counts = np.bincount(y, minlength=k)
    assert counts.size == k and counts.max() - counts.min() <= 1
    # labels are shuffled, not sorted by class
    assert not np.array_equal(y, np.sort(y))
    # images are not blank and vary: per-image std and cross-image differences
    assert x.reshape(n, -1).std(axis=1).min() > 3
    assert np.abs(x[0].astype(int) - x[1].astype(int)).mean() > 5


def test_zero_images_and_bad_task():
    x, y = make_task("target", 0, 0)
    assert x.shape == (0, 32, 32, 3) and y.shape == (0,)
    with pytest.raises(ValueError, match="unknown task"):
        make_task("imagenet", 4, 0)


def test_classes():
    assert len(CLASSES["source"]) == 10 and CLASSES["target"] == ["cat", "dog"]
    assert not set(CLASSES["source"]) & set(CLASSES["target"])


def test_to_model_input_values():
    img = np.zeros((2, 32, 32, 3), np.uint8)
    img[0, 3, 5] = (255, 128, 0)
    x = to_model_input(img)
    assert x.shape == (2, 3, 32, 32) and x.dtype == np.float32 and x.flags.c_contiguous
    expected = [(1.0 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (0.0 - 0.406) / 0.225]
    np.testing.assert_allclose(x[0, :, 3, 5], expected, rtol=1e-6)
    np.testing.assert_allclose(x[0, :, 3, 5], [2.2489083, 0.2051822, -1.8044444], rtol=1e-6)
    np.testing.assert_allclose(x[1, :, 0, 0], [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225], rtol=1e-6)


def test_write_npz(tmp_path):
    p = write_npz(tmp_path / "sub" / "val.npz", "target", 50, 4)
    x_img, y = make_task("target", 50, 4)
    with np.load(p) as z:
        assert set(z.files) == {"x", "y"}
        assert z["x"].dtype == np.float32 and z["x"].shape == (50, 3, 32, 32)
        np.testing.assert_array_equal(z["x"], to_model_input(x_img))
        np.testing.assert_array_equal(z["y"], y)
        assert z["y"].dtype == np.int64
    assert [q.name for q in p.parent.iterdir()] == ["val.npz"]  # no temp file left behind


def test_write_image_folder_readable_with_pil(tmp_path):
    from PIL import Image

    root = write_image_folder(tmp_path / "imgs", "source", 25, 9)
    x, y = make_task("source", 25, 9)
    assert sorted(p.name for p in root.iterdir()) == sorted(CLASSES["source"])
    files = sorted(root.glob("*/*.png"))
    assert len(files) == 25
    for f in files:
        i = int(f.stem)
        assert f.parent.name == CLASSES["source"][y[i]]
        with Image.open(f) as im:
            assert im.mode == "RGB" and im.size == (32, 32)
            np.testing.assert_array_equal(np.asarray(im), x[i])


def test_generation_spanning_two_render_chunks_is_deterministic_and_balanced():
    """More than one render chunk (2048 images each, noise seeded per chunk): the same bytes on every
    call, classes balanced to one, and the second chunk's images are rendered (not left empty)."""
    x, y = make_task("source", 2049 + 10, 5)
    x2, y2 = make_task("source", 2049 + 10, 5)
    assert _digest(x, y) == _digest(x2, y2)
    counts = np.bincount(y, minlength=len(CLASSES["source"]))
    assert counts.max() - counts.min() <= 1
    assert x[2048:].std(axis=(1, 2, 3)).min() > 1.0
    assert demo_data.IMAGE_SIZE == 32


# ----------------------------------------------------------------------------- bundled model


@pytest.fixture(scope="module")
def session():
    ort = pytest.importorskip("onnxruntime")
    assert MODEL.exists(), f"bundled model missing: {MODEL} (run tools/train_demo_model.py)"
    return ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])


def test_bundled_model_metadata(session):
    meta = session.get_modelmeta().custom_metadata_map
    for key in ("onnxbn.preset", "onnxbn.weights", "onnxbn.source_task", "onnxbn.classes"):
        assert key in meta, key
    assert meta["onnxbn.preset"] == "imagenet-squash"
    assert meta["onnxbn.weights"] == "demo"
    assert json.loads(meta["onnxbn.classes"]) == CLASSES["source"]
    # the "module:task" reference resolves (onnxbn.demo_data: the alias of onnxbn.demo.data this value names)
    module, task = meta["onnxbn.source_task"].split(":")
    named = importlib.import_module(module)
    assert task in named.CLASSES and named.make_task is make_task
    (inp,) = session.get_inputs()
    (out,) = session.get_outputs()
    assert inp.name == "input" and inp.shape[1:] == [3, 32, 32] and isinstance(inp.shape[0], str)
    assert out.name == "logits" and out.shape[1] == 10


def test_bundled_model_is_the_file_its_card_describes():
    """The card's size and sha256 are the bundled file's (a retrain on another CPU gives other bytes)."""
    card = (MODEL.parent / "README.md").read_text()
    data = MODEL.read_bytes()
    assert f"{len(data):,} bytes" in card
    assert hashlib.sha256(data).hexdigest() == "b79e1b99588d9558704f325ac6d7684a07daa1d722d48497a4e22c14a0e00e0d"
    assert "`b79e1b99588d9558704f325ac6d7684a07daa1d722d48497a4e22c14a0e00e0d`" in card


def test_bundled_model_has_no_batchnorm_and_readable_names():
    onnx = pytest.importorskip("onnx")
    m = onnx.load(str(MODEL))
    ops = [n.op_type for n in m.graph.node]
    assert "BatchNormalization" not in ops
    assert ops.count("Conv") == 6 and ops.count("Gemm") == 3 and ops.count("MaxPool") == 3
    names = {n.name for n in m.graph.node}
    assert "/features/features.0/Conv" in names and "/classifier/classifier.0/Gemm" in names


def test_bundled_model_classifies_source_val(session):
    # 600 images from the training script's val seed (1001); measured 0.895 on these
    x, y = make_task("source", 600, 1001)
    logits = session.run(["logits"], {"input": to_model_input(x)})[0]
    acc = float((logits.argmax(1) == y).mean())
    assert acc > 0.6, acc  # chance is 0.1; models/README.md reports 0.891 on the full val split
