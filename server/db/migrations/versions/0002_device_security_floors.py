"""Devices report their security floors: one per model name.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

A nullable JSON column: NULL until the device's agent reports its floors in a
heartbeat (agents that predate floors per name never do).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("security_floors", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("security_floors")
