"""Measurement that ships with the runtime: the block profiler, the loopback bench and the demo."""

from runtime.contracts.grpcenv import apply as _grpc_env

_grpc_env()  # before anything here imports grpc: tools and measurements run as the daemons do
