"""Benchmark and evaluation scripts; each writes bench/results/<name>.{json,md,png}."""
