"""Daemon plumbing shared by the worker, the planner and the agent's local API."""
