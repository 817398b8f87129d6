"""Hardware target profiles, shipped as data (imported as edgefleet.hardware).

One TOML file per target in `profiles/`; `edgefleet.profiles` loads them.
"""
