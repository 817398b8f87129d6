"""`edgefleet keys`: the root, release and server keys and the trust root they form."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import click

from edgefleet.cli.options import (
    echo_json,
    echo_table,
    json_option,
    load_signing_keys,
    passphrase_env_option,
    passphrase_from_env,
)
from edgefleet.errors import UsageError
from edgefleet.fileio import atomic_write_bytes
from edgefleet.keys import (
    PublicKey,
    SigningKey,
    load_public_key,
    save_private_key,
    save_public_key,
)
from edgefleet.timefmt import utcnow
from edgefleet.trust import (
    ROLE_NAMES,
    TrustRoot,
    build_trust_root_signed,
    load_trust_root,
    public_keys,
    rotate_trust_root,
    sign_trust_root,
)

TRUST_FILE = "trust.json"

expires_option = click.option(
    "--expires-in",
    type=click.IntRange(min=1),
    default=365,
    show_default=True,
    metavar="DAYS",
    help="Days until the trust root expires; devices refuse everything after that.",
)


@click.group()
def keys() -> None:
    """Create keys and the trust root, rotate them, show them.

    \b
    root.key     offline; signs trust roots (who may sign what)
    release.key  offline, with whoever releases models; signs bundles
    server.key   online, on the fleet server; signs directives
    trust.json   the trust root: public keys and roles, flashed onto devices
    """


def _write_key_pair(directory: Path, name: str, key: SigningKey, passphrase: bytes | None) -> None:
    save_private_key(directory / f"{name}.key", key, passphrase)
    save_public_key(directory / f"{name}.pub", key.public)


@keys.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@expires_option
@passphrase_env_option
def init_command(directory: Path, expires_in: int, passphrase_env: str | None) -> None:
    """Create root, release and server key pairs and trust root version 1 in DIRECTORY.

    Private keys are written with mode 0600, encrypted with the passphrase in
    the environment variable named by --passphrase-env. Existing files are
    never overwritten.
    """
    passphrase = passphrase_from_env(passphrase_env)
    targets = [f"{role}.{ext}" for role in ROLE_NAMES for ext in ("key", "pub")] + [TRUST_FILE]
    existing = [name for name in targets if (directory / name).exists()]
    if existing:
        raise UsageError(
            f"{directory} already holds {', '.join(existing)}: refusing to overwrite keys; "
            "choose an empty directory"
        )
    directory.mkdir(parents=True, exist_ok=True)
    generated = {role: SigningKey.generate() for role in ROLE_NAMES}
    signed = build_trust_root_signed(
        version=1,
        expires=utcnow() + dt.timedelta(days=expires_in),
        root=[generated["root"].public],
        release=[generated["release"].public],
        server=[generated["server"].public],
    )
    root = sign_trust_root(signed, [generated["root"]])
    try:
        for role, key in generated.items():
            _write_key_pair(directory, role, key, passphrase)
        atomic_write_bytes(directory / TRUST_FILE, root.raw)
    except BaseException:
        for name in targets:
            (directory / name).unlink(missing_ok=True)
        raise
    _echo_trust_root(root, directory / TRUST_FILE)
    click.echo(
        f"\nKeep {directory / 'root.key'} and {directory / 'release.key'} offline. "
        f"Flash {directory / TRUST_FILE} onto devices; put server.key on the fleet server."
    )


@keys.command("generate")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Private key file to write; the public key goes beside it as .pub.",
)
@passphrase_env_option
def generate_command(output: Path, passphrase_env: str | None) -> None:
    """Create one new key pair (to add with `keys rotate`)."""
    public_path = output.with_suffix(".pub")
    for path in (output, public_path):
        if path.exists():
            raise UsageError(f"{path} exists: refusing to overwrite a key")
    key = SigningKey.generate()
    save_private_key(output, key, passphrase_from_env(passphrase_env))
    save_public_key(public_path, key.public)
    click.echo(f"key {key.keyid}\n  private {output}\n  public  {public_path}")


def _resolve_key(reference: str, candidates: Sequence[PublicKey]) -> PublicKey:
    """A key named by a key file or by (a prefix of at least 8 digits of) its key id."""
    if Path(reference).is_file():
        return load_public_key(Path(reference))
    matches = [key for key in candidates if key.keyid.startswith(reference.lower())]
    if len(reference) < 8 or len(matches) != 1:
        raise UsageError(f"{reference!r} names no single key of this role (key file or key id)")
    return matches[0]


def _new_members(
    current: Sequence[PublicKey], add: Sequence[PublicKey], remove: Sequence[str]
) -> list[PublicKey]:
    removed = {_resolve_key(reference, current).keyid for reference in remove}
    kept = [key for key in current if key.keyid not in removed]
    return list({key.keyid: key for key in [*kept, *add]}.values())


@keys.command("rotate")
@click.option(
    "--trust",
    "trust_path",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    required=True,
    help="The current trust root (version N).",
)
@click.option(
    "--root-key",
    "root_key_paths",
    multiple=True,
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="A private root key of version N (repeat for a threshold).",
)
@click.option(
    "--add-root",
    multiple=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Private key file of a new root key; it signs version N+1 too.",
)
@click.option("--remove-root", multiple=True, metavar="KEY", help="Key file or key id to drop.")
@click.option(
    "--add-release",
    multiple=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Public (or private) key file of a new release key.",
)
@click.option("--remove-release", multiple=True, metavar="KEY", help="Key file or key id to drop.")
@click.option(
    "--add-server",
    multiple=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Public (or private) key file of a new server key.",
)
@click.option("--remove-server", multiple=True, metavar="KEY", help="Key file or key id to drop.")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write version N+1 [default: replace --trust, keeping version N "
    "beside it as trust.vN.json].",
)
@expires_option
@passphrase_env_option
def rotate_command(
    trust_path: Path,
    root_key_paths: tuple[Path, ...],
    add_root: tuple[Path, ...],
    remove_root: tuple[str, ...],
    add_release: tuple[Path, ...],
    remove_release: tuple[str, ...],
    add_server: tuple[Path, ...],
    remove_server: tuple[str, ...],
    output: Path | None,
    expires_in: int,
    passphrase_env: str | None,
) -> None:
    """Write trust root version N+1: add or remove keys, renew the expiry.

    Version N+1 is signed by the root keys of version N and of version N+1, so
    that a device holding version N accepts it and nobody else can make one.
    With no key changes it only renews the expiry.
    """
    current = load_trust_root(trust_path)
    old_signers = load_signing_keys(root_key_paths, passphrase_env)
    new_root_signers = load_signing_keys(add_root, passphrase_env)
    root = _new_members(
        public_keys(current, "root"), [key.public for key in new_root_signers], remove_root
    )
    release = _new_members(
        public_keys(current, "release"), [load_public_key(p) for p in add_release], remove_release
    )
    server = _new_members(
        public_keys(current, "server"), [load_public_key(p) for p in add_server], remove_server
    )
    new = rotate_trust_root(
        current,
        signers=[*old_signers, *new_root_signers],
        expires=utcnow() + dt.timedelta(days=expires_in),
        root=root,
        release=release,
        server=server,
    )
    if output is None:
        archived = trust_path.with_name(f"trust.v{current.version}.json")
        if not archived.exists():
            atomic_write_bytes(archived, current.raw)
        output = trust_path
        click.echo(f"version {current.version} kept as {archived}")
    atomic_write_bytes(output, new.raw)
    _echo_trust_root(new, output)


@keys.command("show")
@click.argument(
    "trust_path", metavar="TRUST_JSON", type=click.Path(dir_okay=False, exists=True, path_type=Path)
)
@json_option
def show_command(trust_path: Path, as_json: bool) -> None:
    """Show a trust root's version, expiry, keys and roles (its signatures are checked)."""
    root = load_trust_root(trust_path)
    if as_json:
        echo_json(
            {
                "version": root.version,
                "expires": root.signed.expires,
                "expired": root.is_expired(),
                "roles": {
                    name: {"threshold": role.threshold, "keyids": role.keyids}
                    for name, role in root.signed.roles.items()
                },
            }
        )
        return
    _echo_trust_root(root, trust_path)


def _echo_trust_root(root: TrustRoot, path: Path) -> None:
    state = "EXPIRED" if root.is_expired() else "valid"
    click.echo(
        f"trust root {path}: version {root.version}, expires {root.signed.expires} ({state})"
    )
    rows = []
    for name in ROLE_NAMES:
        role = root.signed.roles[name]  # type: ignore[index]
        for keyid in role.keyids:
            rows.append((name, f"{role.threshold} of {len(role.keyids)}", keyid))
    echo_table(("role", "threshold", "key id"), rows)
