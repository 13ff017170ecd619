"""Deploy checks across runtimes: onnxruntime, OpenVINO, tract and the ONNX reference.

The folded demo model and a ResNet-style block with its own BN pass `onnxbn check` on
onnxruntime, OpenVINO (f32) and tract against the unfolded model on onnxruntime; OpenVINO
forced to bf16 fails at f32 tolerances and says bf16; a runtime that lacks an operator, or
is not installed, is exit 2 with one line. OpenVINO and tract come with the dev extra; the
tests that need one skip, naming the pip command, where it is missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

import onnxbn
from models import BN_WIDE, Net, bn_count, conv_model, inputs_for, small_net
from onnxbn.errors import UserError
from onnxbn.runtimes.base import available
from onnxbn.runtimes.precision import RuntimeInfo, default_tolerance, tolerance_precision
from onnxbn.runtimes.sessions import open_session

ROOT = Path(__file__).resolve().parent.parent
needs = {name: pytest.mark.skipif(not available(name), reason=f"{name} not installed: pip install 'onnxbn[{name}]'")
         for name in ("openvino", "tract")}


def resnet_style(seed: int = 11) -> onnx.ModelProto:
    """Stem Conv+BN+Relu, a basic block (Conv+BN+Relu, Conv+BN, Add skip, Relu), a strided Conv+BN,
    GlobalAveragePool, Gemm: BN with wide statistics, bias-free convs (as torchvision exports them)."""
    n = Net(seed, bn=BN_WIDE)
    y = n.node("Relu", [n.bn(n.conv("input", 3, 8, "stem", bias=False), 8, "stem_bn")], "relu0")
    z = n.node("Relu", [n.bn(n.conv(y, 8, 8, "conv_a", bias=False), 8, "bn_a")], "relu_a")
    z = n.bn(n.conv(z, 8, 8, "conv_b", bias=False), 8, "bn_b")
    z = n.node("Relu", [n.node("Add", [z, y], "add")], "relu_out")
    z = n.node("Relu", [n.bn(n.conv(z, 8, 16, "down", bias=False, strides=[2, 2]), 16, "bn_down")], "relu_down")
    z = n.node("Flatten", [n.node("GlobalAveragePool", [z], "gap")], "flat")
    n.gemm(z, 16, 10, "fc", out="logits")
    return n.model({"input": ["N", 3, 16, 16]}, {"logits": ["N", 10]}, 13)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{name: (unfolded path, folded path, data args)}: the demo model with identity BN after every
    Conv/Gemm (on its own kind of images), and the ResNet-style block (random inputs)."""
    from onnxbn.demo.data import make_task, to_model_input

    root = tmp_path_factory.mktemp("runtimes")
    demo = onnx.load(str(ROOT / "models" / "demo_vgg.onnx"))
    x = to_model_input(make_task("source", 24, 3)[0])
    np.savez(root / "demo.npz", x=x)
    demo_bn = onnxbn.insert_bn(demo, onnxbn.collect_stats(demo, x[:16], after="linear", device="cpu"))
    out = {}
    for name, unfolded, data in (("demo", demo_bn, ["--data", root / "demo.npz"]),
                                 ("resnet", resnet_style(), ["--random", "16"])):
        folded = onnxbn.fold_bn(unfolded)
        assert bn_count(unfolded) >= 4 and bn_count(folded) == 0
        onnx.save(unfolded, str(root / f"{name}_bn.onnx"))
        onnx.save(folded, str(root / f"{name}_folded.onnx"))
        out[name] = (root / f"{name}_bn.onnx", root / f"{name}_folded.onnx", data)
    return out


# ----------------------------------------------------------------------------- the deploy check passes

@pytest.mark.parametrize("runtime,precision", [("onnxruntime", None),
                                               pytest.param("openvino", "f32", marks=needs["openvino"]),
                                               pytest.param("tract", None, marks=needs["tract"])])
@pytest.mark.parametrize("name", ["demo", "resnet"])
def test_folded_passes_on_runtime_against_unfolded_on_onnxruntime(models, tmp_path, cli, name, runtime, precision):
    unfolded, folded, data = models[name]
    argv = ["check", unfolded, folded, *data, "--reference-runtime", "onnxruntime", "--candidate-runtime", runtime,
            "--report", tmp_path / "r.json", "--junit", tmp_path / "r.xml"]
    code, out, err = cli(*argv, *(["--precision", precision] if precision else []))
    assert code == 0, out + err
    report = json.loads((tmp_path / "r.json").read_text())
    cand, ref = report["runtimes"]["candidate"], report["runtimes"]["reference"]
    assert (ref["runtime"], ref["precision"]) == ("onnxruntime", "f32")
    assert cand["runtime"] == runtime and cand["precision"] == "f32" and not cand["lowered"]
    assert cand["version"] and cand["version"][0].isdigit()
    assert report["atol"] == report["rtol"] == 1e-5 and report["scaled_atol"] == 0  # full precision: the plain 1e-5
    logits = report["outputs"]["logits"]
    assert logits["max_rel_error"] <= 1e-6 and logits["top1_agreement"] == 1.0
    if runtime != "onnxruntime":  # the table names both sides, the JUnit report carries them
        assert f"candidate: {runtime} {cand['version']} on cpu, f32" in out
    props = {p.get("name"): p.get("value") for p in ET.parse(tmp_path / "r.xml").getroot().iter("property")}
    assert props["candidate.runtime"] == runtime and props["candidate.precision"] == "f32"


@needs["openvino"]
@needs["tract"]
def test_fold_verify_on_every_runtime_writes_only_when_all_pass(models, tmp_path, cli):
    unfolded, _, data = models["resnet"]
    out_path = tmp_path / "deploy.onnx"
    code, out, err = cli("fold", unfolded, *data, "--verify-on", "openvino", "--verify-on", "tract",
                         "--verify-on", "reference", "--precision", "f32", "--json", "-o", out_path)
    assert code == 0, err
    result = json.loads(out)
    assert result["check"]["passed"] and set(result["verify_on"]) == {"openvino", "tract", "reference"}
    for runtime, report in result["verify_on"].items():
        assert report["passed"] and report["runtimes"]["candidate"]["runtime"] == runtime
        assert report["runtimes"]["candidate"]["precision"] == "f32"
        assert report["runtimes"]["reference"]["runtime"] == "onnxruntime"
    assert bn_count(onnx.load(str(out_path))) == 0
    # OpenVINO at bf16 with f32 tolerances fails: nothing is written, exit 1, the failing runtime named
    out_path.unlink()
    code, out, err = cli("fold", unfolded, *data, "--verify-on", "tract", "--verify-on", "openvino",
                         "--precision", "bf16", "--atol", "1e-5", "--rtol", "1e-5", "-o", out_path)
    if "bf16 (asked bf16)" not in out:
        pytest.skip("this CPU has no bf16 for OpenVINO (it ran f32); the bf16 failure cannot be shown here")
    assert code == 1 and not out_path.exists()
    assert "verify on tract:" in out and "on openvino; nothing written" in err


# ----------------------------------------------------------------------------- shapes from the data

def dynamic_hw_net() -> onnx.ModelProto:
    """Conv+BN+Relu, GlobalAveragePool, Flatten, Gemm with batch, height and width left unnamed
    (no dim_param: tract alone cannot determine them)."""
    n = Net(7, bn=BN_WIDE)
    y = n.node("Relu", [n.bn(n.conv("input", 3, 6, "conv"), 6, "bn")], "relu")
    n.gemm(n.node("Flatten", [n.node("GlobalAveragePool", [y], "gap")], "flat"), 6, 4, "fc", out="logits")
    return n.model({"input": [None, 3, None, None]}, {"logits": [None, 4]}, 13)


@pytest.mark.parametrize("runtime", [pytest.param("tract", marks=needs["tract"]),
                                     pytest.param("openvino", marks=needs["openvino"])])
def test_dynamic_height_and_width_check_and_fold_on_the_runtime(tmp_path, cli, runtime):
    path, out_path = tmp_path / "dyn.onnx", tmp_path / "deploy.onnx"
    model = dynamic_hw_net()
    onnx.save(model, str(path))
    x = inputs_for([3, 10, 13], 5, seed=3)  # 5 samples at batch size 2: batches of 2, 2 and 1
    np.savez(tmp_path / "x.npz", x=x)
    code, out, err = cli("check", path, path, "--data", tmp_path / "x.npz", "--batch-size", "2",
                         "--candidate-runtime", runtime, "--precision", "f32", "--report", tmp_path / "r.json")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["samples"] == 5 and report["runtimes"]["candidate"]["runtime"] == runtime
    code, out, err = cli("fold", path, "--data", tmp_path / "x.npz", "--batch-size", "2", "--verify-on",
                         runtime, "--precision", "f32", "-o", out_path)
    assert code == 0, err
    # the folded model on the runtime, at two more shapes, against the unfolded model on onnxruntime
    session = open_session(onnx.load(str(out_path)), runtime, precision="f32")
    for shape in ((2, 3, 10, 13), (1, 3, 7, 5)):
        xs = inputs_for(shape[1:], shape[0], seed=4)
        want = open_session(model).run(["logits"], {"input": xs})[0]
        got = session.run(["logits"], {"input": xs})[0]
        assert got.shape == (shape[0], 4)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- precision

@needs["openvino"]
def test_openvino_bf16_fails_at_f32_tolerance_and_says_bf16(models, tmp_path, cli):
    """Forced bf16 (not the CPU's default) with the f32 tolerances: exit 1, report says bf16.

    OpenVINO honours a bf16 hint on CPUs with AVX-512 (native AVX512-BF16/AMX, or emulated with
    the same rounding) or AVX2-VNNI-2, and silently ignores it elsewhere: there the report must
    say f32 and that bf16 was asked, and the exit-1 half cannot be shown (skipped, saying why)."""
    unfolded, folded, data = models["demo"]
    argv = ["check", unfolded, folded, *data, "--candidate-runtime", "openvino", "--precision", "bf16"]
    code, out, err = cli(*argv, "--atol", "1e-5", "--rtol", "1e-5", "--layerwise", "--report", tmp_path / "r.json")
    report = json.loads((tmp_path / "r.json").read_text())
    cand = report["runtimes"]["candidate"]
    assert cand["requested"] == "bf16"
    if cand["precision"] != "bf16":
        assert code == 0 and cand["precision"] == "f32" and "asked bf16, OpenVINO chose f32" in out
        pytest.skip(f"OpenVINO ignored bf16 on this CPU and ran {cand['precision']} (the report says so)")
    assert code == 1, out + err
    assert cand["lowered"] and "candidate: openvino" in out and "bf16 (asked bf16)" in out
    logits = report["outputs"]["logits"]
    assert not logits["passed"] and logits["max_abs_error"] > 1e-3
    assert logits["top1_agreement"] >= 0.9  # bf16 rounding, not a broken model
    # layerwise across runtimes names the first shared tensor bf16 moves: the first Conv's output
    first = report["layerwise"]["first_divergence"]
    assert report["layerwise"]["compared"] > 10 and first is not None
    assert first == report["layerwise"]["tensors"][0] and first["tensor"].startswith("/features/features.0/Conv")
    # the same run with the default tolerances for bf16 passes and says which defaults applied
    code, out, _ = cli(*argv, "--report", tmp_path / "r2.json")
    report = json.loads((tmp_path / "r2.json").read_text())
    assert code == 0 and report["tolerance"] == "bf16"
    assert (report["atol"], report["rtol"], report["scaled_atol"]) == (1e-5, 3e-2, 3e-2)
    assert "|a-b| <= 1e-05 + 0.03*max|a(sample)| + 0.03*|a| (default for bf16)" in out


@needs["openvino"]
def test_precision_default_reports_what_openvino_picked(models, tmp_path, cli):
    import openvino as ov

    unfolded, folded, data = models["resnet"]
    code, out, _ = cli("check", unfolded, folded, *data, "--candidate-runtime", "openvino",
                       "--report", tmp_path / "r.json")
    report = json.loads((tmp_path / "r.json").read_text())
    picked = ov.Core().compile_model(str(folded), "CPU").get_property("INFERENCE_PRECISION_HINT").to_string()
    cand = report["runtimes"]["candidate"]
    assert cand["requested"] == "default" and cand["precision"] == picked
    assert f"{picked} (the runtime's default)" in out
    assert report["tolerance"] == picked and (report["atol"], report["rtol"], report["scaled_atol"]) == \
        default_tolerance(RuntimeInfo(**{k: v for k, v in cand.items() if k != "lowered"}))
    assert code == 0


def test_default_tolerances_follow_the_precision_that_ran():
    def info(runtime, precision, model="f32"):
        return RuntimeInfo(runtime, "1", "cpu", precision, "default", model)

    ort = info("onnxruntime", "f32")
    assert default_tolerance(ort, ort) == (1e-5, 1e-5, 0.0)
    assert default_tolerance(ort, info("openvino", "f32")) == (1e-5, 1e-5, 0.0)
    assert default_tolerance(ort, info("openvino", "bf16")) == (1e-5, 3e-2, 3e-2)
    assert tolerance_precision(ort, info("openvino", "f16")) == "f16"
    # a float16 model takes f16's tolerance, on one runtime (the model's own rounding) or across two
    half = info("onnxruntime", "f16", "f16")
    assert default_tolerance(half, half) == (1e-5, 4e-3, 4e-3)
    assert default_tolerance(half, info("reference", "f16", "f16")) == (1e-5, 4e-3, 4e-3)


def test_scaled_tolerance_follows_each_samples_scale():
    """bf16-style rule: an element near 0 may carry an error relative to its sample's largest value."""
    from onnxbn.check import OutputMetrics

    a = np.array([[100.0, 0.1], [1.0, 0.1]])
    b = a + np.array([[0.5, 0.5], [0.005, 0.05]])  # 0.5% of 100 on both of row 0; row 1: 5% of its max on 0.1
    m = OutputMetrics()
    m.update(a, b, 1e-5, 3e-2, 3e-2)  # bounds: row 0 6.0 / 3.003, row 1 0.06 / 0.033
    assert m.violations == 1 and m.elements == 4
    plain = OutputMetrics()
    plain.update(a, b, 1e-5, 3e-2)  # without the scale term, the 0.1 next to 100 fails too
    assert plain.violations == 2


@pytest.mark.parametrize("runtime", ["onnxruntime", "reference",
                                     pytest.param("openvino", marks=needs["openvino"]),
                                     pytest.param("tract", marks=needs["tract"])])
def test_fixed_batch_and_float16_models(runtime):
    fixed = small_net(13, batch=4)
    report = onnxbn.compare(fixed, fixed, random=8, candidate_runtime=runtime, precision="f32" if runtime == "openvino"
                            else None)
    assert report.passed and report.samples == 8 and report.candidate_runtime["precision"] == "f32"
    if runtime == "onnxruntime":  # float16 stays float16, checked at f16's tolerance
        half = small_net(13, dtype=np.float16)
        report = onnxbn.compare(half, half, data=inputs_for([3, 8, 8], 8, dtype=np.float16))
        assert report.passed and (report.atol, report.rtol, report.tolerance) == (1e-5, 4e-3, "f16")
        assert report.candidate_runtime["precision"] == "f16" and not report.candidate_runtime["lowered"]


# ----------------------------------------------------------------------------- refusals: exit 2, one line

def lp_pool_net() -> onnx.ModelProto:
    """Conv+BN+Relu, LpPool (tract has no LpPool), Flatten, Gemm."""
    n = Net(5)
    y = n.node("Relu", [n.bn(n.conv("input", 3, 4, "conv"), 4, "bn")], "relu")
    y = n.node("Flatten", [n.node("LpPool", [y], "pool", kernel_shape=[2, 2], strides=[2, 2])], "flat")
    n.gemm(y, 4 * 4 * 4, 5, "fc", out="logits")
    return n.model({"input": ["N", 3, 8, 8]}, {"logits": ["N", 5]}, 13)


def det_net() -> onnx.ModelProto:
    """Det of a 3x3 matrix per sample (OpenVINO has no Det)."""
    n = Net(5)
    n.node("Det", ["input"], "det", name="determinant")
    return n.model({"input": ["N", 3, 3]}, {"det": ["N"]}, 13)


@pytest.mark.parametrize("runtime,build,op,node", [pytest.param("tract", lp_pool_net, "LpPool", "pool",
                                                                marks=needs["tract"]),
                                                   pytest.param("openvino", det_net, "Det", "determinant",
                                                                marks=needs["openvino"])])
def test_runtime_lacking_an_operator_is_exit_2_naming_it(tmp_path, cli, runtime, build, op, node):
    path = tmp_path / "m.onnx"
    onnx.save(build(), str(path))
    assert cli("check", path, path, "--random", "4")[0] == 0  # onnxruntime runs it
    code, out, err = cli("check", path, path, "--random", "4", "--candidate-runtime", runtime)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0] == (f"onnxbn: error: {runtime} cannot load the model: it has no implementation of operator {op} "
                        f"(node {node!r}); run it on another runtime, or replace that operator")
    if build is lp_pool_net:  # fold --verify-on: the same line, nothing written
        code, _, err = cli("fold", path, "--random", "4", "--verify-on", runtime, "-o", tmp_path / "d.onnx")
        assert code == 2 and f"it has no implementation of operator {op}" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "d.onnx").exists()


@pytest.mark.parametrize("argv,message", [
    (["--candidate-runtime", "tvm"], "unknown runtime 'tvm'"),
    (["--runtime", "openvino", "--candidate-runtime", "tract"], "not both"),
    (["--candidate-runtime", "tract", "--precision", "bf16"], "--precision bf16 needs openvino"),
    (["--candidate-runtime", "openvino:gpu"], "openvino runs on the CPU"),
    (["--runtime", "tract", "--device", "cuda"], "--device cuda applies to onnxruntime"),
])
def test_bad_runtime_arguments_are_exit_2(tmp_path, cli, argv, message):
    path = tmp_path / "m.onnx"
    onnx.save(small_net(13), str(path))
    code, _, err = cli("check", path, path, "--random", "2", *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_fold_precision_for_no_runtime_that_takes_it_is_exit_2(tmp_path, cli):
    path = tmp_path / "m.onnx"
    onnx.save(resnet_style(), str(path))
    code, _, err = cli("fold", path, "--random", "2", "--precision", "bf16", "-o", tmp_path / "d.onnx")
    assert code == 2 and "--precision bf16 applies to --verify-on openvino" in err
    assert not (tmp_path / "d.onnx").exists()


@pytest.mark.parametrize("runtime", ["openvino", "tract"])
def test_missing_runtime_is_exit_2_with_the_pip_command(tmp_path, cli, monkeypatch, runtime):
    monkeypatch.setitem(sys.modules, runtime, None)  # import openvino / tract -> ImportError
    path = tmp_path / "m.onnx"
    onnx.save(small_net(13), str(path))
    code, _, err = cli("check", path, path, "--random", "2", "--candidate-runtime", runtime)
    assert code == 2
    assert err.strip() == f"onnxbn: error: the {runtime} runtime is not installed: pip install 'onnxbn[{runtime}]'"
    code, _, err = cli("fold", path, "--random", "2", "--verify-on", runtime, "-o", tmp_path / "d.onnx")
    assert code == 2 and f"pip install 'onnxbn[{runtime}]'" in err and not (tmp_path / "d.onnx").exists()


def test_onnxbn_runs_without_openvino_and_tract():
    """Importing onnxbn and checking on onnxruntime never imports the optional runtimes."""
    code = ("import sys; sys.modules['openvino'] = None; sys.modules['tract'] = None\n"
            "sys.path.insert(0, 'tests')\n"
            "import onnxbn, onnxbn.cli, onnxbn.runtimes.base\n"
            "from models import small_net\n"
            "m = small_net(13)\n"
            "assert onnxbn.compare(m, onnxbn.fold_bn(m), random=4).passed\n"
            "assert not onnxbn.runtimes.base.available('openvino') and not onnxbn.runtimes.base.available('tract')\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


# ----------------------------------------------------------------------------- layerwise where it cannot

def test_layerwise_says_so_where_a_runtime_cannot_expose_tensors(models, monkeypatch, cli):
    from onnxbn.check import layerwise

    unfolded, folded, data = models["resnet"]
    real = layerwise.open_session

    def picky(model, runtime="onnxruntime", **kw):  # loads the graphs as given (a Model), refuses extra outputs
        if len(model.proto.graph.output) > 1:
            raise UserError("fake cannot load the model: it has no implementation of operator Identity")
        return real(model, runtime, **kw)

    monkeypatch.setattr(layerwise, "open_session", picky)
    code, out, _ = cli("check", unfolded, folded, *data, "--layerwise")
    assert code == 0
    assert out.splitlines()[-1].startswith("layerwise: not available: onnxruntime cannot return this graph's "
                                           "intermediate tensors (fake cannot load")


@needs["tract"]
def test_reference_and_tract_sessions_return_what_onnxruntime_returns(models):
    _, folded, _ = models["resnet"]
    model = onnx.load(str(folded))
    x = inputs_for([3, 16, 16], 5)
    want = open_session(model).run(["logits"], {"input": x})[0]
    for runtime in ("tract", "reference"):
        session = open_session(model, runtime)
        got = session.run(None, {"input": x})[0]
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
        assert session.info.runtime == runtime and session.info.precision == "f32"


# ----------------------------------------------------------------------------- moved from test_graph_core.py

def test_make_session_leaves_onnxruntimes_logger_alone(capfd):
    """make_session sets only its own session's log level, not onnxruntime's process-wide one."""
    from onnxbn.runtimes.ort_backend import make_session

    model = conv_model()
    ir3 = conv_model(ir_version=3, opset=9)
    ir3.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in ir3.graph.initializer)
    ort.set_default_logger_severity(0)  # the caller wants verbose logs
    try:
        make_session(ir3, "cpu")
        capfd.readouterr()
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        verbose = capfd.readouterr().err
    finally:
        ort.set_default_logger_severity(2)
    assert verbose.strip() != ""  # still verbose after onnxbn made its session


@pytest.mark.parametrize("tf32, option", [(False, {"use_tf32": "0"}), (None, None), (True, {"use_tf32": "1"})])
def test_onnxbns_cuda_sessions_compute_float32_as_float32_unless_asked(monkeypatch, tf32, option):
    """make_session's default on CUDA is use_tf32=0 (statistics, caches, checks); None keeps onnxruntime's."""
    from onnxbn.runtimes import ort_backend

    asked = {}
    real = ort.InferenceSession

    def recording(payload, options, providers):
        asked["providers"] = providers
        return real(payload, options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort_backend, "cuda_available", lambda: True)
    monkeypatch.setattr(ort, "InferenceSession", recording)
    kwargs = {} if tf32 is False else {"tf32": tf32}
    ort_backend.make_session(small_net(17), "auto", **kwargs)
    cuda = asked["providers"][0]
    assert asked["providers"][1] == "CPUExecutionProvider"
    assert cuda == ("CUDAExecutionProvider", option) if option else cuda == "CUDAExecutionProvider"
