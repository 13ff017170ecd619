"""Benchmarks: onnxbn side by side with the alternatives, as same-run ratios.

    python tools/bench.py [NAMES...] [--quick] [--json OUT] [--workdir DIR] [--reps R]

NAMES (default: all): stats-cost stats-memory insert-time train-step feature-cache
data-pipeline deploy-latency; by name only: deploy-runtimes (latency and error of the original
vs folded model on onnxruntime, openvino and tract), fixed-cost (each command as a whole
process vs plain onnxruntime doing the same inference: wall time and peak RSS) and quantize
(onnxbn's calibration vs onnxruntime's MinMax/Percentile/Entropy calibrators at N and 4N samples:
time, peak RssAnon, top-1 agreement and cosine of each INT8 model with the float one, on the
profile's model and, except --tiny, a larger one; top-1 with labels of the bundled demo model
under the demo's domain shift; accuracy recovery per mode). Every
benchmark alternates its contenders (A B A B ...) in one process and run, and reports the median of each and the ratio to the
reference contender, so the numbers stay comparable on a busy machine. A table goes
to stdout; `--json OUT` writes every raw timing plus the machine (CPU model, cores,
load, onnxruntime/torch versions, execution provider).

Models: the default run uses VGG16 at 224x224 with random weights (`onnxbn.export_vgg`,
written once to the work folder and reused). `--quick` uses a VGG11-shaped network
with a quarter of the channels at 64x64 (built here in torch and exported with the
same TorchScript exporter), small N and few repetitions: a smoke run of all seven in a
few minutes on two cores. `--tiny` (hidden; what tests/test_bench.py runs) uses a
two-conv miniature at 16x16. The table header names the model that ran.

All onnxruntime sessions run on the CPU provider with onnxruntime's default thread
count (the same for `collect_stats`, which picks no thread count either).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

from .context import PROFILES, Context, Profile
from .deploy import bench_deploy_latency, bench_deploy_runtimes, bench_fixed_cost
from .harness import Result, machine_info, now
from .quantize import bench_quantize
from .stats import bench_insert_time, bench_stats_cost, bench_stats_memory
from .training import bench_data_pipeline, bench_feature_cache, bench_train_step

BENCHMARKS = ("stats-cost", "stats-memory", "insert-time", "train-step", "feature-cache", "data-pipeline",
              "deploy-latency")



RUNNERS = {
    "stats-cost": bench_stats_cost,
    "stats-memory": bench_stats_memory,
    "insert-time": bench_insert_time,
    "train-step": bench_train_step,
    "feature-cache": bench_feature_cache,
    "data-pipeline": bench_data_pipeline,
    "deploy-latency": bench_deploy_latency,
    "deploy-runtimes": bench_deploy_runtimes,  # optional: by name only (openvino, tract from onnxbn[dev])
    "fixed-cost": bench_fixed_cost,  # by name only: whole processes, minutes on VGG16
    "quantize": bench_quantize,  # by name only: onnxbn vs onnxruntime calibrators, fresh child per run
}


# ----------------------------------------------------------------------------- output

def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return ""
    if unit == "s":
        if value < 1e-2:
            return f"{value * 1e6:.0f} us"
        return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
    if unit:
        return f"{value:.4g} {unit}"
    return f"{value:.3f}x"


def print_table(results: list[Result], profile: Profile) -> None:
    header = ("benchmark", "contender", "median", "ratio", "target", "met?")
    lines = []
    for res in results:
        for i, r in enumerate(res.rows):
            subject = r["role"] == "subject"
            lines.append((res.name if i == 0 else "", r["contender"], fmt(r["median"], r["unit"]), fmt(r["ratio"]),
                          res.target if i == 0 else "",
                          ("yes" if res.met else "NO") + f" ({res.ratio:.3f}x)" if i == 0 else ("*" if subject else "")))
    columns = zip(header, *lines, strict=True)
    widths = [max(len(str(x)) for x in col) for col in columns] if lines else [len(h) for h in header]
    print(f"model: {profile.description}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for line in lines:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)))
    for res in results:
        for note in res.notes:
            print(f"note [{res.name}]: {note}")


def main(argv: list[str] | None = None) -> int:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run (default all): {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="small model, few repetitions: all seven in minutes")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", metavar="OUT", help="write raw timings and machine info here")
    parser.add_argument("--workdir", metavar="DIR", help="where models, stats and images are cached "
                        "(default: $TMPDIR/onnxbn-bench)")
    parser.add_argument("--reps", type=int, help="alternating repetitions per benchmark (default per profile)")
    parser.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: torch's own; 1 with --quick, "
                        "where a loaded 2-core machine makes 2 spinning threads 100x slower on small layers)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in RUNNERS]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(RUNNERS)}")
    profile = PROFILES["tiny" if args.tiny else "quick" if args.quick else "full"]
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir()) / "onnxbn-bench"
    ctx = Context(profile, workdir, args.reps or profile.reps)
    threads = args.torch_threads or (1 if args.tiny or args.quick else None)
    if threads:
        import torch

        torch.set_num_threads(threads)
    info = machine_info()
    info["provider"] = "cpu (CPUExecutionProvider, forced for every session)"
    results, report = [], {"machine": info, "profile": {**profile.__dict__, "reps": ctx.reps},
                           "argv": sys.argv[1:], "benchmarks": {}}
    for name in args.names or BENCHMARKS:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        t = now()
        res = RUNNERS[name](ctx)
        res.extra["wall_s"] = now() - t
        results.append(res)
        report["benchmarks"][name] = res.to_dict()
        print(f"  {name}: {res.ratio:.3f}x ({'met' if res.met else 'MISSED'}: {res.target}) in {now() - t:.1f} s",
              file=sys.stderr, flush=True)
        if args.json:  # after every benchmark, so a long run that is cut short keeps what it measured
            Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    info["loadavg_end"] = list(os.getloadavg())
    info["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print_table(results, profile)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


