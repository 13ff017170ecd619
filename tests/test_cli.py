"""The command line: the happy path on a small model, and every bad input -> exit 2, one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
from conftest import write_images

from models import small_cnn
from onnxbn.cli import main


@pytest.fixture
def files(tmp_path, cnn, cnn_inputs):
    onnx.save(cnn, str(tmp_path / "model.onnx"))
    np.savez(tmp_path / "data.npz", x=cnn_inputs, y=np.arange(len(cnn_inputs)) % 10)
    return tmp_path


def test_points_table_and_json(files, cli):
    code, out, _ = cli("points", files / "model.onnx", "--after", "relu")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["tensor", "producer", "channels", "shape"]
    assert lines[1].split() == ["r1", "Relu", "4", "Nx4x8x8"]
    code, out, _ = cli("points", files / "model.onnx", "--json")
    assert [p["tensor"] for p in json.loads(out)] == ["h1", "h2"]


def test_stats_insert_check_round_trip(files, cli):
    model, data = files / "model.onnx", files / "data.npz"
    assert cli("stats", model, "--data", data, "--after", "relu", "--batch-size", "5", "-o", files / "s.npz")[0] == 0
    assert cli("insert", model, "--stats", files / "s.npz", "-o", files / "bn.onnx")[0] == 0
    code, out, _ = cli("check", model, files / "bn.onnx", "--data", data, "--report", files / "r.json",
                       "--junit", files / "r.xml", "--layerwise")
    assert code == 0 and "PASS" in out.splitlines()[-2]
    report = json.loads((files / "r.json").read_text())
    assert report["passed"] and report["samples"] == 24
    assert report["outputs"]["logits"]["max_rel_error"] <= 1e-6
    assert report["outputs"]["logits"]["top1_agreement"] == 1.0
    assert report["layerwise"]["first_divergence"] is None and report["layerwise"]["compared"] >= 10
    suite = ET.parse(files / "r.xml").getroot()
    assert suite.get("tests") == "1" and suite.get("failures") == "0"
    bn = onnx.load(str(files / "bn.onnx"))
    assert sum(n.op_type == "BatchNormalization" for n in bn.graph.node) == 4


def test_check_random_inputs_and_mismatch_exit_code(files, cli):
    other = small_cnn(seed=5)
    onnx.save(other, str(files / "other.onnx"))
    assert cli("check", files / "model.onnx", files / "model.onnx", "--random", "4")[0] == 0
    code, out, _ = cli("check", files / "model.onnx", files / "other.onnx", "--random", "4")
    assert code == 1 and "FAIL" in out


def test_merge_of_shards(files, cli):
    model, data = files / "model.onnx", files / "data.npz"
    for i in range(2):
        assert cli("stats", model, "--data", data, "--shard", f"{i}/2", "-o", files / f"s{i}.npz")[0] == 0
    assert cli("stats", model, "--data", data, "-o", files / "all.npz")[0] == 0
    assert cli("merge", files / "s0.npz", files / "s1.npz", "-o", files / "m.npz")[0] == 0
    with np.load(files / "m.npz") as merged, np.load(files / "all.npz") as whole:
        np.testing.assert_allclose(merged["var_1"], whole["var_1"], rtol=1e-12)
        assert int(merged["count_1"]) == int(whole["count_1"]) == 24


def bad_inputs(tmp):
    """(name, argv, words the message must contain)."""
    model = tmp / "model.onnx"
    (tmp / "notonnx.onnx").write_text("hello, I am text\n")
    (tmp / "truncated.onnx").write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    other = small_cnn(seed=9)
    onnx.save(other, str(tmp / "other.onnx"))
    main(["-q", "stats", str(tmp / "other.onnx"), "--data", str(tmp / "data.npz"), "-o", str(tmp / "other_stats.npz")])
    (tmp / "empty").mkdir()
    np.savez(tmp / "nox.npz", y=np.arange(3))
    np.savez(tmp / "wrongshape.npz", x=np.zeros((2, 3, 5, 5), np.float32))
    no_dense = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["input"], ["y"], name="r")], "g",
        [onnx.helper.make_tensor_value_info("input", 1, ["N", 3, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", 1, ["N", 3, 8, 8])]), opset_imports=[onnx.helper.make_opsetid("", 17)],
        ir_version=8)
    onnx.save(no_dense, str(tmp / "nodense.onnx"))
    data = str(tmp / "data.npz")
    return [
        ("not onnx", ["points", tmp / "notonnx.onnx"], "not a readable ONNX model"),
        ("truncated", ["points", tmp / "truncated.onnx"], "not a readable ONNX model"),
        ("missing model", ["points", tmp / "nope.onnx"], "no such model file"),
        ("stats of another model", ["insert", model, "--stats", tmp / "other_stats.npz", "-o", tmp / "o.onnx"],
         "different model"),
        ("stats file is not stats", ["insert", model, "--stats", tmp / "data.npz", "-o", tmp / "o.onnx"],
         "not a readable onnxbn stats file"),
        ("empty folder", ["stats", model, "--data", tmp / "empty", "-o", tmp / "s.npz"], "no images found"),
        ("selector matches nothing", ["stats", tmp / "nodense.onnx", "--data", data, "-o", tmp / "s.npz"],
         "matches no tensor"),
        ("unknown tensor", ["points", model, "--after", "nothere"], "not in the model"),
        ("output is input", ["stats", model, "--data", data, "-o", data], "also an input"),
        ("insert over its input", ["insert", model, "--stats", tmp / "other_stats.npz", "-o", model], "also an input"),
        ("npz without x", ["stats", model, "--data", tmp / "nox.npz", "-o", tmp / "s.npz"], "no array 'x'"),
        ("wrong input shape", ["stats", model, "--data", tmp / "wrongshape.npz", "-o", tmp / "s.npz"], "expects"),
        ("bad shard", ["stats", model, "--data", data, "--shard", "3/2", "-o", tmp / "s.npz"], "--shard"),
        ("bad batch size", ["stats", model, "--data", data, "--batch-size", "0", "-o", tmp / "s.npz"], "--batch-size"),
        ("merge across models", ["merge", tmp / "other_stats.npz", tmp / "model_stats.npz", "-o", tmp / "m.npz"],
         "differs"),
        ("check with different inputs", ["check", model, tmp / "nodense.onnx", "--random", "2"], "output"),
        ("missing weights", ["export", "vgg11", "--weights", tmp / "none.pth", "-o", tmp / "v.onnx"],
         "no such weights file"),
    ]


def test_bad_inputs_exit_2_with_one_line(files, capsys, cli):
    main(["-q", "stats", str(files / "model.onnx"), "--data", str(files / "data.npz"), "-o", str(files / "model_stats.npz")])
    cases = bad_inputs(files)
    capsys.readouterr()
    before = sorted(p.name for p in files.iterdir())
    for name, argv, words in cases:
        code, _, err = cli(*argv)
        assert code == 2, name
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("onnxbn: error: "), (name, err)
        assert words in lines[0], (name, lines[0])
        assert "Traceback" not in err
    assert sorted(p.name for p in files.iterdir()) == before  # nothing half-written


def test_real_process_exit_code_and_no_traceback(tmp_path):
    (tmp_path / "x.onnx").write_text("garbage")
    proc = subprocess.run([sys.executable, "-m", "onnxbn", "points", str(tmp_path / "x.onnx")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_crash_log_goes_to_onnxbn_log_dir(files, cli, monkeypatch, tmp_path_factory):
    """An unexpected failure writes its traceback to a file in ONNXBN_LOG_DIR (made when missing)."""
    import onnxbn.points

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug in points")

    folder = tmp_path_factory.mktemp("logs") / "new"
    monkeypatch.setenv("ONNXBN_LOG_DIR", str(folder))
    monkeypatch.setattr(onnxbn.points, "select_points", broken)
    code, out, err = cli("points", files / "model.onnx")
    assert code == 2 and out == ""
    (log,) = folder.iterdir()
    assert log.name.startswith("onnxbn-points-") and log.suffix == ".log"
    assert err == (f"onnxbn: error: `points` failed unexpectedly (RuntimeError: simulated bug in points); no output "
                   f"was written; the details are in {log}: please report them (or rerun with --debug)\n")
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "RuntimeError: simulated bug in points" in text


def graph_model(nodes, inits=(), input_shape=("N", 3, 4, 4)):
    """One input x, one output y, opset 17: a model built as given, valid or not."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def out_of_bounds_gather_model():
    """Gather of index 7 from 4 values: onnxruntime warns while constant folding at session creation (its
    own WARNING line at its default log level) and fails when the node runs (INVALID_ARGUMENT)."""
    from onnx import helper, numpy_helper

    a = numpy_helper.from_array(np.zeros(4, np.float32), "a")
    i = numpy_helper.from_array(np.array([7], np.int64), "i")
    return graph_model([helper.make_node("Gather", ["a", "i"], ["r"]), helper.make_node("Add", ["x", "r"], ["y"])],
                       [a, i])


def test_a_model_onnxruntime_cannot_run_is_one_line_in_a_real_process(tmp_path, crash_logs):
    onnx.save(out_of_bounds_gather_model(), str(tmp_path / "m.onnx"))
    proc = subprocess.run([sys.executable, "-m", "onnxbn", "check", str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx"),
                           "--random", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and ":onnxruntime" not in proc.stderr
    assert proc.stderr.startswith("onnxbn: error: onnxruntime could not run the model: [ONNXRuntimeError] : 2 : "
                                  "INVALID_ARGUMENT : Non-zero status code returned while running Gather node")
    logs = list(crash_logs.iterdir())  # onnxbn's own added nodes could fail the same way: the details are kept
    assert len(logs) == 1 and f"the details are in {logs[0]}" in proc.stderr
    assert "indices element out of data bounds" in logs[0].read_text()


def refused_models():
    from onnx import helper, numpy_helper

    return {
        "attribute type": (graph_model([helper.make_node("Transpose", ["x"], ["y"], perm=[0.5, 1.0])]),
                           "INVALID_GRAPH : This is an invalid model. In Node, (\"\", Transpose, \"\", -1)"),
        "weight rank": (graph_model([helper.make_node("Conv", ["x", "w"], ["y"])],
                                    [numpy_helper.from_array(np.zeros((2, 3, 1), np.float32), "w")]),
                        "FAIL : Node () Op (Conv) [ShapeInferenceError] Number of spatial dimensions"),
        "undefined input": (graph_model([helper.make_node("Relu", ["z"], ["y"])]),
                            "INVALID_ARGUMENT : Invalid model. Node input 'z' is not a graph input"),
    }


@pytest.mark.parametrize("case", list(refused_models()))
def test_models_onnxruntime_refuses_are_user_errors(case, tmp_path, capfd, crash_logs):
    model, words = refused_models()[case]
    onnx.save(model, str(tmp_path / "m.onnx"))
    code = main(["check", str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx"), "--random", "2",
                 "--report", str(tmp_path / "r.json")])
    out, err = capfd.readouterr()
    assert code == 2 and out == ""
    assert err.startswith("onnxbn: error: onnxruntime cannot run this model: [ONNXRuntimeError] : ") and words in err
    assert err.count("\n") == 1  # nothing from onnxruntime's own loggers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"] and list(crash_logs.iterdir()) == []


def test_a_model_newer_than_onnxruntime_reads_is_one_line_saying_to_upgrade(tmp_path, capfd, crash_logs):
    """onnx 1.23 writes IR version 14 by default, which onnxruntime 1.30 does not read (up to 13)."""
    import onnxruntime

    model = graph_model([onnx.helper.make_node("Relu", ["x"], ["y"])])
    model.ir_version = 99
    onnx.save(model, str(tmp_path / "m.onnx"))
    code = main(["check", str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx"), "--random", "2"])
    out, err = capfd.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1
    version = re.escape(onnxruntime.__version__)
    assert re.fullmatch(rf"onnxbn: error: the model is ONNX IR version 99 and onnxruntime {version} reads IR versions "
                        r"up to \d+: upgrade onnxruntime \(pip install -U onnxruntime, or onnxruntime-gpu\)\n", err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"] and list(crash_logs.iterdir()) == []


def test_cli_quiets_onnxruntimes_default_logger_and_restores_it(files, cli, monkeypatch):
    """onnxruntime has no getter for its default logger: the CLI sets FATAL (4) before its first session
    and onnxruntime's default WARNING (2) after the command; make_session alone leaves it alone."""
    import onnxruntime

    from onnxbn.runtimes.ort_backend import make_session

    calls = []
    monkeypatch.setattr(onnxruntime, "set_default_logger_severity", calls.append)
    make_session(str(files / "model.onnx"), "cpu")
    assert calls == []
    code, _, err = cli("check", files / "model.onnx", files / "model.onnx", "--random", "2")
    assert code == 0, err
    assert calls == [4, 2]
    code, _, err = cli("points", files / "model.onnx")  # no session: the logger is not touched
    assert code == 0 and calls == [4, 2]


def test_output_folder_is_refused_before_any_work(files, cli, crash_logs):
    (files / "out").mkdir()
    before = sorted(p.name for p in files.rglob("*"))
    for argv, flag in [(["stats", files / "model.onnx", "--data", files / "data.npz", "-o", files / "out"], "-o"),
                       (["check", files / "model.onnx", files / "model.onnx", "--random", "2",
                         "--report", files / "out"], "--report")]:
        code, out, err = cli(*argv)
        assert code == 2 and out == ""
        assert err == f"onnxbn: error: {files / 'out'} is a folder; give a file path for {flag}\n"
    assert sorted(p.name for p in files.rglob("*")) == before and list(crash_logs.iterdir()) == []


@pytest.mark.parametrize("failure, message", [
    (ValueError("array is too big; `arr.size * arr.dtype.itemsize` is larger than the maximum possible size."),
     "the model declares a tensor too large to allocate (numpy: array is too big); check the dims of its "
     "initializers and inputs"),
    (MemoryError(), "out of memory while running `check`: use a smaller --batch-size / --limit, or more memory")])
def test_inputs_too_large_for_memory_are_user_errors(failure, message, tmp_path, cli, crash_logs, monkeypatch):
    """numpy's 'array is too big' and a MemoryError raised while a command runs (here from inside compare;
    --random itself refuses a declared shape over its budget first, see test_check.py) are one line, no crash log."""
    from onnx import helper

    import onnxbn.check.comparison

    def fail(*args, **kwargs):
        raise failure
    monkeypatch.setattr(onnxbn.check.comparison, "compare", fail)
    onnx.save(graph_model([helper.make_node("Relu", ["x"], ["y"])]), str(tmp_path / "m.onnx"))
    code, out, err = cli("check", tmp_path / "m.onnx", tmp_path / "m.onnx", "--random", "2")
    assert code == 2 and out == "" and err == f"onnxbn: error: {message}\n"
    assert list(crash_logs.iterdir()) == []


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_corrupt_weights_file_is_refused_not_run(tmp_path, cli):
    import pickle

    class Evil:
        def __reduce__(self):
            return (exec, ("open('PWNED', 'w').write('x')",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"features.0.weight": Evil()}))
    code, _, err = cli("export", "vgg11", "--weights", tmp_path / "evil.pth", "-o", tmp_path / "v.onnx")
    assert code == 2 and "never code" in err
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "v.onnx").exists()


def test_image_folder_stats_from_cli(tmp_path, cli):
    onnx.save(small_cnn(size=16), str(tmp_path / "m.onnx"))
    write_images(tmp_path / "imgs", n_per_class=4)
    code, _, err = cli("stats", tmp_path / "m.onnx", "--data", tmp_path / "imgs", "--after", "conv",
                       "--workers", "2", "--batch-size", "3", "-o", tmp_path / "s.npz")
    assert code == 0, err
    with np.load(tmp_path / "s.npz") as npz:
        meta = json.loads(str(npz["meta"]))
        assert meta["samples"] == 8 and meta["preset"] == "imagenet" and meta["selector"] == "conv"


def test_fold_verifies_reports_and_writes(files, cli):
    model, data = files / "model.onnx", files / "data.npz"
    cli("stats", model, "--data", data, "--after", "relu", "-o", files / "s.npz")
    cli("insert", model, "--stats", files / "s.npz", "-o", files / "bn.onnx")
    code, out, _ = cli("fold", files / "bn.onnx", "--data", data, "-o", files / "deploy.onnx")
    assert code == 0
    lines = out.splitlines()
    # r1 feeds a MaxPool then a padded Conv: kept; the rest fold forward into the next layer
    assert "relu1/onnxbn_bn: kept" in lines[0] and "MaxPool" in lines[0]
    assert [line.split(":")[1].split()[0] for line in lines[1:4]] == ["folded"] * 3
    deploy = onnx.load(str(files / "deploy.onnx"))
    assert sum(n.op_type == "BatchNormalization" for n in deploy.graph.node) == 1
    code, out, _ = cli("check", files / "bn.onnx", files / "deploy.onnx", "--data", data)
    assert code == 0


def test_fold_refuses_to_write_a_wrong_model(files, cli, skewed_fold):
    model, data = files / "model.onnx", files / "data.npz"
    cli("stats", model, "--data", data, "--after", "dense", "-o", files / "s.npz")
    cli("insert", model, "--stats", files / "s.npz", "-o", files / "bn.onnx")
    skewed_fold("f3.w")
    code, out, err = cli("fold", files / "bn.onnx", "--random", "4", "-o", files / "deploy.onnx")
    assert code == 1 and "FAIL" in out and "nothing written" in err
    assert not (files / "deploy.onnx").exists()


def test_nan_inputs_and_strict_images_exit_2_and_write_nothing(tmp_path, cli):
    onnx.save(small_cnn(), str(tmp_path / "m.onnx"))
    x = np.random.default_rng(0).standard_normal((12, 3, 8, 8)).astype(np.float32)
    x[9, 1, 2, 3] = np.nan
    np.savez(tmp_path / "nan.npz", x=x)
    code, _, err = cli("stats", tmp_path / "m.onnx", "--data", tmp_path / "nan.npz", "--after", "relu",
                       "--batch-size", "4", "-o", tmp_path / "s.npz")
    assert code == 2 and "'r1' has NaN or Inf" in err and "samples 8..11" in err
    write_images(tmp_path / "imgs", n_per_class=2, size=(8, 8), fmt="PNG")
    (tmp_path / "imgs" / "cat" / "zz_broken.png").write_bytes(b"not a png")
    code, _, err = cli("stats", tmp_path / "m.onnx", "--data", tmp_path / "imgs", "--strict", "--workers", "0",
                       "-o", tmp_path / "s.npz")
    assert code == 2 and "zz_broken.png" in err and "--strict" in err
    assert not (tmp_path / "s.npz").exists() and not list(tmp_path.glob("s.npz.*"))
