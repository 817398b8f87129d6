"""ARM bundles run on an emulated ARM userland before a fleet sees them.

`root.py` builds a Debian root for arm64 or armhf from Debian packages and
the ARM wheels of the runtimes, cached and built atomically; `smoke.py`
verifies a bundle and runs its smoke test in that root under qemu-user,
with the agent's own smoke-test code (`guest.py` loads it there). Correctness
only: an emulated CPU's timings say nothing about a real one, so none is
reported.
"""
