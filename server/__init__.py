"""The fleet server (imported as edgefleet.server): bundles, devices, staged rollouts.

`edgefleet server run` assembles one replica (`runner.FleetServer`): the
database (`db`), the MQTT link and ingestion (`mqtt`), the rollout driver
(`rollouts`) and the HTTP API (`api`); `client` is the CLI's side of that API.
docs/server.md describes running it, docs/rollouts.md the rollout semantics.
"""
