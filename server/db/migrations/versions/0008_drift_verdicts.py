"""Drift states keep their last window's verdict: a feature can drift by its values outside the
reference's range while its statistic stays under the threshold.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("drift_states") as batch:
        batch.add_column(sa.Column("drifted", sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("drift_states") as batch:
        batch.drop_column("drifted")
