"""How to add an optional part (an extra) to an installed edgefleet, in one sentence.

edgefleet is installed from its checkout or from the wheel `make dist` builds
(README, "Install"), so the hint names both rather than a package index.
"""

from __future__ import annotations

from edgefleet import __version__


def install_hint(extra: str) -> str:
    """The commands that add `extra`, from the checkout or from the wheel."""
    wheel = f"edgefleet-{__version__}-py3-none-any.whl"
    return f"pip install '.[{extra}]' in the checkout, or the wheel: pip install '{wheel}[{extra}]'"
