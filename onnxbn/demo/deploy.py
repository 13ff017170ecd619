"""The demo's deploy check: the folded model on every installed runtime against the unfolded model on
onnxruntime (f32): max abs/rel error, top-1 agreement, the precision the runtime reports, median latency.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import onnx

log = logging.getLogger("onnxbn")




DEPLOY_RUNTIMES = (("onnxruntime", "f32"), ("openvino", "f32"), ("openvino", "default"), ("tract", "f32"),
                   ("reference", "f32"))


def _latency_ms(session, x: np.ndarray, feed: str, runs: int) -> float:
    session.run(None, {feed: x})  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, {feed: x})
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def deploy_rows(unfolded: onnx.ModelProto, folded: onnx.ModelProto, val: Path, samples: int,
                latency_runs: int) -> tuple[dict, list[str]]:
    """The folded model on every installed runtime vs the unfolded one on onnxruntime (f32): max abs/rel error,
    top-1 agreement, the precision the runtime reports, and the folded model's median latency at batch 1 and 8."""
    from onnxbn.check import compare
    from onnxbn.feeding import model_input
    from onnxbn.runtimes.base import INSTALL, available
    from onnxbn.runtimes.sessions import open_session

    rows, skipped = {}, []
    feed = model_input(folded)[0]
    with np.load(val) as data:
        x = np.ascontiguousarray(data["x"][:8])
    for runtime, precision in DEPLOY_RUNTIMES:
        if not available(runtime):
            if runtime not in skipped:
                skipped.append(runtime)
                log.info("demo: deploy check: %s is not installed (%s)", runtime, INSTALL.get(runtime, ""))
            continue
        key = runtime if precision == "f32" else f"{runtime}_{precision}"
        log.info("demo: deploy check on %s (precision %s)", runtime, precision)
        report = compare(unfolded, folded, str(val), candidate_runtime=runtime, precision=precision, limit=samples,
                         batch_size=64)
        out = report.to_dict()["outputs"][folded.graph.output[0].name]
        cand = report.candidate_runtime
        session = open_session(folded, runtime, precision=precision)
        runs = max(1, latency_runs // 4) if runtime == "reference" else latency_runs  # numpy: slow, fewer runs
        rows[key] = {
            "runtime": runtime, "version": cand.get("version"), "requested": cand.get("requested"),
            "precision": cand.get("precision"), "note": cand.get("note", ""), "samples": report.samples,
            "max_abs_error": out["max_abs_error"], "max_rel_error": out["max_rel_error"],
            "top1_agreement": out["top1_agreement"], "passed": report.passed, "tolerance": report.tolerance,
            "violations": out["violations"], "elements": out["elements"],
            "latency_ms_b1": _latency_ms(session, x[:1], feed, runs),
            "latency_ms_b8": _latency_ms(session, x[:8], feed, max(1, runs // 2)),
            "latency_runs": {"b1": runs, "b8": max(1, runs // 2)},
        }
    return rows, skipped


def deploy_text(rows: dict, skipped: list[str]) -> str:
    """What the deploy rows show (passes, the largest f32 error, the runs below f32, the fastest), from their numbers."""
    if not rows:
        return "No runtime was checked."
    failed = [k for k, r in rows.items() if not r["passed"]]
    lowered = [k for k, r in rows.items() if r["precision"] not in ("f32", "f64")]
    parts = [f"{len(rows) - len(failed)} of {len(rows)} runtime configurations pass their default tolerance"
             + ("; FAIL: " + ", ".join(
                 f"{k} ({rows[k]['precision']}: {rows[k]['violations']} of {rows[k]['elements']} output values outside "
                 f"the {rows[k]['tolerance']} tolerance, {round((1 - rows[k]['top1_agreement']) * rows[k]['samples'])} "
                 f"of {rows[k]['samples']} predictions differ)" for k in failed) if failed else "") + "."]
    f32 = {k: r for k, r in rows.items() if r["precision"] == "f32"}
    if f32:
        worst = max(f32, key=lambda k: f32[k]["max_rel_error"])
        parts.append(f"At f32 the largest max rel error is {f32[worst]['max_rel_error']:.2g} ({worst}).")
    if lowered:
        parts.append("Below f32: " + "; ".join(
            f"{k} ran {rows[k]['precision']}: max abs error {rows[k]['max_abs_error']:.2g}, max rel "
            f"{rows[k]['max_rel_error']:.2g}, top-1 agreement {rows[k]['top1_agreement']:.2%}" for k in lowered) + ".")
    fastest = min(rows, key=lambda k: rows[k]["latency_ms_b8"])
    parts.append(f"Fastest at batch 8: {fastest} ({rows[fastest]['latency_ms_b8']:.2f} ms).")
    if skipped:
        parts.append(f"Not installed: {', '.join(skipped)}.")
    return " ".join(parts)
