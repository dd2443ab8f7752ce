"""``edgesplit bench-scenarios``: edgesplit against local, edge-only, Scission and ScissionLite on emulated
IIoT links, with the device under a CPU quota (spec, testbed, device child, costs, runner, report)."""
