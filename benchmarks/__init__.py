"""Benchmarks: each script reproduces one table of benchmarks/RESULTS.md."""
