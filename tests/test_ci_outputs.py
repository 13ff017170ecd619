"""What a CI job and a user's test suite get: assert_equivalent, the Markdown summary (and
GITHUB_STEP_SUMMARY), Model Explorer node data, the layerwise plot; all written atomically."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

import onnxbn
from models import notebook_bn, small_cnn
from onnxbn.cli import main
from onnxbn.testing import assert_equivalent

X = np.random.default_rng(5).standard_normal((16, 3, 8, 8)).astype(np.float32)


def identity_and_notebook_models():
    model = small_cnn()
    with_bn = onnxbn.insert_bn(model, onnxbn.collect_stats(model, X, after="dense", device="cpu", workers=0))
    notebook = notebook_bn(with_bn)
    return model, with_bn, notebook


def test_assert_equivalent_passes_the_identity_and_fails_the_notebook_with_the_table():
    model, with_bn, notebook = identity_and_notebook_models()
    report = assert_equivalent(model, with_bn, data=X)
    assert report.passed and report.samples == 16
    with pytest.raises(AssertionError) as info:
        assert_equivalent(model, notebook, data=X, layerwise=True)
    message = str(info.value)
    assert "max abs" in message and "logits" in message and "FAIL" in message
    assert "first divergence at" in message
    assert_equivalent(model, with_bn)  # random inputs by default


@pytest.fixture
def pair(tmp_path):
    model, _, notebook = identity_and_notebook_models()
    onnx.save(model, str(tmp_path / "a.onnx"))
    onnx.save(notebook, str(tmp_path / "b.onnx"))
    np.savez(tmp_path / "x.npz", x=X)
    return tmp_path


def test_summary_markdown_and_github_step_summary(pair, capsys, monkeypatch):
    t = pair
    (t / "gh.md").write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(t / "gh.md"))
    code = main([str(a) for a in ("check", t / "a.onnx", t / "b.onnx", "--data", t / "x.npz", "--layerwise",
                                  "--summary-md", t / "s.md")])
    capsys.readouterr()
    assert code == 1
    text = (t / "s.md").read_text()
    lines = text.splitlines()
    assert lines[0] == "### onnxbn check: **FAIL**"
    table = [line for line in lines if line.startswith("|")]
    assert table[0].split("|")[1].strip() == "output" and len(table) == 3  # header, rule, one output
    assert "**fail**" in table[2] and "`logits`" in table[2]
    assert "first divergence at `" in text
    assert (t / "gh.md").read_text() == "earlier step\n" + text + "\n"  # appended, not replaced
    assert oct(os.stat(t / "s.md").st_mode & 0o777) != oct(0o600)


NODE_DATA_SCHEMA_KEYS = {"results", "thresholds", "gradient", "hideInAggregatedStatsTable", "hideInChildrenStatsTable",
                         "hideAggregatedStats", "showExpandedSummaryOnGroupNode",
                         "showLabelCountColumnsInChildrenStatsTable"}


def validate_graph_node_data(data: dict) -> None:
    """Model Explorer's GraphNodeData (node_data_builder.py): results {key: {value: number, bgColor?,
    textColor?}}, thresholds [{value: number, bgColor: str, textColor?}], optional flags."""
    assert isinstance(data, dict) and set(data) <= NODE_DATA_SCHEMA_KEYS and "results" in data
    for key, result in data["results"].items():
        assert isinstance(key, str) and set(result) <= {"value", "bgColor", "textColor"}
        assert isinstance(result["value"], (int, float)) and not isinstance(result["value"], bool)
    for item in data.get("thresholds", []):
        assert set(item) <= {"value", "bgColor", "textColor"} and isinstance(item["value"], (int, float))
        assert isinstance(item["bgColor"], str)
    values = [item["value"] for item in data.get("thresholds", [])]
    assert values == sorted(values)


def test_node_data_matches_model_explorers_format_and_numpy(pair, capsys):
    t = pair
    code = main([str(a) for a in ("check", t / "a.onnx", t / "b.onnx", "--data", t / "x.npz", "--layerwise",
                                  "--node-data", t / "n.json", "--plot", t / "p.png")])
    capsys.readouterr()
    assert code == 1
    data = json.loads((t / "n.json").read_text())
    validate_graph_node_data(data)
    notebook = onnx.load(str(t / "b.onnx"))
    bn = next(n for n in notebook.graph.node if n.op_type == "BatchNormalization")
    # independent judge: expose the BN output in both models and compute max|a-b|/max|a| with numpy
    def exposed(path):
        m = onnx.load(str(path))
        m.graph.output.append(helper.make_tensor_value_info(bn.output[0], onnx.TensorProto.FLOAT, None))
        return np.asarray(ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            [bn.output[0]], {"input": X[:4]})[0], np.float64)
    a, b = exposed(t / "a.onnx"), exposed(t / "b.onnx")
    assert data["results"][bn.output[0]]["value"] == pytest.approx(np.abs(a - b).max() / np.abs(a).max(), rel=1e-9)
    assert data["results"]["c1"]["value"] == 0.0
    png = (t / "p.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert not [p for p in t.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_plot_and_node_data_need_layerwise(pair, capsys):
    t = pair
    code = main([str(a) for a in ("check", t / "a.onnx", t / "b.onnx", "--random", "2", "--plot", t / "p.png")])
    assert code == 2 and "add --layerwise" in capsys.readouterr().err and not (t / "p.png").exists()
