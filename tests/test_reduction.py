"""onnxbn reduce: on the 2017 notebook's mistake (gamma = variance) the repro is the wrong BN and its
producer, fed every sample's own reference values; nothing failing is exit 0; bad input exit 2.

Judges: the inputs are recomputed by onnxruntime on the reference prefix one sample at a time, and
the repro's failure by numpy's BatchNormalization formula."""

from __future__ import annotations

import shlex

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from oracles import exposed

import onnxbn
from models import notebook_bn, small_cnn
from onnxbn.cli import main

X = np.random.default_rng(5).standard_normal((16, 3, 8, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(folder, reference, identity-BN model, the notebook's BN model) saved as ref.onnx, bn.onnx, nb.onnx."""
    t = tmp_path_factory.mktemp("reduce")
    model = small_cnn()
    with_bn = onnxbn.insert_bn(model, onnxbn.collect_stats(model, X, after="dense", device="cpu", workers=0))
    notebook = notebook_bn(with_bn)
    for name, m in (("ref", model), ("bn", with_bn), ("nb", notebook)):
        onnx.save(m, str(t / f"{name}.onnx"))
    np.savez(t / "x.npz", x=X)
    return t, model, with_bn, notebook


def test_notebook_mistake_reduces_to_the_wrong_bn_and_its_producer(models, tmp_path, capsys):
    t, model, _, notebook = models
    code = main(["reduce", str(t / "ref.onnx"), str(t / "nb.onnx"), "--data", str(t / "x.npz"), "--samples", "6",
                 "-o", str(tmp_path / "repro")])
    out = capsys.readouterr().out
    assert code == 1
    ref, cand = (onnx.load(str(tmp_path / "repro" / f"{s}.onnx")) for s in ("ref", "cand"))
    bn = next(n for n in cand.graph.node if n.op_type == "BatchNormalization")
    first_bn = next(n for n in notebook.graph.node if n.op_type == "BatchNormalization")
    assert bn.name == first_bn.name  # the first wrong BN, not a later one
    assert [n.op_type for n in cand.graph.node] in (["BatchNormalization"], ["Relu", "BatchNormalization"])
    assert [n.op_type for n in ref.graph.node] in ([], ["Relu"])
    [cut] = [i.name for i in cand.graph.input]
    assert [i.name for i in ref.graph.input] == [cut] and [o.name for o in cand.graph.output] == [bn.output[0]]
    with np.load(tmp_path / "repro" / "inputs.npz") as npz:
        assert npz.files == [cut]
        values = npz[cut]
    # every sample's own value of the cut, each recomputed alone on the reference prefix
    assert values.shape[0] == 6
    for i in range(6):
        np.testing.assert_allclose(values[i], exposed(model, [cut], X[i:i + 1])[0][0], rtol=1e-6, atol=1e-6)
    assert not np.allclose(values[0], values[1])
    # numpy: the repro's candidate computes BN(relu(cut)) with gamma = var, the reference relu(cut)
    inits = {i.name: numpy_helper.to_array(i) for i in cand.graph.initializer}
    scale, b, mean, var = (inits[n].astype(np.float64) for n in bn.input[1:5])
    a = np.maximum(values.astype(np.float64), 0) if ref.graph.node else values.astype(np.float64)
    wrong = scale * (a - mean) / np.sqrt(var + 1e-5) + b
    assert np.abs(wrong - a).max() / np.abs(a).max() > 1e-2
    # the printed command replays it: the same failure through `onnxbn check`
    line = next(ln for ln in out.splitlines() if ln.startswith("reproduce: "))
    words = shlex.split(line.removeprefix("reproduce: "))
    assert words[:2] == ["onnxbn", "check"] and str(tmp_path / "repro" / "inputs.npz") in words
    assert main(words[1:]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_python_api_and_samples_beyond_the_first_batch(models):
    t, model, _, notebook = models
    result = onnxbn.reduce(model, notebook, X[5:13], samples=8)
    assert result.failing and result.folder is None and result.samples == 8
    assert result.candidate_nodes[-1].endswith("onnxbn_bn") and len(result.reference_nodes) <= 1
    assert not result.report.passed


def test_nothing_fails_is_exit_0_and_writes_nothing(models, tmp_path, capsys):
    t = models[0]
    code = main(["reduce", str(t / "ref.onnx"), str(t / "bn.onnx"), "--data", str(t / "x.npz"),
                 "-o", str(tmp_path / "repro")])
    assert code == 0
    assert "nothing to reduce" in capsys.readouterr().out
    assert not (tmp_path / "repro").exists()


@pytest.mark.parametrize("case", ["missing data", "non-empty folder", "zero samples", "different inputs"])
def test_bad_input_is_exit_2_one_line_nothing_written(models, tmp_path, capsys, case):
    t = models[0]
    repro, data, cand, extra = tmp_path / "repro", t / "x.npz", t / "nb.onnx", []
    if case == "missing data":
        data = tmp_path / "nope.npz"
    elif case == "non-empty folder":
        repro.mkdir()
        (repro / "keep.txt").write_text("mine")
    elif case == "zero samples":
        extra = ["--samples", "0"]
    else:
        other = small_cnn()
        other.graph.input[0].name = "other"
        other.graph.node[0].input[0] = "other"
        onnx.save(other, str(tmp_path / "other.onnx"))
        cand = tmp_path / "other.onnx"
    code = main(["reduce", str(t / "ref.onnx"), str(cand), "--data", str(data), "-o", str(repro), *extra])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    if case == "non-empty folder":
        assert sorted(p.name for p in repro.iterdir()) == ["keep.txt"]
    else:
        assert not repro.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
