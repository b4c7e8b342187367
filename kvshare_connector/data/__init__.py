"""Real workloads for demos and benchmarks."""
