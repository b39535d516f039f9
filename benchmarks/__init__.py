"""Scripts that measure chanprune against baselines; run them with ``python -m benchmarks.<name>``."""
