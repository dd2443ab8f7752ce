"""Measurement that ships with the runtime: the block profiler, the loopback bench and the demo."""
