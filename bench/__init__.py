"""Benchmarks: our kernels against the peers users run today, measured in the same run (see harness.py)."""
