"""The demo pipeline at a tiny budget: the report's keys and the identity numbers."""

from __future__ import annotations

import json

import pytest

from onnxbn.cli import main
from onnxbn.demo import BUNDLED, run_demo

pytestmark = pytest.mark.skipif(not BUNDLED.is_file(), reason="bundled demo model missing")


def test_demo_report_at_tiny_budget(tmp_path):
    report = run_demo(tmp_path, source_samples=64, train_samples=64, val_samples=32, epochs=1, batch_size=32)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["identity"] == report["identity"]
    assert report["identity"]["max_rel_error"] <= 1e-6 and report["identity"]["top1_agreement"] == 1.0
    assert report["notebook_mistake"]["max_rel_error"] > 1e-2
    assert set(report["finetune"]) == {"nobn_lr1e-05", "bn_lr1e-05", "nobn_lr0.0003", "bn_lr0.0003"}
    for v in report["finetune"].values():
        assert {"val_loss", "val_accuracy"} <= set(v) and len(v["history"]) == 1
    assert report["fold"]["bn_remaining"] == 0 and report["fold"]["max_rel_error"] <= 1e-5
    for name in ("report.md", "curves.png", "activations.png", "model_bn.onnx", "model_ft.onnx", "deploy.onnx"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "Identity BN insertion" in (tmp_path / "report.md").read_text()


def test_demo_refuses_a_missing_model(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--model", str(tmp_path / "none.onnx")]) == 2
    assert "not found" in capsys.readouterr().err
