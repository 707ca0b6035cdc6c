"""Benchmarks: offloading throughput (`python -m bench`), cost model and projections, kernel micro-benchmarks."""
