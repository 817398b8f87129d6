"""The one-time enrollment token, kept only until the device has enrolled.

`edgefleet agent init --enroll-token T` writes it to `STATE_DIR/enroll-token`
(mode 0600, owned as the state directory is, so the agent's service user can
read and delete it); enrollment (`edgefleet.agent.enroll`) reads it and deletes
it once the server accepted the device. It is never in agent.toml: a token
there would outlive its use in a file the agent cannot change.
"""

from __future__ import annotations

import os

from edgefleet.agent.layout import StateLayout
from edgefleet.fileio import atomic_writer, fsync_directory


def write_enroll_token(layout: StateLayout, token: str) -> None:
    """Keep `token` for the first enrollment, replacing any token kept before.

    Raises:
        OSError: the state directory could not be created or written, or the file not
            given to the state directory's owner (only root can give it away).
    """
    layout.root.mkdir(parents=True, exist_ok=True)
    owner = layout.root.stat()
    with atomic_writer(layout.enroll_token_file, mode=0o600) as handle:
        if (owner.st_uid, owner.st_gid) != (os.geteuid(), os.getegid()):
            os.fchown(handle.fileno(), owner.st_uid, owner.st_gid)
        handle.write(token.encode("utf-8") + b"\n")


def read_enroll_token(layout: StateLayout) -> str | None:
    """The kept token, or None when there is none (enrolled already, or none was given).

    Raises:
        OSError: the file exists but cannot be read.
    """
    try:
        token = layout.enroll_token_file.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return token or None


def forget_enroll_token(layout: StateLayout) -> None:
    """Delete the kept token (after a successful enrollment), durably."""
    path = layout.enroll_token_file
    if path.exists():
        path.unlink(missing_ok=True)
        fsync_directory(path.parent)
