"""`onnxbn export` with local torchvision-layout weights, and its refusals."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from onnxbn.cli import main
from onnxbn.io.copies import metadata
from onnxbn.models.vgg import vgg

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vgg11_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "vgg11-test.pth"
    torch.save(vgg("vgg11", seed=5).state_dict(), path)
    return path


def test_export_with_weights(vgg11_weights, tmp_path, capsys):
    out = tmp_path / "vgg11.onnx"
    assert main(["export", "vgg11", "--weights", str(vgg11_weights), "--opset", "13", "-o", str(out)]) == 0
    model = onnx.load(str(out))
    meta = metadata(model)
    assert meta["onnxbn.weights"].startswith("vgg11-test.pth sha256:") and meta["onnxbn.preset"] == "imagenet"
    assert model.opset_import[0].version == 13
    state = torch.load(vgg11_weights, weights_only=True)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for key in ("features.0.weight", "features.18.bias", "classifier.6.weight"):
        np.testing.assert_array_equal(inits[key], state[key].numpy())
    assert [n.op_type for n in model.graph.node].count("Dropout") == 2
    assert "RANDOM" not in capsys.readouterr().err


def test_export_refuses_weights_that_do_not_fit(vgg11_weights, tmp_path, capsys):
    state = torch.load(vgg11_weights, weights_only=True)
    state["features.0.weight"] = torch.zeros(64, 3, 5, 5)
    torch.save(state, tmp_path / "wrong_shape.pth")
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3), "extra.weight": torch.zeros(1)}, tmp_path / "partial.pth")
    for name, argv, words in [
        ("shape", ["vgg11", "--weights", str(tmp_path / "wrong_shape.pth")], "has shape (64, 3, 5, 5)"),
        ("keys", ["vgg11", "--weights", str(tmp_path / "partial.pth")], "missing 21 key(s)"),
        ("arch", ["vgg16", "--weights", str(vgg11_weights)], "does not match this VGG"),
    ]:
        capsys.readouterr()
        assert main(["export", *argv, "-o", str(tmp_path / "v.onnx")]) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and words in err, (name, err)
    assert not (tmp_path / "v.onnx").exists()
