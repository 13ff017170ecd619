"""The int8 rule of `check` (onnxbn.tolerances.int8_rule): chosen because the candidate holds Q/DQ nodes, whatever
precision its runtime reports; cosine and top-1 decide, judged here against numpy on both runtimes' outputs
(OpenVINO's cases skip, naming the pip command, where it is not installed)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_quantize import bn_cnn, session
from test_runtimes import needs

from models import inputs_for
from onnxbn.cli import main
from onnxbn.quantization import quantize_with_report
from onnxbn.tolerances import INT8_GATES, int8_rule


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """float.onnx, int8.onnx (onnxbn quantize), broken.onnx (conv3's weight scales doubled), held.npz."""
    folder = tmp_path_factory.mktemp("int8")
    model = bn_cnn(seed=1, size=16)
    qdq, _ = quantize_with_report(model, inputs_for([3, 16, 16], 64, seed=5), device="cpu", verify=False)
    broken = onnx.ModelProto()
    broken.CopyFrom(qdq)
    producer = {o: n for n in broken.graph.node for o in n.output}
    conv3 = next(n for n in broken.graph.node if n.name == "conv3")
    scale = next(t for t in broken.graph.initializer if t.name == producer[conv3.input[1]].input[1])
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 2, scale.name))
    for name, m in (("float", model), ("int8", qdq), ("broken", broken)):
        onnx.save(m, str(folder / f"{name}.onnx"))
    np.savez(folder / "held.npz", x=inputs_for([3, 16, 16], 128, seed=6))
    return folder


def numpy_judges(folder, candidate: str) -> tuple[float, float]:
    """(cosine, top-1 agreement) of the candidate's logits with the float model's, on onnxruntime, by numpy."""
    x = np.load(folder / "held.npz")["x"]
    a, b = (np.asarray(session(onnx.load(str(folder / f"{m}.onnx"))).run(None, {"input": x})[0], np.float64)
            for m in ("float", candidate))
    cosine = float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))
    return cosine, float(np.mean(a.argmax(1) == b.argmax(1)))


def check(folder, capsys, candidate: str, runtime: str, *extra) -> tuple[int, dict]:
    code = main([str(a) for a in ("check", folder / "float.onnx", folder / f"{candidate}.onnx", "--data",
                                  folder / "held.npz", "--runtime", runtime, "--device", "cpu", "--report",
                                  folder / "r.json", *extra)])
    capsys.readouterr()
    return code, json.loads((folder / "r.json").read_text())


@pytest.mark.parametrize("runtime", ["onnxruntime", pytest.param("openvino", marks=needs["openvino"])])
def test_int8_model_passes_check_on_cosine_and_top1(models, capsys, runtime):
    code, report = check(models, capsys, "int8", runtime)
    logits = report["outputs"]["logits"]
    assert code == 0 and report["passed"] and report["tolerance"] == "int8"
    assert "QuantizeLinear/DequantizeLinear" in report["tolerance_reason"]
    assert logits["rule"]["key"] == "int8" and not logits["rule"]["elements_decide"]
    assert [g["gate"] for g in logits["gates"]] == ["cosine", "top1"]
    cosine, top1 = numpy_judges(models, "int8")
    assert cosine >= INT8_GATES["cosine"] and top1 >= INT8_GATES["top1"]  # the numpy judges agree
    assert abs(logits["cosine_similarity"] - cosine) < 1e-3 and abs(logits["top1_agreement"] - top1) <= 0.02
    if runtime == "onnxruntime":  # the f32 element rule would fail it: 8-bit rounding moves every logit
        assert logits["violations"] > logits["elements"] // 2 and logits["max_rel_error"] > 1e-3
        assert report["runtimes"]["candidate"]["precision"] == "f32"


@pytest.mark.parametrize("runtime", ["onnxruntime", pytest.param("openvino", marks=needs["openvino"])])
def test_broken_int8_model_fails_the_cosine_gate(models, capsys, runtime):
    code, report = check(models, capsys, "broken", runtime)
    gates = {g["gate"]: g for g in report["outputs"]["logits"]["gates"]}
    assert code == 1 and report["tolerance"] == "int8" and not gates["cosine"]["passed"]
    assert numpy_judges(models, "broken")[0] < INT8_GATES["cosine"]


def test_given_tolerances_replace_the_int8_rule(models, capsys):
    code, report = check(models, capsys, "int8", "onnxruntime", "--atol", "1e-5", "--rtol", "1e-5")
    assert code == 1 and report["tolerance"] == "given" and "rule" not in report["outputs"]["logits"]


def test_float_candidate_keeps_the_element_rule(models, capsys):
    code, report = check(models, capsys, "float", "onnxruntime")
    assert code == 0 and report["tolerance"] == "f32" and "rule" not in report["outputs"]["logits"]


def test_top1_gate_is_skipped_for_an_output_without_classes():
    rule = int8_rule(1e-5, 1e-5, 0.0)
    gates = rule.judge("features", {"cosine_similarity": 0.995}, {})
    assert [(g["gate"], g["passed"]) for g in gates] == [("cosine", True)]
    gates = rule.judge("logits", {"cosine_similarity": 0.98, "top1_agreement": 0.95}, {})
    assert [(g["gate"], g["passed"]) for g in gates] == [("cosine", False), ("top1", True)]
