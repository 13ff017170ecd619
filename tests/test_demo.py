"""The demo pipeline at a tiny budget: the report's keys, the identity numbers, every sweep cell, and
sweep cells that do not depend on which other cells ran."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest

from onnxbn.cli import main
from onnxbn.demo.deploy import DEPLOY_RUNTIMES
from onnxbn.demo.plots import plot_sweep
from onnxbn.demo.recalibration import PRIOR_MULTIPLES
from onnxbn.demo.run import BUNDLED, run_demo
from onnxbn.demo.sweep import VARIANTS, cell_seed, lr_key, run_cell, summarize_cells
from onnxbn.demo.verdict import sweep_verdict
from onnxbn.errors import UserError
from onnxbn.io.load import load_model
from onnxbn.runtimes.base import available

pytestmark = pytest.mark.skipif(not BUNDLED.is_file(), reason="bundled demo model missing")

TINY_LRS = (1e-5, 1e-2)
TINY_SEEDS = 2
TINY = {"source_samples": 64, "train_samples": 64, "val_samples": 32, "epochs": 1, "batch_size": 32, "lrs": TINY_LRS,
        "seeds": TINY_SEEDS, "shift_samples": 32, "deploy_samples": 16, "latency_runs": 2, "prior_sizes": (8,),
        "prior_seeds": 2, "prior_eval_samples": 24}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One demo run at a tiny budget, shared by the tests of its report."""
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, **TINY)


def test_demo_report_at_tiny_budget(tiny):
    tmp_path, report = tiny
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["identity"] == report["identity"]
    assert report["identity"]["max_rel_error"] <= 1e-6 and report["identity"]["top1_agreement"] == 1.0
    assert report["notebook_mistake"]["max_rel_error"] > 1e-2
    assert set(report["finetune"]) == {"nobn_lr1e-05", "bn_lr1e-05", "nobn_lr0.0003", "bn_lr0.0003"}
    for v in report["finetune"].values():
        assert {"val_loss", "val_accuracy"} <= set(v) and len(v["history"]) == 1
    assert report["fold"]["bn_remaining"] == 0 and report["fold"]["max_rel_error"] <= 1e-5
    for name in ("report.md", "curves.png", "activations.png", "sweep.png", "model_bn.onnx", "model_ft.onnx",
                 "deploy.onnx"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "Identity BN insertion" in (tmp_path / "report.md").read_text()


def test_demo_report_has_every_key(tiny):
    tmp_path, report = tiny
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert set(on_disk) == set(report) >= {
        "model", "model_card", "device", "data", "stats", "identity", "notebook_mistake", "budget", "finetune",
        "finetune_summary", "fold", "seconds", "sweep", "sweep_info", "recalibrate", "deploy", "deploy_info"}
    # sweep.<variant>.<lr>: every (variant, lr, seed) cell, its seed from (variant, lr, index), mean/std its cells'
    assert set(report["sweep"]) == set(VARIANTS)
    for variant in VARIANTS:
        assert set(report["sweep"][variant]) == {lr_key(lr) for lr in TINY_LRS}
        for lr in TINY_LRS:
            entry = report["sweep"][variant][lr_key(lr)]
            assert {"val_loss_mean", "val_loss_std", "val_accuracy_mean", "val_accuracy_std", "diverged",
                    "finished", "epochs_to_target_median", "cells"} <= set(entry)
            cells = entry["cells"]
            assert [c["seed_index"] for c in cells] == list(range(TINY_SEEDS))
            assert [c["seed"] for c in cells] == [cell_seed(variant, lr, i) for i in range(TINY_SEEDS)]
            assert entry["diverged"] + entry["finished"] == TINY_SEEDS
            losses = [c["val_loss"] for c in cells if not c["diverged"]]
            assert all(math.isfinite(x) for x in losses)
            if len(losses) >= 2:
                assert entry["val_loss_mean"] == pytest.approx(np.mean(losses), abs=1e-12)
                assert entry["val_loss_std"] == pytest.approx(np.std(losses, ddof=1), abs=1e-12)
            for c in cells:
                assert c["diverged"] or (len(c["history"]) == 1 and 0 <= c["val_accuracy"] <= 1)
    assert len({c["seed"] for per in report["sweep"].values() for e in per.values() for c in e["cells"]}) == \
        len(VARIANTS) * len(TINY_LRS) * TINY_SEEDS
    # one feature cache for every fine-tune: only the very first call computes it
    info = report["sweep_info"]
    assert info["feature_cache"] == {"hits": 2 * len(VARIANTS) * len(TINY_LRS) * TINY_SEEDS - 2,
                                     "lookups": 2 * len(VARIANTS) * len(TINY_LRS) * TINY_SEEDS}
    assert info["verdict"] in ("bn_lower", "nobn_lower", "within_spread", "undecided") and info["lines"]
    # the notebook's lr in the curves is the sweep's own cell (seed index 0)
    assert report["finetune"]["bn_lr1e-05"]["val_loss"] == report["sweep"]["bn"]["1e-05"]["cells"][0]["val_loss"]
    # recalibrate.*: the BN models before and after, exact and batch, on shifted images
    rec = report["recalibrate"]
    assert {"shift", "models", "lines", "unlabelled_samples", "eval_samples"} <= set(rec)
    bn_rows = [row for row in rec["models"].values() if "shifted_exact" in row]
    assert len(bn_rows) == 2
    for row in rec["models"].values():
        for key in ("clean", "shifted_before", "shifted_exact", "shifted_batch"):
            if key in row:
                assert row[key]["samples"] == 32 and 0 <= row[key]["accuracy"] <= 1 and row[key]["loss"] > 0
    for row in bn_rows:
        assert row["shifted_exact"]["bn_nodes"] >= 2
    # the BN model that was folded, evaluated as is on clean images, is the sweep cell it came from
    folded_cell = report["fold"]["model"]
    kind, lr = folded_cell.split("_lr")[0], folded_cell.split("_lr")[1].split("_seed")[0]
    assert rec["models"][folded_cell]["clean"]["loss"] == pytest.approx(
        report["sweep"][kind][lr]["cells"][0]["val_loss"], rel=1e-5)
    # deploy.<runtime>: every installed runtime, error, precision and latency
    expected = {r if p == "f32" else f"{r}_{p}" for r, p in DEPLOY_RUNTIMES if available(r)}
    assert set(report["deploy"]) == expected and {"onnxruntime", "reference"} <= expected
    for key, row in report["deploy"].items():
        assert {"max_abs_error", "max_rel_error", "precision", "requested", "latency_ms_b1", "latency_ms_b8",
                "passed", "version"} <= set(row)
        assert row["samples"] == 16 and row["latency_ms_b1"] > 0 and row["latency_ms_b8"] > 0
        if row["precision"] == "f32":
            assert row["passed"] and row["max_rel_error"] <= 1e-5, key
    md = (tmp_path / "report.md").read_text()
    for heading in ("learning rates", "Recalibration", "every installed runtime", "What the sweep shows"):
        assert heading in md


def test_sweep_cell_does_not_depend_on_run_order(tiny, tmp_path):
    """A cell run alone (fresh feature cache, other cells in another order) gives the sweep's numbers exactly."""
    out, report = tiny
    bases = {"nobn": load_model(BUNDLED), "bn": load_model(out / "model_bn.onnx")}
    train, val = out / "data" / "target_train.npz", out / "data" / "target_val.npz"
    order = [("bn", TINY_LRS[-1], TINY_SEEDS - 1), ("nobn", TINY_LRS[0], 1)]  # the sweep's last cell first
    for variant, lr, index in order:
        alone, _ = run_cell(bases[variant], variant, lr, index, train, val, epochs=TINY["epochs"],
                            batch_size=TINY["batch_size"], cache=tmp_path / "cache")
        in_sweep = report["sweep"][variant][lr_key(lr)]["cells"][index]
        for key in ("seed", "diverged", "val_loss", "val_accuracy", "val_before", "epochs_to_target"):
            assert alone[key] == in_sweep[key], (variant, lr, index, key)
        assert [{k: v for k, v in e.items() if k != "seconds"} for e in alone["history"]] == \
            [{k: v for k, v in e.items() if k != "seconds"} for e in in_sweep["history"]]


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")  # training.py's float(loss) on NaN
def test_a_diverged_cell_is_recorded_not_dropped(tiny):
    out, _ = tiny
    record, model = run_cell(load_model(BUNDLED), "nobn", 1e30, 0, out / "data" / "target_train.npz",
                             out / "data" / "target_val.npz", epochs=1, batch_size=32, cache=out / "feature-cache")
    assert record["diverged"] and model is None and record["val_loss"] is None
    assert "not finite" in record["error"]
    entry = summarize_cells([record], 1)
    assert entry["diverged"] == 1 and entry["finished"] == 0 and entry["cells"] == [record]
    assert entry["val_loss_mean"] is None and entry["epochs_to_target_median"] is None
    plot_sweep(out / "diverged.png", {"nobn": {"1e+30": entry}}, {"loss": 1.0, "accuracy": 0.5}, 0.6)
    assert (out / "diverged.png").stat().st_size > 0


def _entry(lr, losses, accs, diverged=0):
    cells = [{"lr": lr, "diverged": False, "val_loss": x, "val_accuracy": a, "val_before": {"loss": 1.0},
              "epochs_to_target": 1 if a >= 0.6 else None} for x, a in zip(losses, accs, strict=True)]
    cells += [{"lr": lr, "diverged": True, "val_loss": None, "val_accuracy": None, "epochs_to_target": None}] * diverged
    return summarize_cells(cells, len(cells))


def test_the_verdict_follows_the_numbers():
    """The report's words come from the numbers: the same code says BN wins, loses or ties as the numbers do."""
    plain = {"0.001": _entry(1e-3, [0.50, 0.51, 0.52], [0.70, 0.71, 0.72]),
             "0.1": _entry(0.1, [0.90], [0.5], diverged=2)}
    for bn_losses, expected in (([0.40, 0.41, 0.42], "bn_lower"), ([0.60, 0.61, 0.62], "nobn_lower"),
                                ([0.50, 0.52, 0.51], "within_spread")):
        bn = {"0.001": _entry(1e-3, bn_losses, [0.7, 0.7, 0.7]), "0.1": _entry(0.1, [0.6, 0.6, 0.6], [0.7, 0.7, 0.7])}
        verdict = sweep_verdict({"nobn": plain, "bn": bn}, 0.6)
        assert verdict["verdict"] == expected
        assert verdict["best"]["nobn"]["lr_key"] == "0.001"  # the lr with diverged seeds is never "best"
        assert verdict["diverged"] == {"nobn": {"0.1": 2}, "bn": {}}
        assert verdict["trains_up_to"]["accuracy"] == {"nobn": "0.001", "bn": "0.1"}
        assert verdict["higher_lr"]["accuracy"] == "bn"
        assert "no BN at lr 0.1 (2 of 3 seeds)" in verdict["text"]


def test_demo_refuses_a_prior_table_larger_than_its_data(tmp_path):
    with pytest.raises(UserError, match="prior table"):
        run_demo(tmp_path, **{**TINY, "prior_sizes": (8, 33)})  # 33 > the 32 shifted images
    assert not (tmp_path / "data").exists()


def test_demo_refuses_a_missing_model(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--model", str(tmp_path / "none.onnx")]) == 2
    assert "not found" in capsys.readouterr().err


def test_demo_int8_rows_match_onnxruntime_and_numpy(tiny):
    """report['quantize']: each model's top-1 on clean and shifted images and each INT8 model's cosine / top-1
    agreement with the float model, recomputed here from onnxruntime outputs with numpy."""
    ort = pytest.importorskip("onnxruntime")
    out, report = tiny
    q = report["quantize"]
    assert set(q["models"]) == {"float", "int8_none", "int8_default"} and len(q["lines"]) == 2
    assert q["models"]["int8_none"]["recover"] == [] and q["models"]["int8_default"]["recover"]

    def logits(path, npz):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        with np.load(npz) as data:
            return session.run(None, {session.get_inputs()[0].name: data["x"]})[0].astype(np.float64), data["y"]

    files = {"float": out / "deploy.onnx", "int8_none": out / "deploy_int8_none.onnx",
             "int8_default": out / "deploy_int8_default.onnx"}
    val, shifted = out / "data" / "target_val.npz", out / "data" / "shifted_val.npz"
    ref, _ = logits(files["float"], val)
    for name, path in files.items():
        ops = [n.op_type for n in onnx.load(str(path)).graph.node]
        assert ("QuantizeLinear" in ops) == (name != "float"), name
        row = q["models"][name]
        for where, npz in (("clean", val), ("shifted", shifted)):
            z, y = logits(path, npz)
            assert row[where]["accuracy"] == pytest.approx(float(np.mean(z.argmax(1) == y)), abs=1e-12), (name, where)
        if name == "float":
            continue
        z, _ = logits(path, val)
        cosine = float((ref * z).sum() / (np.linalg.norm(ref) * np.linalg.norm(z)))
        agreement = float(np.mean(ref.argmax(1) == z.argmax(1)))
        check = row["checks"]["onnxruntime"]
        (metrics,) = check["outputs"].values()
        assert metrics["cosine_similarity"] == pytest.approx(cosine, rel=1e-6)
        assert metrics["top1_agreement"] == pytest.approx(agreement, abs=1e-12)
        assert check["passed"] == (cosine >= row["min_cosine"] and agreement >= row["min_top1"])
        assert set(row["checks"]) == {r for r in ("onnxruntime", "openvino") if available(r)}
    assert "INT8 for deployment" in (out / "report.md").read_text()


def test_demo_prior_table_matches_onnxruntime_and_numpy(tiny):
    """report['recalibrate']['prior_table']: every (calibration, n, prior) cell, mean/std = numpy over its draws;
    one cell per calibration set re-created here: the subset drawn by the stated rule, recalibrated, top-1 from
    onnxruntime logits with numpy; and its BN statistics = the numpy blend of the old and the prior-0 ones."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    from onnxbn.recalibration import recalibrate

    out, report = tiny
    table = report["recalibrate"]["prior_table"]
    assert table["sizes"] == [8] and table["seeds"] == 2 and table["priors"] == ["0", "n", "2n", "16n"]
    assert table["model"] == report["fold"]["model"] and table["eval_samples"] == {"clean": 24, "shifted": 24}
    rows = {(r["calibration"], r["n"], r["prior"]): r for r in table["rows"]}
    assert set(rows) == {(c, 8, p) for c in ("in-domain", "shifted") for p in table["priors"]}
    for row in rows.values():
        assert [d["seed_index"] for d in row["draws"]] == [0, 1]
        assert row["prior_samples"] == PRIOR_MULTIPLES[table["priors"].index(row["prior"])] * 8
        for where in ("clean", "shifted"):
            values = [d[where] for d in row["draws"]]
            assert row[f"{where}_mean"] == pytest.approx(np.mean(values), abs=1e-12)
            assert row[f"{where}_std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
    for calibration, line in zip(("in-domain", "shifted"), table["lines"], strict=True):
        r = rows[(calibration, 8, "0")]
        trained = table["as_trained"]
        assert line.startswith(calibration) and (
            f"N = 0: clean {100 * (r['clean_mean'] - trained['clean']):+.1f}, "
            f"shifted {100 * (r['shifted_mean'] - trained['shifted']):+.1f}") in line
    md = (out / "report.md").read_text()
    assert table["lines"][0] in md and "N x calibration size n" in md and "N = 2n (default)" in md

    model = load_model(out / "model_ft.onnx")

    def top1(proto, npz):
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        k = table["eval_samples"]["clean" if npz == val else "shifted"]
        with np.load(npz) as data:
            z = session.run(None, {session.get_inputs()[0].name: data["x"][:k]})[0]
            return float(np.mean(z.argmax(1) == data["y"][:k]))

    def bn_stats(proto):
        inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in proto.graph.initializer}
        return {n.name: (inits[n.input[3]], inits[n.input[4]]) for n in proto.graph.node
                if n.op_type == "BatchNormalization"}

    val, shifted = out / "data" / "target_val.npz", out / "data" / "shifted_val.npz"
    pools = {"in-domain": out / "data" / "target_train.npz", "shifted": out / "data" / "shifted_unlabelled.npz"}
    for domain, (calibration, pool_path) in enumerate(pools.items()):
        with np.load(pool_path) as npz:
            pool = npz["x"]
        rng = np.random.default_rng([report["data"]["seed"], domain, 8, 1])  # the stated rule, seed index 1
        x = pool[np.sort(rng.choice(len(pool), size=8, replace=False))]
        assert table["as_trained"] == {"clean": pytest.approx(top1(model, val), abs=1e-12),
                                       "shifted": pytest.approx(top1(model, shifted), abs=1e-12)}
        new = recalibrate(model, x, prior=16.0 * 8)
        draw = rows[(calibration, 8, "16n")]["draws"][1]
        assert draw["clean"] == pytest.approx(top1(new, val), abs=1e-12)
        assert draw["shifted"] == pytest.approx(top1(new, shifted), abs=1e-12)
        old, measured, blended = bn_stats(model), bn_stats(recalibrate(model, x, prior=0.0, var_floor=0.0)), bn_stats(new)
        assert old and set(old) == set(blended)
        for name, (mu_old, var_old) in old.items():
            mu_new, var_new = measured[name]
            w = 16 * 8 / (16 * 8 + 8)
            mu = w * mu_old + (1 - w) * mu_new
            var = w * (var_old + (mu_old - mu) ** 2) + (1 - w) * (var_new + (mu_new - mu) ** 2)
            np.testing.assert_allclose(blended[name][0], mu, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(blended[name][1], np.maximum(var, 0.01 * var_old), rtol=1e-5, atol=1e-6)
