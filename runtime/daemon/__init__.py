"""Daemon plumbing shared by the worker, the planner and the agent's local API.

* :mod:`runtime.daemon.server`: the scaffold (:class:`~runtime.daemon.server.Daemon`, configured by
  :class:`~runtime.daemon.server.DaemonOptions`): gRPC server, health, reflection, interceptors,
  metrics endpoint, drain, signals.
* :mod:`runtime.daemon.interceptors`: the one exception-to-status mapping, as a server interceptor.
* :mod:`runtime.daemon.planner_client`: the one client of the planner's API.
* :mod:`runtime.daemon.metrics_http`: Prometheus exposition over HTTP.
"""
