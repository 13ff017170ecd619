"""golden.py, tolerances.py and their use by check: golden outputs stored and compared against (.npz and
ONNX's test-data layout), the digest that ties them to their data, and per-output tolerance rules whose
every gate is judged here by numpy on the full arrays."""

from __future__ import annotations

import hashlib
import json
import math
import tracemalloc
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from oracles import ort_outputs

import onnxbn
from models import small_cnn
from onnxbn.tolerances import QuantileGate


def one_line_error(code: int, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def nudged(model: onnx.ModelProto, name: str = "f3.b", by: float = 1e-3) -> onnx.ModelProto:
    """A copy of `model` with `by` added to the first element of initializer `name`."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    t = next(t for t in out.graph.initializer if t.name == name)
    value = numpy_helper.to_array(t).copy()
    value.flat[0] += by
    t.CopyFrom(numpy_helper.from_array(value, name))
    return out


@pytest.fixture
def models(tmp_path):
    """a.onnx (small_cnn), b.onnx (its last bias moved by 1e-3), x.npz (20 seeded inputs), x (the array)."""
    a = small_cnn(size=8)
    onnx.save(a, str(tmp_path / "a.onnx"))
    onnx.save(nudged(a), str(tmp_path / "b.onnx"))
    x = np.random.default_rng(3).standard_normal((20, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    return tmp_path, x


def digests(x: np.ndarray) -> np.ndarray:
    """Each sample's sha256 as golden.py documents it, computed here with hashlib."""
    header = f"{x.dtype.str}{tuple(x.shape[1:])}".encode()
    return np.array([list(hashlib.sha256(header + np.ascontiguousarray(s).tobytes()).digest()) for s in x], np.uint8)


# ----------------------------------------------------------------------------- golden outputs

def test_golden_npz_round_trip_holds_the_outputs_digests_and_provenance(models, cli):
    t, x = models
    code, out, _ = cli("check", t / "a.onnx", "--data", t / "x.npz", "--save-outputs", t / "g.npz",
                       "--batch-size", "6")
    assert code == 0 and "saved the outputs of" in out and "20 samples" in out
    expected = ort_outputs(onnx.load(str(t / "a.onnx")), x)[0]
    with np.load(t / "g.npz") as g:  # plain numpy reads it
        meta = json.loads(str(g["meta"]))
        np.testing.assert_array_equal(g["output_0"], expected)
        np.testing.assert_array_equal(g["input_sha256"], digests(x))
    assert meta["samples"] == 20 and meta["outputs"] == ["logits"] and meta["input"]["dtype"] == "<f4"
    assert meta["inputs_sha256"] == hashlib.sha256(digests(x).tobytes()).hexdigest()
    assert meta["model_sha256"] == onnxbn.io.copies.model_sha256(onnx.load(str(t / "a.onnx")))
    assert meta["runtime"]["runtime"] == "onnxruntime" and meta["runtime"]["precision"] == "f32"

    code, out, _ = cli("check", "--reference-outputs", t / "g.npz", t / "a.onnx", "--data", t / "x.npz",
                       "--batch-size", "7", "--report", t / "r.json")
    report = json.loads((t / "r.json").read_text())
    assert code == 0 and report["outputs"]["logits"]["max_abs_error"] == 0 and report["samples"] == 20
    assert report["reference_outputs"]["model_sha256"] == meta["model_sha256"]
    assert "reference: golden outputs" in out

    # with both models, the check runs as usual (exit 1: they differ) and the reference's outputs are stored too
    code, _, _ = cli("check", t / "a.onnx", t / "b.onnx", "--data", t / "x.npz", "--save-outputs", t / "g2.npz")
    with np.load(t / "g2.npz") as g:
        assert code == 1 and json.loads(str(g["meta"]))["inputs_sha256"] == meta["inputs_sha256"]
        np.testing.assert_array_equal(g["output_0"], expected)
    # the Python API: the same file from save_outputs, and compare against it
    saved = onnxbn.save_outputs(str(t / "a.onnx"), t / "api.npz", data=x)
    assert saved["inputs_sha256"] == meta["inputs_sha256"]
    report = onnxbn.compare(onnxbn.load_outputs(t / "api.npz"), str(t / "a.onnx"), data=x)
    assert report.passed and report.samples == 20


def test_a_mismatch_is_caught_from_the_golden_file_alone(models, cli):
    t, x = models
    assert cli("check", t / "a.onnx", "--data", t / "x.npz", "--save-outputs", t / "g.npz")[0] == 0
    (t / "a.onnx").unlink()  # the reference model is not needed any more
    code, out, _ = cli("check", "--reference-outputs", t / "g.npz", t / "b.onnx", "--data", t / "x.npz",
                       "--batch-size", "8", "--report", t / "r.json")
    a = ort_outputs(small_cnn(size=8), x)[0].astype(np.float64)
    b = ort_outputs(nudged(small_cnn(size=8)), x)[0].astype(np.float64)
    diff = np.abs(a - b)
    logits = json.loads((t / "r.json").read_text())["outputs"]["logits"]
    assert code == 1 and "FAIL" in out
    assert logits["max_abs_error"] == diff.max() > 1e-4
    assert logits["violations"] == int(np.count_nonzero(diff > 1e-5 + 1e-5 * np.abs(a)))


def test_data_other_than_the_golden_inputs_is_exit_2_with_nothing_written(models, cli):
    t, x = models
    assert cli("check", t / "a.onnx", "--data", t / "x.npz", "--save-outputs", t / "g.npz")[0] == 0
    changed = x.copy()
    changed[13, 0, 0, 0] += 1e-6
    for name, data in (("reordered", x[::-1]), ("one_value", changed), ("fewer", x[:19]),
                       ("more", np.concatenate([x, x[:1]]))):
        np.savez(t / f"{name}.npz", x=data)
        code, _, err = cli("check", "--reference-outputs", t / "g.npz", t / "a.onnx", "--data",
                           t / f"{name}.npz", "--report", t / "r.json")
        one_line_error(code, err, "golden outputs")
        assert {"reordered": "sample 0 differs", "one_value": "sample 13 differs", "fewer": "19 samples compared",
                "more": "holds more samples than the 20"}[name] in err
        assert not (t / "r.json").exists()
    code, _, err = cli("check", "--reference-outputs", t / "g.npz", t / "a.onnx", "--random", "20")
    one_line_error(code, err, "sample 0 differs", "x.npz, 20 samples")


def test_saving_and_comparing_stream_a_batch_at_a_time(tmp_path):
    """Outputs of 2.4 MB and of 12 MB go to the file and are compared a batch (24 KB) at a time: the Python
    heap's peak stays under 1 MiB and grows by less than 128 KiB with 5x the data, both ways."""
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 16, 16])])
    model = str(tmp_path / "m.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), model)
    peaks = []
    for n in (8, 800, 4000):  # the first run only imports what the others use
        x = np.random.default_rng(n).standard_normal((n, 3, 16, 16)).astype(np.float32)
        np.savez(tmp_path / f"x{n}.npz", x=x)  # uncompressed: memory-mapped
        data, golden = str(tmp_path / f"x{n}.npz"), tmp_path / f"g{n}.npz"
        tracemalloc.start()
        try:
            onnxbn.save_outputs(model, golden, data=data, batch_size=8)
            saving = tracemalloc.get_traced_memory()[1]
            tracemalloc.reset_peak()
            report = onnxbn.compare(onnxbn.load_outputs(golden), model, data=data, batch_size=8)
            comparing = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert report.passed and report.samples == n
        with np.load(golden) as g:
            np.testing.assert_array_equal(g["output_0"], np.maximum(x, 0))
        peaks.append((saving, comparing))
    small, large = peaks[1], peaks[2]  # (saving, comparing) at 800 and 4000 samples
    assert max(*small, *large) < 2**20 and all(b < a + 2**17 for a, b in zip(small, large, strict=True)), peaks


def backend_case(tmp_path):
    """A node test case made by onnx.backend.test.case (expect), written as onnx's cmd_tools writes the
    backend test data: model.onnx and test_data_set_0/input_0.pb, output_0.pb."""
    from onnx.backend.test.case import node as cases

    x = np.random.default_rng(5).standard_normal((3, 4, 5)).astype(np.float32)
    name = "test_onnxbn_golden_leakyrelu"
    cases.expect(helper.make_node("LeakyRelu", ["x"], ["y"], alpha=0.1), inputs=[x],
                 outputs=[np.where(x > 0, x, 0.1 * x)], name=name)
    case = cases._NodeTestCases.pop()
    cases._existing_names.pop(name)
    root = tmp_path / name
    (root / "test_data_set_0").mkdir(parents=True)
    (root / "model.onnx").write_bytes(case.model.SerializeToString())
    (inputs, outputs), = case.data_sets
    for kind, arrays, values in (("input", inputs, case.model.graph.input), ("output", outputs, case.model.graph.output)):
        for j, (array, info) in enumerate(zip(arrays, values, strict=True)):
            (root / "test_data_set_0" / f"{kind}_{j}.pb").write_bytes(
                numpy_helper.from_array(array, info.name).SerializeToString())
    return root, case.model, x


def test_an_onnx_backend_test_case_is_a_reference(tmp_path, cli):
    root, model, x = backend_case(tmp_path)
    code, out, _ = cli("check", "--reference-outputs", root, root / "model.onnx", "--report", tmp_path / "r.json")
    report = json.loads((tmp_path / "r.json").read_text())
    assert code == 0 and report["samples"] == 3 and report["inputs"] == str(root)
    assert report["outputs"]["y"]["max_abs_error"] == 0  # onnxruntime's LeakyRelu is numpy's here
    other = onnx.ModelProto()
    other.CopyFrom(model)
    other.graph.node[0].attribute[0].f = 0.2
    onnx.save(other, str(tmp_path / "other.onnx"))
    code, _, _ = cli("check", "--reference-outputs", root, tmp_path / "other.onnx", "--data", root,
                     "--report", tmp_path / "r.json")
    y = json.loads((tmp_path / "r.json").read_text())["outputs"]["y"]
    assert code == 1 and y["max_abs_error"] == pytest.approx(float(np.abs(0.1 * x[x < 0]).max()), rel=1e-6)


def test_onnx_test_data_layout_is_written_and_read_as_data(models, cli):
    t, x = models
    code, _, _ = cli("check", t / "a.onnx", "--data", t / "x.npz", "--save-outputs", t / "sets",
                     "--batch-size", "8")
    assert code == 0
    sets = sorted(p.name for p in (t / "sets").iterdir())
    assert sets == ["onnxbn.json", "test_data_set_0", "test_data_set_1", "test_data_set_2"]

    def load(path):
        tensor = TensorProto()
        tensor.ParseFromString(path.read_bytes())
        return tensor.name, numpy_helper.to_array(tensor)
    inputs = [load(t / "sets" / f"test_data_set_{i}" / "input_0.pb") for i in range(3)]
    outputs = [load(t / "sets" / f"test_data_set_{i}" / "output_0.pb") for i in range(3)]
    assert [n for n, _ in inputs] == ["input"] * 3 and [n for n, _ in outputs] == ["logits"] * 3
    assert [len(a) for _, a in inputs] == [8, 8, 4]
    np.testing.assert_array_equal(np.concatenate([a for _, a in inputs]), x)
    np.testing.assert_array_equal(np.concatenate([a for _, a in outputs]), ort_outputs(small_cnn(size=8), x)[0])
    # the folder as --data: the same comparison as the .npz it was made from
    for data in (t / "sets", t / "x.npz"):
        code, _, _ = cli("check", t / "a.onnx", t / "b.onnx", "--data", data, "--report", t / f"{data.stem}.json")
        assert code == 1
    from_sets, from_npz = (json.loads((t / f"{n}.json").read_text())["outputs"] for n in ("sets", "x"))
    assert from_sets == from_npz
    # an existing folder is never replaced
    code, _, err = cli("check", t / "a.onnx", "--data", t / "x.npz", "--save-outputs", t / "sets")
    one_line_error(code, err, "exists")


def test_golden_usage_errors_are_one_line(models, cli):
    t, _ = models
    assert cli("check", t / "a.onnx", "--data", t / "x.npz", "--save-outputs", t / "g.npz")[0] == 0
    for argv, needle in (
            (["--reference-outputs", t / "g.npz", t / "a.onnx", t / "b.onnx"], "give one model, the candidate"),
            ([t / "a.onnx"], "give two models"),
            (["--reference-outputs", t / "g.npz", t / "a.onnx", "--layerwise"], "--layerwise needs the reference"),
            (["--reference-outputs", t / "x.npz", t / "a.onnx"], "not onnxbn golden outputs"),
            (["--reference-outputs", t, t / "a.onnx"], "no test_data_set_<i> folders"),
            ([t / "a.onnx", "--save-outputs", t / "x.npz", "--data", t / "x.npz"], "also an input"),
            ([t / "a.onnx", "--save-outputs", t / "new.npz", "--data", t / "x.npz", "--min-samples", "21"],
             "only 20 sample(s)"),
            ([t / "a.onnx", "--save-outputs", t / "new", "--data", t / "x.npz", "--min-samples", "21"],
             "only 20 sample(s)")):
        code, _, err = cli("check", *argv)
        one_line_error(code, err, needle)
    assert sorted(p.name for p in t.iterdir()) == ["a.onnx", "b.onnx", "g.npz", "x.npz"]  # nothing half-written


# ----------------------------------------------------------------------------- tolerance files

def identity_model(names: list[str], shape: list) -> onnx.ModelProto:
    """x -> Identity -> each of `names`: a candidate whose every output is its input."""
    nodes = [helper.make_node("Identity", ["x"], [n], name=n) for n in names]
    graph = helper.make_graph(nodes, "identity", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *shape])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", *shape]) for n in names])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def golden_folder(root, x: np.ndarray, outputs: list[np.ndarray]):
    """An ONNX test-data folder (two sets) whose inputs are x and whose outputs are `outputs`: with
    identity_model as the candidate, any reference a against candidate b = x."""
    for i, rows in enumerate((slice(0, len(x) // 2), slice(len(x) // 2, None))):
        folder = root / f"test_data_set_{i}"
        folder.mkdir(parents=True)
        (folder / "input_0.pb").write_bytes(numpy_helper.from_array(x[rows], "x").SerializeToString())
        for k, a in enumerate(outputs):
            (folder / f"output_{k}.pb").write_bytes(numpy_helper.from_array(a[rows]).SerializeToString())
    return root


def numpy_gates(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Every gate's statistic, by numpy over the full arrays (float64)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    d = np.abs(a - b)
    ta = np.argsort(-a, axis=1)[:, :5]
    tb = np.argsort(-b, axis=1)[:, :5]
    return {"max_abs": d.max(), "mean_abs": d.mean(), "median_abs": np.quantile(d, 0.5), "p99_abs": np.quantile(d, 0.99),
            "max_rel": d.max() / np.abs(a).max(),
            "cosine": float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum())),
            "psnr": 10 * math.log10(np.abs(a).max() ** 2 / (d ** 2).mean()),
            "top1": float(np.mean(a.argmax(1) == b.argmax(1))),
            "top5": float(np.mean([set(p) == set(q) for p, q in zip(ta, tb, strict=True)]))}


@pytest.fixture
def gated(tmp_path):
    """A reference a (64 x 10 scores) and candidate b = a + noise, such that every gate has room both ways."""
    rng = np.random.default_rng(11)
    b = rng.standard_normal((64, 10)).astype(np.float32)
    a = (b + rng.standard_normal(b.shape) * np.where(rng.random(b.shape) < 0.05, 0.5, 0.01)).astype(np.float32)
    golden_folder(tmp_path / "golden", b, [a])
    onnx.save(identity_model(["scores"], [10]), str(tmp_path / "cand.onnx"))
    return tmp_path, a, b


@pytest.mark.parametrize("gate", ["max_abs", "mean_abs", "median_abs", "p99_abs", "max_rel", "cosine", "psnr",
                                  "top1", "top5"])
def test_every_gate_passes_and_fails_as_numpy_judges(gate, gated, cli):
    t, a, b = gated
    value = numpy_gates(a, b)[gate]
    upper = gate not in ("cosine", "psnr", "top1", "top5")  # the statistic must stay below the bound
    assert 0 < value < (1 if gate in ("cosine", "top1", "top5") else math.inf)
    step = 1 / 64 if gate.startswith("top") else 1e-9 * abs(value)  # a sample's share; a hair for the rest
    for bound, passes in ((value + step, upper), (value - step, not upper)):
        (t / "tol.json").write_text(json.dumps({"scores": {gate: bound}}))
        code, out, _ = cli("check", "--reference-outputs", t / "golden", t / "cand.onnx", "--tolerances",
                           t / "tol.json", "--report", t / "r.json")
        scores = json.loads((t / "r.json").read_text())["outputs"]["scores"]
        (result,) = scores["gates"]
        assert code == (0 if passes else 1) and result["passed"] == passes and scores["passed"] == passes
        assert scores["rule"] == {"key": "scores", "atol": 1e-5, "rtol": 1e-5, "scaled": 0.0, "elements_decide": False}
        if gate in ("median_abs", "p99_abs"):  # shown exactly, or up to 2^-10 below (tolerances.py)
            assert value * (1 - 2 ** -10) <= result["value"] <= value
        else:
            assert result["value"] == pytest.approx(value, rel=1e-12)
        assert f"{gate} {result['value']:.4g}" in out and ("pass" if passes else "FAIL") in out.split(gate)[1]


def test_quantile_decisions_equal_numpy_on_ties_and_bounds_at_elements():
    """QuantileGate's streamed decision equals np.quantile(d, q) <= bound, also where many errors tie and
    the bound is one of them, an interpolation point, or between, for 1 to 40 elements in uneven chunks."""
    rng = np.random.default_rng(2)
    for trial in range(300):
        n = int(rng.integers(1, 40))
        d = rng.choice([0.0, 1e-7, 2e-6, 3e-6, 0.5, np.inf], size=n) if trial % 2 else rng.exponential(1e-3, n)
        for q in (0.5, 0.99):
            with np.errstate(invalid="ignore"):  # numpy interpolates next to an infinite error as NaN (0 * inf)
                exact = np.quantile(d, q)
            if np.isnan(exact):
                continue
            for bound in (*np.unique(d[np.isfinite(d)]), exact, np.nextafter(exact, 0), 1e-6, 0.0):
                gate = QuantileGate(q, float(bound))
                for chunk in np.array_split(d, int(rng.integers(1, 4))):
                    gate.update(chunk)
                value, passed = gate.result()
                assert passed == (exact <= bound), (d, q, bound)
                if np.isfinite(exact):
                    assert exact * (1 - 2 ** -10) <= value <= exact, (d, q, bound, value)


def test_first_matching_key_decides_and_unmatched_outputs_keep_the_defaults(tmp_path, cli):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((8, 6)).astype(np.float32)
    boxes, scores, extra = x + 1e-3, x + 1e-6, x + 1e-6
    golden_folder(tmp_path / "golden", x, [boxes, scores, extra])
    onnx.save(identity_model(["boxes", "scores", "extra"], [6]), str(tmp_path / "cand.onnx"))

    def check(rules: dict):
        (tmp_path / "tol.json").write_text(json.dumps(rules))
        code, out, _ = cli("check", "--reference-outputs", tmp_path / "golden", tmp_path / "cand.onnx",
                           "--tolerances", tmp_path / "tol.json", "--report", tmp_path / "r.json",
                           "--summary-md", tmp_path / "s.md", "--junit", tmp_path / "j.xml")
        return code, out, json.loads((tmp_path / "r.json").read_text())["outputs"]

    # "box*" comes first: boxes gets atol 1e-2 and passes; "scores" takes its own key; extra the default
    code, out, outputs = check({"box*": {"atol": 1e-2}, "boxes": {"atol": 0, "rtol": 0}, "scores": {"atol": 1e-5}})
    assert code == 0 and {n: o["rule"]["key"] for n, o in outputs.items()} == \
        {"boxes": "box*", "scores": "scores", "extra": "default"}
    assert outputs["boxes"]["rule"]["rtol"] == 1e-5 and outputs["boxes"]["rule"]["scaled"] == 0
    assert out.splitlines()[2].split()[-2:] == ["box*", "PASS"] and "rule `box*`" in (tmp_path / "s.md").read_text()
    case = ET.parse(tmp_path / "j.xml").getroot().find("testcase[@name='boxes']")
    rule = case.find("properties/property[@name='rule']") if case is not None else None
    assert rule is not None and rule.get("value") == "box*"
    # the exact name first: boxes now fails on its own 1e-3 error (numpy: every element)
    code, _, outputs = check({"boxes": {"atol": 0, "rtol": 0}, "box*": {"atol": 1e-2}})
    assert code == 1 and outputs["boxes"]["rule"]["key"] == "boxes"
    assert outputs["boxes"]["violations"] == int(np.count_nonzero(np.abs(boxes.astype(np.float64) - x) > 0)) == 48
    assert outputs["scores"]["passed"] and outputs["scores"]["rule"]["key"] == "default"
    # gates with the element rule: both must pass
    code, _, outputs = check({"s*": {"atol": 1e-9, "rtol": 0, "max_abs": 1.0}, "*": {"cosine": 0.5}})
    assert code == 1 and not outputs["scores"]["passed"] and outputs["scores"]["gates"][0]["passed"]
    assert outputs["boxes"]["passed"] and outputs["boxes"]["rule"]["elements_decide"] is False


@pytest.mark.parametrize("rules, needle", [
    ({"scores": {"p95_abs": 1e-3}}, "unknown key 'p95_abs'"),
    ({"scores": {"atol": -1}}, "atol must be a finite number >= 0"),
    ({"scores": {"cosine": 2}}, "cosine must be a number in [-1, 1]"),
    ({"scores": {"top1": "all"}}, "top1 must be a number in [0, 1]"),
    ({"scores": 1e-3}, "must be a mapping"),
    ({"scroes": {"atol": 1e-3}}, "'scroes' matches no output"),
    ([], "holds no such mapping"),
])
def test_bad_tolerance_files_are_exit_2_with_one_line(rules, needle, gated, cli):
    t, _, _ = gated
    (t / "tol.json").write_text(json.dumps(rules))
    code, _, err = cli("check", "--reference-outputs", t / "golden", t / "cand.onnx", "--tolerances",
                       t / "tol.json", "--report", t / "r.json")
    one_line_error(code, err, needle)
    assert not (t / "r.json").exists()


def test_a_gate_the_output_cannot_have_and_yaml_without_pyyaml_are_exit_2(tmp_path, cli):
    x = np.random.default_rng(0).standard_normal((4, 2, 3)).astype(np.float32)
    golden_folder(tmp_path / "golden", x, [x])
    onnx.save(identity_model(["y"], [2, 3]), str(tmp_path / "cand.onnx"))
    (tmp_path / "tol.json").write_text(json.dumps({"y": {"top1": 1.0}}))
    code, _, err = cli("check", "--reference-outputs", tmp_path / "golden", tmp_path / "cand.onnx",
                       "--tolerances", tmp_path / "tol.json")
    one_line_error(code, err, "gates top1 but output 'y' has no classes")
    (tmp_path / "tol.yaml").write_text("y:\n  atol: 1.0e-3\n")
    code, out, err = cli("check", "--reference-outputs", tmp_path / "golden", tmp_path / "cand.onnx",
                         "--tolerances", tmp_path / "tol.yaml")
    try:
        import yaml  # noqa: F401
    except ImportError:
        one_line_error(code, err, "reading YAML needs PyYAML")
    else:
        assert code == 0 and "y  " in out
