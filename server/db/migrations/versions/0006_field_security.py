"""Field security: enrollment claims with a use count, the trust roots the server was handed,
the client certificates the fleet CA issued to devices, and a frozen-out device's status.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06

Hand-written, like 0001: names follow models.NAMING_CONVENTION, spelled out.
A token used before this revision counts as one use of one.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def _timestamp(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    with op.batch_alter_table("enroll_tokens") as batch:
        batch.add_column(sa.Column("max_uses", sa.Integer(), server_default="1", nullable=False))
        batch.add_column(sa.Column("uses", sa.Integer(), server_default="0", nullable=False))
    op.execute("UPDATE enroll_tokens SET uses = 1 WHERE used_at IS NOT NULL")
    with op.batch_alter_table("status_reports") as batch:
        batch.add_column(sa.Column("frozen_reason", sa.Text(), nullable=True))
    op.create_table(
        "trust_roots",
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("document", sa.Text(), nullable=False),
        _timestamp("pushed_at"),
        sa.Column("pushed_by", sa.String(128), nullable=False),
        sa.PrimaryKeyConstraint("version", name="pk_trust_roots"),
    )
    op.create_table(
        "device_certificates",
        sa.Column("serial", sa.String(40), nullable=False),
        sa.Column("device_id", sa.String(128), nullable=False),
        _timestamp("issued_at"),
        _timestamp("not_after"),
        _timestamp("revoked_at", nullable=True),
        sa.PrimaryKeyConstraint("serial", name="pk_device_certificates"),
    )
    op.create_index("ix_device_certificates_device_id", "device_certificates", ["device_id"])


def downgrade() -> None:
    op.drop_index("ix_device_certificates_device_id", table_name="device_certificates")
    op.drop_table("device_certificates")
    op.drop_table("trust_roots")
    with op.batch_alter_table("status_reports") as batch:
        batch.drop_column("frozen_reason")
    with op.batch_alter_table("enroll_tokens") as batch:
        batch.drop_column("uses")
        batch.drop_column("max_uses")
