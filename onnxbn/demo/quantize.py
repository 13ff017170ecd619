"""The demo's INT8 step: the folded model quantized with `onnxbn.quantize`, float vs INT8 accuracy, checked.

Two INT8 models from the same calibration (clean target training images, onnxbn's streaming ranges, minmax):
recovery "none" and the default (`onnxbn.quantization.DEFAULT_RECOVER`). Each is evaluated like the float model
(`onnxbn.evaluate`: cross-entropy and top-1) on the clean validation images and on the shifted ones, and checked
against the float model with `onnxbn.compare` on onnxruntime and, when installed, OpenVINO. The gate is
QuantizeReport's: cosine similarity of the outputs >= min_cosine and top-1 agreement >= min_top1; element-wise
tolerances do not apply to INT8 (a logit moves by about one quantization step of each layer it passes).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import onnx

from onnxbn.demo.recalibration import eval_row
from onnxbn.io.save import save_model

log = logging.getLogger("onnxbn")
CHECK_METRICS = ("cosine_similarity", "top1_agreement", "max_rel_error", "mean_abs_error")


def _recoveries() -> tuple[tuple[str, str], ...]:
    """(row name, `recover` value): none, and quantize's default."""
    from onnxbn.quantization import DEFAULT_RECOVER

    return ("none", "none"), ("default", ",".join(DEFAULT_RECOVER))


def _check(report, result, runtime: str) -> dict:
    """One runtime's check row: the metrics of each output, the precision it ran, and QuantizeReport's gate."""
    info = result.to_dict()
    check = {"samples": info.get("samples"), "outputs": {k: {m: v[m] for m in CHECK_METRICS if m in v}
                                                         for k, v in info["outputs"].items()}}
    return {"runtime": runtime, "precision": result.candidate_runtime.get("precision"),
            "version": result.candidate_runtime.get("version"), **check,
            "passed": dataclasses.replace(report, check=check).passed}


def quantize_rows(folded: onnx.ModelProto, calibration: Path, clean_val: Path, shifted_eval: Path, out: Path, *,
                  samples: int, seed: int) -> dict:
    """report['quantize']['models']: the float model and each INT8 model (written as deploy_int8_<name>.onnx) on
    clean and shifted images, with its check against the float model per runtime."""
    from onnxbn.check import compare
    from onnxbn.quantization import quantize_with_report
    from onnxbn.runtimes.base import available

    rows: dict[str, dict] = {"float": {"clean": eval_row(folded, clean_val), "shifted": eval_row(folded, shifted_eval)}}
    for name, recover in _recoveries():
        log.info("demo: INT8 quantization, recovery %s", recover)
        started = time.perf_counter()
        qdq, rep = quantize_with_report(folded, str(calibration), recover=recover, limit=samples, seed=seed,
                                        batch_size=64, verify=False)
        seconds = time.perf_counter() - started
        save_model(qdq, out / f"deploy_int8_{name}.onnx")
        checks = {}
        for runtime in ("onnxruntime", "openvino"):
            if available(runtime):
                result = compare(folded, qdq, str(clean_val), atol=math.inf, rtol=0.0, batch_size=64,
                                 candidate_runtime=runtime)
                checks[runtime] = _check(rep, result, runtime)
        rows[f"int8_{name}"] = {"recover": rep.recover, "method": rep.method, "per_channel": rep.per_channel,
                                "activations": rep.activations, "calibration_samples": rep.ranges.get("samples"),
                                "min_cosine": rep.min_cosine, "min_top1": rep.min_top1,
                                "seconds": round(seconds, 3), "clean": eval_row(qdq, clean_val),
                                "shifted": eval_row(qdq, shifted_eval), "checks": checks}
    return rows


def quantize_lines(rows: dict) -> list[str]:
    """What the INT8 rows show, from their numbers: the accuracy each costs on clean and shifted images, and the
    checks that pass or fail."""
    base = rows["float"]
    lines = []
    for name, row in rows.items():
        if name == "float":
            continue
        cost = ", ".join(f"{where} {row[where]['accuracy']:.2%} (float {base[where]['accuracy']:.2%}, "
                         f"{100 * (row[where]['accuracy'] - base[where]['accuracy']):+.1f} points)"
                         for where in ("clean", "shifted"))
        checks = "; ".join(f"{r}: {'PASS' if c['passed'] else 'FAIL'} (runtime precision {c['precision']}, " + ", ".join(
            f"cosine {o['cosine_similarity']:.4f}, top-1 agreement {o.get('top1_agreement', math.nan):.2%}"
            for o in c["outputs"].values()) + ")" for r, c in row["checks"].items())
        lines.append(f"INT8 with recovery {','.join(row['recover']) or 'none'}: {cost}; checked against the float "
                     f"model: {checks or 'no runtime'}.")
    return lines
