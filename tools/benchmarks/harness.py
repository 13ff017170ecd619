"""The one alternating harness every benchmark in tools/ uses: timing, medians, rows, machine facts, RSS.

Every benchmark alternates its contenders in one process and run (`alternate`) and reports the
median of each contender and its ratio to a reference contender (`row`, `Result`), so that numbers
taken on a busy machine stay comparable. Peak memory is read from /proc/self/status (VmHWM, RssAnon)
of a fresh child process (`run_child`), since ru_maxrss of a forked child carries its parent's peak.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def now() -> float:
    return time.perf_counter()


def alternate(contenders: dict, reps: int, warmup: bool = True, collect: bool = False) -> dict[str, list[float]]:
    """Run the contenders A B C, B C A, C A B, ... `reps` rounds; each call returns its own measurement.

    The order rotates every round so that no contender always follows the same one (a
    busy machine, or the previous run's threads still spinning, would otherwise bias
    one of them). One untimed warm-up round first (first-touch page faults, lazy
    imports, allocator growth) unless `warmup` is False. With `collect`, the garbage
    collector runs before every call (and once at the end), so no contender pays for
    another's garbage.
    """
    names = list(contenders)
    if warmup:
        for fn in contenders.values():
            fn()
    raw: dict[str, list[float]] = {name: [] for name in contenders}
    for rep in range(reps):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            if collect:
                gc.collect()
            raw[name].append(float(contenders[name]()))
    if collect:
        gc.collect()
    return raw


def median(values) -> float:
    """The median of `values`; NaN when there are none."""
    values = list(values)
    return float(statistics.median(values)) if values else float("nan")


def machine_info() -> dict:
    """CPU model, cores, load average, platform and the versions of onnxruntime, onnx and torch."""
    import onnx
    import onnxruntime
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "cpu_model": cpu, "cores": os.cpu_count(), "cores_usable": affinity,
        "loadavg_start": list(os.getloadavg()), "platform": platform.platform(),
        "python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "ort_intra_op_threads": "onnxruntime default (0)", "ort_available_providers": onnxruntime.get_available_providers(),
    }


def proc_status() -> dict[str, float]:
    """VmRSS and VmHWM (peak resident set) of this process, MiB."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) / 1024.0
    return out


def run_child(code: str, what: str) -> tuple[dict, float, str]:
    """Run `code` in a fresh `python -c` process: (the JSON of its last stdout line, wall seconds, stderr).

    A failing child raises RuntimeError naming `what` with the tail of its stderr.
    """
    t = now()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    wall = now() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall, proc.stderr


@dataclass
class Result:
    """One benchmark's rows (contender, median, unit, ratio to the reference) and verdict."""

    name: str
    target: str
    rows: list[dict]
    ratio: float
    met: bool
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"target": self.target, "ratio": self.ratio, "met": self.met, "rows": self.rows,
                "notes": self.notes, **self.extra}


def row(contender: str, raw: list[float], unit: str, ratio: float | None, per: float = 1.0, role: str = "") -> dict:
    """A table row; `per` turns a time into a rate (items / seconds) when unit ends in '/s'."""
    values = [per / v for v in raw] if unit.endswith("/s") else list(raw)
    return {"contender": contender, "median": median(values), "unit": unit, "ratio": ratio, "raw": raw,
            "raw_unit": "s" if unit.endswith("/s") else unit, "role": role}

