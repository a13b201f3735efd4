"""Benchmarks: ``python -m bench.cpu`` (tiny pipeline smoke) and ``python -m bench.gpu`` (full-size, lent GPU)."""
