"""Hardware target profiles and the agent's systemd files, shipped as data (edgefleet.hardware).

One TOML file per target in `profiles/`; `edgefleet.profiles` loads them.
`systemd/` holds the agent's unit and its system user (docs/agent.md, "systemd").
"""
