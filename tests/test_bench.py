"""Smoke test of tools/bench.py: every benchmark runs end to end on a tiny model and
reports positive timings and a ratio. No timing is asserted (timings belong in the
benchmark's output, never in a test's pass/fail)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "tools" / "bench.py"
EXPECTED = ("stats-cost", "stats-memory", "insert-time", "train-step", "feature-cache", "data-pipeline",
            "deploy-latency")


def test_bench_quick_tiny_writes_every_benchmark(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--tiny", "--json", str(out),
                           "--workdir", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())

    assert set(report["benchmarks"]) == set(EXPECTED)
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["onnxruntime"] and machine["torch"] and machine["cpu_model"]
    assert report["profile"]["name"] == "tiny"
    for name, bench in report["benchmarks"].items():
        assert isinstance(bench["ratio"], float) and math.isfinite(bench["ratio"]) and bench["ratio"] > 0, name
        assert isinstance(bench["met"], bool), name
        assert bench["target"], name
        subjects = [r for r in bench["rows"] if r["role"] == "subject"]
        references = [r for r in bench["rows"] if r["role"] == "reference"]
        assert subjects and references, name
        for r in bench["rows"]:
            assert r["raw"] and all(v > 0 for v in r["raw"]), (name, r["contender"])
            assert r["median"] > 0 and r["ratio"] > 0, (name, r["contender"])
        # alternated contenders ran the same number of times (per group such as "[batch 1]")
        if name != "feature-cache":
            groups: dict[str, set[int]] = {}
            for r in subjects + references:
                group = r["contender"].split("]")[0] if r["contender"].startswith("[") else ""
                groups.setdefault(group, set()).add(len(r["raw"]))
            assert all(len(c) == 1 for c in groups.values()), (name, groups)
    # the table names every benchmark
    for name in EXPECTED:
        assert name in proc.stdout


def test_bench_quantize_shift_accuracy_tiny(tmp_path):
    """The shifted-domain rows of `bench.py quantize`: each contender's INT8 model and the float model scored with
    labels on clean and shifted demo images; the float numbers equal onnxruntime + numpy computed here."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    sys.path.insert(0, str(BENCH.parent))
    from benchmarks.context import PROFILES, Context  # pyright: ignore[reportMissingImports]  (tools/, on the path above)
    from benchmarks.quantize import SHIFT_SIZES, shift_accuracy  # pyright: ignore[reportMissingImports]

    from onnxbn.demo.data import make_task, to_model_input
    from onnxbn.demo.run import BUNDLED
    from onnxbn.demo.shift import shift_images

    ctx = Context(PROFILES["tiny"], tmp_path, 1)
    result = shift_accuracy(ctx, contenders=("onnxbn minmax", "ort-minmax"))
    assert set(result["raw"]) == {"float", "onnxbn minmax", "ort-minmax"}
    assert len(result["rows"]) == 6 and all(0 <= r["median"] <= 100 for r in result["rows"])
    images, y = make_task("source", SHIFT_SIZES["tiny"][1], 12)
    session = ort.InferenceSession(str(BUNDLED), providers=["CPUExecutionProvider"])
    for domain, x in (("clean", to_model_input(images)), ("shifted", to_model_input(shift_images(images)))):
        logits = np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])
        assert result["raw"]["float"][domain] == float(np.mean(logits.argmax(1) == y)), domain
    for c in ("onnxbn minmax", "ort-minmax"):
        ops = {n.op_type for n in onnx.load(str(tmp_path / f"shift-16-{c.replace(' ', '_')}.onnx")).graph.node}
        assert "QuantizeLinear" in ops and "DequantizeLinear" in ops, c
