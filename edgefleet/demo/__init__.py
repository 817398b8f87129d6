"""`edgefleet demo`: the whole loop on one machine (docs/quickstart.md).

A fleet server with its embedded broker, real agents enrolled by a claim token,
a model trained here and converted for this machine, traffic with labelled
feedback, a canary rollout judged on it, a bad version aborted by its gate,
and drift alerts for the devices whose inputs shift.
Every part runs as the `edgefleet` command a user would type, so the demo
imports no deployable.
"""
