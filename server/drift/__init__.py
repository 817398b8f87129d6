"""Drift checks on the server: references stored at push, the evaluator, alerts.

reference.py   read a bundle's drift reference at push, store it, load it back
evaluator.py   the drift evaluator: windows of telemetry buckets judged per device
               and per cohort, persistence, alerts opened and resolved
alerts.py      alerts: listing and acknowledgement
"""
