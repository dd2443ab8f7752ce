"""Shared contracts: what the agent, the worker and the planner agree on.

The bottom layer: profiles and their schema, the cost model's vocabulary (links, tiers,
constraints, configurations), constraint parsing, tier names, typed configuration loading and
the one error hierarchy with its mapping to gRPC status codes. It imports no other edgesplit
package (only the generated protobuf messages).
"""
