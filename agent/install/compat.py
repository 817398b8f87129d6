"""Can this device run the bundle? Runtime, free disk and memory (the CHECKING state).

Profile, minimum agent version, a model to serve and a runtime the profile runs
are not checked here: the core's bundle verifier checks them with the
signatures (ProfileMismatchError, AgentTooOldError, NothingToServeError,
RuntimeNotOnProfileError) in VERIFYING, as `bundle build` and `bundle verify`
do. What is left is what only the device can tell, each a pure function of the
manifest's figures and the `Host` answers, so tests can fill a disk or remove
a runtime without touching the machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgefleet.agent.errors import CompatibilityError
from edgefleet.agent.install.interfaces import Host
from edgefleet.bundle import Manifest, check_profile_runs, served_model
from edgefleet.bundlefiles import SERVED_ONNX, SERVED_RUNTIMES, SERVED_TFLITE
from edgefleet.extras import install_hint

# The runtime a served file needs: the profile's name for it and the modules that provide it.
RUNTIMES: dict[str, tuple[str, tuple[str, ...]]] = {
    SERVED_ONNX: (SERVED_RUNTIMES[SERVED_ONNX], ("onnxruntime",)),
    SERVED_TFLITE: (SERVED_RUNTIMES[SERVED_TFLITE], ("ai_edge_litert", "tflite_runtime")),
}
# A loaded model takes about its file size in weights plus as much again in
# arenas and runtime buffers; the check asks for that much available memory.
MEMORY_FACTOR = 2
_MIB = 1024**2


@dataclass(frozen=True)
class BundleNeeds:
    """What the compatibility check needs to know of a verified bundle."""

    served_model: str
    served_bytes: int
    files_bytes: int

    @classmethod
    def of(cls, manifest: Manifest) -> BundleNeeds:
        """Raises: NothingToServeError when the bundle serves no model this agent knows."""
        served = served_model(manifest)
        return cls(served, manifest.files_by_path()[served].length, manifest.total_length)


def check_runtime(served_model: str, profile_name: str, host: Host) -> str:
    """The runtime module that will serve `served_model`.

    The profile's check is the core's (`check_profile_runs`), the one `bundle build` and
    `bundle verify` run, and the verifier already ran it in VERIFYING.

    Raises:
        RuntimeNotOnProfileError: the profile does not list its runtime (a refusal).
        CompatibilityError: none of the runtime's modules is installed.
    """
    runtime, modules = RUNTIMES[served_model]
    check_profile_runs(served_model, profile_name)
    for module in modules:
        if host.has_module(module):
            return module
    extra = "tflite" if runtime == "tflite" else "agent"
    raise CompatibilityError(
        f"{served_model} needs {runtime} ({' or '.join(modules)}), which is not installed: "
        + install_hint(extra)
    )


def check_disk(needed_bytes: int, reserve_bytes: int, where: Path, host: Host) -> None:
    """Raises: CompatibilityError when `where` has less than needed + reserve free."""
    free = host.free_bytes(where)
    if free < needed_bytes + reserve_bytes:
        raise CompatibilityError(
            f"not enough disk: {needed_bytes / _MIB:.1f} MiB needed plus the "
            f"{reserve_bytes / _MIB:.1f} MiB reserve, {free / _MIB:.1f} MiB free in {where}"
        )


def check_memory(served_bytes: int, host: Host) -> None:
    """Raises: CompatibilityError when less memory is available than the model needs."""
    available = host.available_memory()
    needed = MEMORY_FACTOR * served_bytes
    if available is not None and available < needed:
        raise CompatibilityError(
            f"not enough memory: the model needs about {needed / _MIB:.1f} MiB, "
            f"{available / _MIB:.1f} MiB available"
        )


def check_compatibility(
    needs: BundleNeeds,
    *,
    profile_name: str,
    host: Host,
    versions_dir: Path,
    reserve_bytes: int,
    already_staged: bool,
) -> str:
    """Every check of CHECKING, in order; returns the runtime module that will serve.

    Raises: CompatibilityError naming the first check that failed.
    """
    module = check_runtime(needs.served_model, profile_name, host)
    check_disk(0 if already_staged else needs.files_bytes, reserve_bytes, versions_dir, host)
    check_memory(needs.served_bytes, host)
    return module
