"""Latency profiling behind `arexport profile`: per-step-kind percentiles, throughput, memory,
and the memory-bandwidth floor of a decode step."""
