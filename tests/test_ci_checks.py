"""A CI check that cannot be fooled: no pass on zero samples, exit 1 only for a mismatch,
presets that change what is fed, merges that refuse duplicate or foreign shards, and
check's metrics against an independent numpy computation."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import onnx
import pytest
from conftest import small_cnn, write_images

import onnxbn
from onnxbn.check.metrics import OutputMetrics
from onnxbn.cli import main
from onnxbn.errors import UserError


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def two_models(tmp_path):
    onnx.save(small_cnn(size=32), str(tmp_path / "a.onnx"))
    onnx.save(small_cnn(size=32, seed=5), str(tmp_path / "b.onnx"))
    return tmp_path / "a.onnx", tmp_path / "b.onnx"


def unreadable_folder(root, n=3):
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            (root / c / f"{i}.jpg").write_bytes(b"not a jpeg at all")
    return root


# ----------------------------------------------------------------------------- zero samples

@pytest.mark.parametrize("command", ["check", "fold", "eval"])
def test_no_readable_sample_is_an_error_not_a_pass(tmp_path, two_models, capsys, command):
    a, b = two_models
    data = unreadable_folder(tmp_path / "broken")
    out = tmp_path / "out.onnx"
    argv = {"check": ["check", a, b, "--data", data, "--report", tmp_path / "r.json"],
            "fold": ["fold", a, "--data", data, "-o", out],
            "eval": ["eval", a, "--data", data]}[command]
    code, stdout, err = run(capsys, *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "PASS" not in stdout
    assert not out.exists() and not (tmp_path / "r.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx", "broken"]


def test_partly_unreadable_data_is_counted_and_strict_fails(tmp_path, two_models, capsys):
    a, _ = two_models
    data = tmp_path / "imgs"
    write_images(data, n_per_class=3, size=(40, 40))
    (data / "cat" / "zz_broken.jpg").write_bytes(b"garbage")
    code, out, _ = run(capsys, "check", a, a, "--data", data, "--preset", "imagenet", "--report", tmp_path / "r.json")
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["samples"] == 6 and report["skipped"] == 1
    assert report["skipped_inputs"][0].startswith(str(data / "cat" / "zz_broken.jpg"))
    assert "6 samples compared" in out and "1 unreadable skipped" in out
    code, _, err = run(capsys, "check", a, a, "--data", data, "--strict")
    assert code == 2 and "zz_broken.jpg" in err
    code, _, err = run(capsys, "check", a, a, "--data", data, "--min-samples", "7")
    assert code == 2 and "only 6 sample(s)" in err and "at least 7" in err


def test_compare_api_refuses_zero_samples(tmp_path):
    data = unreadable_folder(tmp_path / "broken")
    with pytest.raises(UserError, match="only 0 sample"):
        onnxbn.compare(small_cnn(size=32), small_cnn(size=32, seed=5), data=data)


# ----------------------------------------------------------------------------- exit codes

def test_unexpected_failure_is_exit_2_with_a_log_file(two_models, capsys, monkeypatch):
    import onnxbn.check.comparison

    def broken(*args, **kwargs):
        raise RuntimeError("simulated onnxruntime crash\nsecond line")

    monkeypatch.setattr(onnxbn.check.comparison, "compare", broken)
    a, b = two_models
    code, out, err = run(capsys, "check", a, b, "--random", "2")
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert "`check` failed unexpectedly (RuntimeError: simulated onnxruntime crash)" in lines[0]
    path = lines[0].split("the details are in ")[1].split(":")[0]
    text = open(path).read()
    assert "Traceback" in text and "simulated onnxruntime crash" in text and "second line" in text
    with pytest.raises(RuntimeError):
        main(["--debug", "check", str(a), str(b), "--random", "2"])


def test_mismatched_candidate_input_is_exit_2(tmp_path, capsys):
    a = small_cnn()
    b = small_cnn()
    b.graph.input[0].name = "image"
    for node in b.graph.node:
        node.input[:] = ["image" if i == "input" else i for i in node.input]
    onnx.save(a, str(tmp_path / "a.onnx"))
    onnx.save(b, str(tmp_path / "b.onnx"))
    code, _, err = run(capsys, "check", tmp_path / "a.onnx", tmp_path / "b.onnx", "--random", "2")
    assert code == 2 and "candidate's inputs ['image'] differ from the reference's ['input']" in err


# ----------------------------------------------------------------------------- presets

def test_preset_changes_what_check_eval_and_fold_feed(tmp_path, two_models, capsys):
    a, b = two_models
    data = tmp_path / "imgs"
    write_images(data, n_per_class=3, size=(40, 40))
    errors, losses = {}, {}
    for preset in ("imagenet", "caffe-squash"):
        code, _, _ = run(capsys, "check", a, b, "--data", data, "--preset", preset, "--report", tmp_path / f"{preset}.json")
        assert code == 1
        errors[preset] = json.loads((tmp_path / f"{preset}.json").read_text())["outputs"]["logits"]["max_abs_error"]
        code, out, _ = run(capsys, "eval", a, "--data", data, "--preset", preset, "--json")
        assert code == 0
        losses[preset] = json.loads(out)["loss"]
    assert errors["imagenet"] != errors["caffe-squash"]
    assert losses["imagenet"] != losses["caffe-squash"]
    # caffe-squash inputs are 0..255-scale: the two models' logits differ far more than on imagenet inputs
    assert errors["caffe-squash"] > 10 * errors["imagenet"]


def test_preset_reaches_compare(tmp_path):
    """What compare feeds under each preset equals onnxbn.data's preprocessing of the files."""
    from onnxbn.data.sources import open_data

    data = tmp_path / "imgs"
    write_images(data, n_per_class=2, size=(40, 40))
    model = small_cnn(size=32)
    for preset in ("imagenet", "caffe-squash"):
        x = next(open_data(str(data), preset=preset, size=32).batches(64))[0]
        via_array = onnxbn.compare(model, small_cnn(size=32, seed=5), data=x)
        via_folder = onnxbn.compare(model, small_cnn(size=32, seed=5), data=data, preset=preset)
        assert via_folder.outputs["logits"].max_abs_error == via_array.outputs["logits"].max_abs_error


# ----------------------------------------------------------------------------- merge

@pytest.fixture
def shard_files(tmp_path, capsys):
    onnx.save(small_cnn(), str(tmp_path / "m.onnx"))
    x = np.random.default_rng(0).standard_normal((12, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    np.savez(tmp_path / "other.npz", x=x + 1)
    for i in range(3):
        assert run(capsys, "stats", tmp_path / "m.onnx", "--data", tmp_path / "d.npz", "--shard", f"{i}/3",
                   "-o", tmp_path / f"s{i}.npz")[0] == 0
    return tmp_path


def test_merge_refuses_a_shard_given_twice(shard_files, capsys):
    t = shard_files
    code, _, err = run(capsys, "merge", t / "s0.npz", t / "s1.npz", t / "s0.npz", "-o", t / "m.npz")
    assert code == 2 and "both shard 0/3" in err and not (t / "m.npz").exists()


@pytest.mark.parametrize("extra,key", [(["--data", "other.npz"], "data"), (["--data", "d.npz", "--seed", "3"], "seed"),
                                       (["--data", "d.npz", "--limit", "9"], "limit")])
def test_merge_refuses_shards_of_other_data_or_settings(shard_files, capsys, extra, key):
    t = shard_files
    extra = [str(t / e) if e.endswith(".npz") else e for e in extra]
    assert run(capsys, "stats", t / "m.onnx", *extra, "--shard", "2/3", "-o", t / "odd.npz")[0] == 0
    code, _, err = run(capsys, "merge", t / "s0.npz", t / "s1.npz", t / "odd.npz", "-o", t / "m.npz")
    assert code == 2 and f"its {key} " in err and "odd.npz" in err and not (t / "m.npz").exists()


def test_merge_warns_on_an_incomplete_shard_set(shard_files, caplog):
    t = shard_files
    with caplog.at_level(logging.WARNING, logger="onnxbn"):
        merged = onnxbn.merge_stats([t / "s0.npz", t / "s2.npz"])
    assert "merging 2 of 3 shards: shard(s) 1/3 missing" in caplog.text
    assert merged.meta["samples"] == 8


# ----------------------------------------------------------------------------- metrics vs numpy

def numpy_metrics(a: np.ndarray, b: np.ndarray) -> dict:
    a, b = a.astype(np.float64), b.astype(np.float64)
    diff = np.abs(a - b)
    out = {"max_abs_error": diff.max(), "mean_abs_error": diff.mean(),
           "max_rel_error": diff.max() / np.abs(a).max() if np.abs(a).max() > 0 else (0.0 if diff.max() == 0 else math.inf),
           "cosine_similarity": float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b)))
           if np.linalg.norm(a) > 0 and np.linalg.norm(b) > 0 else (1.0 if np.linalg.norm(a) == np.linalg.norm(b) else 0.0)}
    if a.ndim == 2:
        out["top1_agreement"] = float(np.mean(a.argmax(1) == b.argmax(1)))
        top5 = lambda v: [set(np.argsort(-row, kind="stable")[:5]) for row in v]  # noqa: E731
        out["top5_agreement"] = float(np.mean([sa == sb for sa, sb in zip(top5(a), top5(b), strict=True)]))
    return out


@pytest.mark.parametrize("case", ["random", "near_zero", "all_equal", "zeros", "streamed"])
def test_output_metrics_equal_numpy(case):
    rng = np.random.default_rng(7)
    a = rng.standard_normal((37, 12)).astype(np.float32)
    b = (a + rng.normal(0, 0.3, a.shape)).astype(np.float32)
    if case == "near_zero":
        a, b = a * 1e-30, b * 1e-30
    elif case == "all_equal":
        b = a.copy()
    elif case == "zeros":
        a, b = np.zeros_like(a), np.zeros_like(a)
    m = OutputMetrics()
    if case == "streamed":
        for lo, hi in ((0, 5), (5, 6), (6, 37)):
            m.update(a[lo:hi], b[lo:hi], 1e-5, 1e-5)
    else:
        m.update(a, b, 1e-5, 1e-5)
    got, expected = m.to_dict(), numpy_metrics(a, b)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-300), key
    violations = int(np.count_nonzero(np.abs(a.astype(np.float64) - b) > 1e-5 + 1e-5 * np.abs(a.astype(np.float64))))
    assert got["violations"] == violations and got["passed"] == (violations == 0)
    if case in ("all_equal", "zeros"):
        assert got["passed"] and got["max_rel_error"] == 0 and got["top1_agreement"] == 1.0


def test_output_metrics_top5_with_ties_and_nan():
    a = np.array([[1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1]], dtype=np.float32)
    b = np.array([[1, 2, 3, 4, 5, 6, 7], [1, 6, 5, 4, 3, 2, 7]], dtype=np.float32)
    m = OutputMetrics()
    m.update(a, b, 0, 0)
    assert m.to_dict()["top1_agreement"] == 0.5 and m.to_dict()["top5_agreement"] == 0.5
    m = OutputMetrics()
    m.update(np.array([[np.nan, 1.0]]), np.array([[np.nan, 1.0]]), 0, 0)
    assert m.passed
    m = OutputMetrics()
    m.update(np.array([[np.nan, 1.0]]), np.array([[0.0, 1.0]]), 1, 1)
    assert not m.passed and m.violations == 1


# ----------------------------------------------------------------------------- API honesty

def test_select_points_takes_a_path(tmp_path):
    onnx.save(small_cnn(), str(tmp_path / "m.onnx"))
    assert [p.tensor for p in onnxbn.select_points(tmp_path / "m.onnx", "relu")] == ["r1", "r2", "h1", "h2"]


def test_finetune_warns_when_the_data_uses_few_of_the_outputs(caplog):
    from onnxbn.insert import insert_bn

    model = small_cnn()
    x = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    stats = onnxbn.collect_stats(model, x, after="dense", device="cpu", workers=0)
    with caplog.at_level(logging.WARNING, logger="onnxbn"):
        onnxbn.finetune(insert_bn(model, stats), (x, np.arange(16) % 10), epochs=1, device="cpu", freeze_through="relu2")
    assert "labels use" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="onnxbn"):
        onnxbn.finetune(insert_bn(model, stats), (x, np.arange(16) % 1), epochs=1, device="cpu", freeze_through="relu2")
    assert "labels use 1 of the model's 10 outputs" in caplog.text
