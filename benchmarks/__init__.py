"""Benchmarks and dataset tools; run from the checkout as `python -m benchmarks.NAME`."""
