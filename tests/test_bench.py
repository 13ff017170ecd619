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
