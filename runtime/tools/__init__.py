"""Tools that are not part of the shipped runtime's import graph: Transfer Layer training and
sweeps, the digits trainer and the link-emulating relay. Only the CLI imports them."""

from runtime.contracts.grpcenv import apply as _grpc_env

_grpc_env()  # before anything here imports grpc: tools and measurements run as the daemons do
