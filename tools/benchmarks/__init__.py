"""The benchmarks behind tools/bench.py: harness.py (the alternating harness), context.py (profiles and
models), one module per benchmark group, cli.py (the command line)."""
