"""Bundles: a model and everything it needs, in one file signed by a release key."""

from edgefleet.bundle.build import METADATA_NAME, BundleMetadata, build_bundle
from edgefleet.bundle.manifest import MANIFEST_NAME, FileEntry, Manifest
from edgefleet.bundle.verify import (
    BundleLimits,
    BundlePolicy,
    VerifiedBundle,
    extract_bundle,
    read_manifest,
    verify_bundle,
)

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
    "extract_bundle",
    "read_manifest",
    "verify_bundle",
]
