"""The packages of the wheel, found rather than listed.

Each top-level folder is mapped into the `edgefleet` namespace (`edgefleet/` is
the core, `agent/` becomes `edgefleet.agent`, ...), which pyproject.toml cannot
say together with finding packages; everything else is in pyproject.toml. A
new subpackage, or a folder of data files under a root, needs no entry here.
"""

from setuptools import find_namespace_packages, setup

ROOTS = {
    "edgefleet": "edgefleet",
    "edgefleet.agent": "agent",
    "edgefleet.client": "client",
    "edgefleet.converter": "converter",
    "edgefleet.hardware": "hardware",
    "edgefleet.server": "server",
}


def packages_under(root: str, folder: str) -> list[str]:
    found = find_namespace_packages(folder, exclude=["*__pycache__*"])
    return [root, *(f"{root}.{name}" for name in found)]


setup(
    package_dir=ROOTS,
    packages=[name for root, folder in ROOTS.items() for name in packages_under(root, folder)],
)
