"""Dead letters: one device's messages the database refused to store, kept as they arrived.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07

Hand-written, like 0001: names follow models.NAMING_CONVENTION, spelled out.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("dropped", sa.JSON(), nullable=False),
        sa.Column("messages", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name="fk_dead_letters_device_id_devices",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_dead_letters"),
    )
    op.create_index("ix_dead_letters_device_id", "dead_letters", ["device_id"])


def downgrade() -> None:
    op.drop_index("ix_dead_letters_device_id", table_name="dead_letters")
    op.drop_table("dead_letters")
