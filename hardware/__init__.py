"""Hardware target profiles and the agent's systemd files, shipped as data (edgefleet.hardware).

One TOML file per target in `profiles/`; `edgefleet.profiles` loads them.
`systemd/` holds the agent's unit, its system user (sysusers.d) and the group of its
configuration (tmpfiles.d) (docs/agent.md, "systemd"; `edgefleet devices provision`).
"""
