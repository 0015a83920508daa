"""Benchmarks: run by hand (`python -m benchmarks.benchmark`), not part of the test suite."""
