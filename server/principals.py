"""Who is calling: a role-bearing principal, resolved from an API token.

Roles are ordered: admin can do everything an operator can, an operator
everything a viewer can. Devices hold no API token at all (they enroll with a
one-time enrollment token and then speak MQTT), so no device can reach an
operator endpoint.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Role(str, enum.Enum):
    VIEWER = "viewer"  # field engineers: read devices, bundles, rollouts
    OPERATOR = "operator"  # push bundles, start/pause/resume/abort rollouts, enroll tokens
    ADMIN = "admin"  # API tokens, the audit log

    @property
    def rank(self) -> int:
        return _RANKS[self]

    def allows(self, required: Role) -> bool:
        return self.rank >= required.rank


_RANKS = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}


@dataclass(frozen=True)
class Principal:
    """A caller: the token's name (what the audit log shows) and its role."""

    name: str
    role: Role


# The rollout driver and other server-internal actors in transitions and the audit log.
SYSTEM = Principal("server", Role.ADMIN)
