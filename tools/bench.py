#!/usr/bin/env python
"""Benchmarks: onnxbn side by side with the alternatives, as same-run ratios.

    python tools/bench.py [NAMES...] [--quick] [--json OUT] [--workdir DIR] [--reps R]

The entry point only: the benchmarks live in tools/benchmarks/ (cli.py documents the names and
options, harness.py the alternating harness, one module per benchmark group).
"""

import sys

from benchmarks.cli import main

if __name__ == "__main__":
    sys.exit(main())
