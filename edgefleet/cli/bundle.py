"""`edgefleet bundle`: build, verify and inspect signed bundles."""

from __future__ import annotations

from pathlib import Path

import click

from edgefleet.bundle import (
    BundleLimits,
    BundlePolicy,
    Manifest,
    build_bundle,
    check_served_model,
    parse_security_floor,
    read_manifest,
    verify_bundle,
)
from edgefleet.cli.errors import aborts_on_termination
from edgefleet.cli.options import (
    BUNDLE_NAME_HELP,
    ProgressBar,
    bundle_name_option,
    echo_json,
    echo_table,
    human_bytes,
    json_option,
    load_signing_keys,
    passphrase_env_option,
    semver_option,
)
from edgefleet.profiles import load_profile
from edgefleet.semver import MAX_RELEASE_COUNTER
from edgefleet.signing import Envelope
from edgefleet.trust import load_trust_chain

_DEFAULT_LIMITS = BundleLimits()


@click.group()
def bundle() -> None:
    """Build, verify and inspect signed bundles (one file: a manifest and the model's files)."""


@bundle.command("build")
@click.argument("src_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--name", required=True, callback=bundle_name_option, help=BUNDLE_NAME_HELP)
@click.option(
    "--version",
    "version",
    required=True,
    callback=semver_option,
    help="Semantic version, e.g. 1.4.0.",
)
@click.option(
    "--key",
    "key_paths",
    multiple=True,
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Release private key (repeat for a threshold of release keys).",
)
@click.option(
    "--profile",
    "profiles",
    multiple=True,
    help="Hardware profile the bundle is for (repeatable; `edgefleet targets list`), or host.",
)
@click.option(
    "--release-counter",
    type=click.IntRange(min=0, max=MAX_RELEASE_COUNTER),
    help="Monotonic release counter, 0 to 2**63-1 [default: derived from the version].",
)
@click.option(
    "--min-agent-version",
    callback=semver_option,
    help="Oldest agent that may install the bundle (a semantic version).",
)
@click.option(
    "--security-floor",
    metavar="COUNTER|VERSION",
    help="Once this release commits on a device, refuse releases of this name below it "
    "(a release counter, or a version such as 1.1.0 for its derived counter).",
)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
@passphrase_env_option
@aborts_on_termination
def build_command(
    src_dir: Path,
    name: str,
    version: str,
    key_paths: tuple[Path, ...],
    profiles: tuple[str, ...],
    release_counter: int | None,
    min_agent_version: str | None,
    security_floor: str | None,
    output: Path,
    passphrase_env: str | None,
) -> None:
    """Pack SRC_DIR into a bundle signed with the release key.

    Profiles, release counter, minimum agent version and lineage may also come
    from SRC_DIR/edgefleet-bundle.json (written by `edgefleet convert`); options
    given here take precedence. The output is written atomically.
    """
    signing_keys = load_signing_keys(key_paths, passphrase_env)
    manifest = build_bundle(
        src_dir,
        output,
        name=name,
        version=version,
        keys=signing_keys,
        profiles=profiles,
        release_counter=release_counter,
        min_agent_version=min_agent_version,
        security_floor=None if security_floor is None else parse_security_floor(security_floor),
    )
    floor = "" if manifest.security_floor is None else f", security floor {manifest.security_floor}"
    click.echo(
        f"built {output}: {manifest.name}@{manifest.version}, release counter "
        f"{manifest.release_counter}{floor}, {len(manifest.files)} file(s), "
        f"{human_bytes(manifest.total_length)}, for {', '.join(manifest.profiles)}"
    )


@bundle.command("verify")
@click.argument(
    "bundle_path", metavar="FILE", type=click.Path(dir_okay=False, exists=True, path_type=Path)
)
@click.option(
    "--trust",
    "trust_path",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The trusted trust root (as flashed onto the device).",
)
@click.option(
    "--newer-trust",
    multiple=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Newer trust roots to accept first, one version at a time, in order.",
)
@click.option(
    "--profile",
    help="Refuse the bundle unless it supports this hardware profile (or host: this machine's).",
)
@click.option(
    "--floor",
    type=click.IntRange(min=0, max=MAX_RELEASE_COUNTER),
    help="The device's security floor for the bundle's model name: refuse release counters "
    "below it.",
)
@click.option(
    "--agent-version",
    callback=semver_option,
    help="Refuse the bundle if it needs a newer agent than this (a semantic version).",
)
@click.option(
    "--max-size",
    type=click.IntRange(min=1),
    default=_DEFAULT_LIMITS.max_bundle_bytes,
    show_default=True,
    help="Largest bundle accepted, in bytes.",
)
@click.option(
    "--max-manifest-size",
    type=click.IntRange(min=1),
    default=_DEFAULT_LIMITS.max_manifest_bytes,
    show_default=True,
    help="Largest manifest accepted, in bytes.",
)
@json_option
def verify_command(
    bundle_path: Path,
    trust_path: Path,
    newer_trust: tuple[Path, ...],
    profile: str | None,
    floor: int | None,
    agent_version: str | None,
    max_size: int,
    max_manifest_size: int,
    as_json: bool,
) -> None:
    """Check a bundle exactly as a device does before installing it.

    Exits 0 only when every check passes: the trust root chain and its expiry,
    the release signatures on the manifest, every file's length and SHA-256,
    no unlisted, missing, linked or escaping files, the size limits, a model to
    serve (model.onnx or model.tflite) whose runtime the profile runs (--profile,
    else every profile the bundle lists), and the floor and agent version when
    given. Otherwise exits 1 and prints `refused [reason]: ...`.
    """
    trust = load_trust_chain(trust_path, newer_trust)
    limits = BundleLimits(max_bundle_bytes=max_size, max_manifest_bytes=max_manifest_size)
    # A device keeps a floor per model name; the one given here is for this bundle's name.
    floors = {} if floor is None else {read_manifest(bundle_path, limits)[1].name: floor}
    policy = BundlePolicy(
        profile=None if profile is None else load_profile(profile).name,
        security_floors=floors,
        agent_version=agent_version,
    )
    with ProgressBar(bundle_path.stat().st_size, "verifying") as bar:
        verified = verify_bundle(bundle_path, trust, policy, limits, progress=bar.advance)
    manifest = verified.manifest
    # As the agent of --profile would, else as one of each profile the bundle lists.
    check_served_model(manifest, manifest.profiles if policy.profile is None else [policy.profile])
    if as_json:
        echo_json({"verified": True, "manifest": manifest.to_signed(), "size": verified.size})
        return
    signers = ", ".join(s.keyid[:12] for s in verified.envelope.signatures)
    click.echo(
        f"OK {bundle_path}: {manifest.name}@{manifest.version} (release counter "
        f"{manifest.release_counter}), {len(manifest.files)} file(s) verified, "
        f"signed by release key {signers}, trust root version {trust.version}"
    )


@bundle.command("inspect")
@click.argument(
    "bundle_path", metavar="FILE", type=click.Path(dir_okay=False, exists=True, path_type=Path)
)
@json_option
def inspect_command(bundle_path: Path, as_json: bool) -> None:
    """Show a bundle's manifest. Nothing is verified: use `bundle verify` for that."""
    envelope, manifest = read_manifest(bundle_path)
    if as_json:
        echo_json({"verified": False, **envelope.model_dump()})
        return
    _echo_manifest(manifest, envelope)


def _echo_manifest(manifest: Manifest, envelope: Envelope) -> None:
    click.echo(f"{manifest.name}@{manifest.version}   (NOT verified: run `bundle verify`)")
    details = [
        ("release counter", manifest.release_counter),
        ("created", manifest.created),
        ("profiles", ", ".join(manifest.profiles)),
        ("min agent version", manifest.min_agent_version),
        ("security floor", "-" if manifest.security_floor is None else manifest.security_floor),
        ("signed by", ", ".join(s.keyid[:12] for s in envelope.signatures) or "nobody"),
    ]
    for label, value in details:
        click.echo(f"  {label + ':':<19}{value}")
    for key, value in sorted(manifest.lineage.items()):
        click.echo(f"  lineage {key}: {value}")
    click.echo("")
    echo_table(
        ("path", "size", "sha256"),
        [(e.path, human_bytes(e.length), e.sha256[:16]) for e in manifest.files],
    )
