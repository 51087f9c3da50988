"""Speed, memory and quality measurements: run each as `python -m benchmarks.NAME` from the
repository root; every measurement is one JSON line."""
