"""edgesplit planner: ranks split configurations from profiles and pushes plans to agents.

Imports runtime.contracts, runtime.wire and runtime.daemon; nothing of the agent or the worker.
"""
