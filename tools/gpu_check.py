"""GPU check: the same fine-tune step and statistics on CUDA and on the CPU must agree.

Run on a machine with an NVIDIA GPU (tools/gpu_check.sh sets up the environment).
Exits 0 when both agree within tolerance, 1 when they do not, 77 when there is no GPU.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> int:
    import torch

    import onnxbn
    from onnxbn.runtimes.ort_backend import cuda_available

    small_cnn = importlib.import_module("conftest").small_cnn  # tests/conftest.py, on sys.path above

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 77
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    model = small_cnn()
    results = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0),
               "onnxruntime_cuda": cuda_available()}
    stats_cpu = onnxbn.collect_stats(model, x, after="relu", device="cpu")
    if cuda_available():
        stats_gpu = onnxbn.collect_stats(model, x, after="relu", device="cuda")
        results["stats_provider"] = stats_gpu.meta["provider"]
        results["stats_max_rel_var_diff"] = max(
            float(np.abs(stats_gpu.var(n) - stats_cpu.var(n)).max() / stats_cpu.var(n).max()) for n in stats_cpu.tensors)
    bn = onnxbn.insert_bn(model, stats_cpu)
    runs = {}
    # "auto": torch trains on CUDA; the frozen part runs on onnxruntime's CUDA where it loads, else its CPU
    for name, device in (("cpu", "cpu"), ("cuda", "auto")):
        started = time.perf_counter()
        runs[name] = onnxbn.finetune(bn, (x, y), epochs=2, lr=1e-2, batch_size=32, dropout=0.0, device=device,
                                     optimizer="sgd")
        results[f"finetune_seconds_{name}"] = round(time.perf_counter() - started, 2)
    results["finetune_device_cuda_run"] = runs["cuda"].log["device"]
    a = {t.name: onnx_array(t) for t in runs["cpu"].model.graph.initializer}
    b = {t.name: onnx_array(t) for t in runs["cuda"].model.graph.initializer}
    results["finetune_max_rel_weight_diff"] = max(
        float(np.abs(a[k] - b[k]).max() / max(np.abs(a[k]).max(), 1e-12)) for k in a)
    results["bf16_runs"] = bool(onnxbn.finetune(bn, (x, y), epochs=1, lr=1e-2, batch_size=32, device="auto",
                                                bf16=True).log["history"])
    results.update(batch_recalibration())
    ok = (results["finetune_max_rel_weight_diff"] <= 1e-4 and results.get("stats_max_rel_var_diff", 0) <= 1e-5
          and results["finetune_device_cuda_run"].startswith("cuda")
          and results["recalibrate_batch_max_rel_diff"] <= 1e-5)
    results["passed"] = ok
    print(json.dumps(results, indent=2))
    return 0 if ok else 1


def batch_recalibration() -> dict:
    """Batch recalibration of residual models (the model matrix's ResNeXt and MobileNetV3 exported at opset 17)
    on CUDA against the CPU, as onnxbn runs it (TF32 off) and with torch's TF32 default: the largest
    relative difference of the BN statistics each way (a first GPU run saw such models fail by more than 1e-5)."""
    import contextlib

    import onnxbn
    from onnxbn.torch_import import precision

    matrix = importlib.import_module("test_matrix_modern")  # tests/, on sys.path above
    out = {}
    for label, exact in (("recalibrate_batch_max_rel_diff", True), ("recalibrate_batch_max_rel_diff_tf32", False)):
        worst = 0.0
        for arch in ("resnext", "mobilenetv3"):
            model = matrix.model_of(arch, "ts17")
            x, _ = matrix.inputs("ts17")
            runs = {}
            for device in ("cpu", "auto"):
                saved = precision.ieee_float32
                if not exact:
                    precision.ieee_float32 = contextlib.nullcontext
                try:
                    result = onnxbn.recalibrate(model, x, mode="batch", batch_size=matrix.BATCH, prior=0, var_floor=0,
                                                device=device)
                    runs[device] = {t.name: onnx_array(t) for t in result.graph.initializer}
                finally:
                    precision.ieee_float32 = saved
            worst = max(worst, *(float(np.abs(runs["auto"][k] - v).max() / max(np.abs(v).max(), 1e-12))
                                 for k, v in runs["cpu"].items() if v.dtype.kind == "f"))
        out[label] = worst
    return out


def onnx_array(tensor):
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor)


if __name__ == "__main__":
    sys.exit(main())
