"""Bundles: a model and everything it needs, in one file signed by a release key.

Building (tarfile and friends) is imported on first use: devices only verify.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgefleet.bundle.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    check_bundle_name,
    check_version_text,
)
from edgefleet.bundle.verify import (
    BundleLimits,
    BundlePolicy,
    VerifiedBundle,
    check_profile_runs,
    check_served_model,
    extract_bundle,
    read_manifest,
    served_model,
    verify_bundle,
    verify_manifest,
)

if TYPE_CHECKING:
    from edgefleet.bundle.build import (
        METADATA_NAME,
        BundleMetadata,
        build_bundle,
        check_bundle_options,
        parse_security_floor,
    )

_BUILD = {
    "METADATA_NAME",
    "BundleMetadata",
    "build_bundle",
    "check_bundle_options",
    "parse_security_floor",
}

__all__ = [
    "MANIFEST_NAME",
    "METADATA_NAME",
    "BundleLimits",
    "BundleMetadata",
    "BundlePolicy",
    "FileEntry",
    "Manifest",
    "VerifiedBundle",
    "build_bundle",
    "check_bundle_name",
    "check_bundle_options",
    "check_profile_runs",
    "check_served_model",
    "check_version_text",
    "extract_bundle",
    "parse_security_floor",
    "read_manifest",
    "served_model",
    "verify_bundle",
    "verify_manifest",
]


def __getattr__(name: str) -> Any:
    if name in _BUILD:
        from edgefleet.bundle import build

        return getattr(build, name)
    raise AttributeError(f"module 'edgefleet.bundle' has no attribute {name!r}")
