"""Benchmarks of the deploy runtimes: routed vs dense latency on CPU/GPU (the timer is tokenskip.timing)."""
