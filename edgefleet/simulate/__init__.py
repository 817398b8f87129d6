"""Simulated devices speaking the real device protocol (`edgefleet simulate`, docs/scale.md).

`device.py` is what a simulated device says (signed heartbeats, telemetry
windows, status reports, its answer to a directive); `network.py` runs many of
them in one process: each its own MQTT client and identity, every client driven
by one network loop. The package imports paho and httpx (the `simulate` extra);
nothing else of edgefleet imports it.
"""
