"""Benchmarks: run each as ``python -m bench.<name>``; results land in ``bench/results/``."""
