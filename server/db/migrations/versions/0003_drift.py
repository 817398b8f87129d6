"""Drift checks: references stored per bundle, the evaluator's persistence state, alerts.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05

Hand-written, like 0001: names follow models.NAMING_CONVENTION, spelled out.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _timestamp(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "drift_references",
        sa.Column("bundle_id", sa.Integer(), nullable=False),
        sa.Column("reference", sa.JSON(), nullable=False),
        _timestamp("stored_at"),
        sa.ForeignKeyConstraint(
            ["bundle_id"],
            ["bundles.id"],
            name="fk_drift_references_bundle_id_bundles",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("bundle_id", name="pk_drift_references"),
    )
    op.create_table(
        "drift_states",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("subject", sa.String(128), nullable=False),
        sa.Column("bundle_name", sa.String(128), nullable=False),
        sa.Column("bundle_version", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("feature", sa.String(256), nullable=False),
        sa.Column("persistence", sa.JSON(), nullable=False),
        _timestamp("window_end"),
        sa.Column("statistic", sa.Float(), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_drift_states"),
        sa.UniqueConstraint(
            "scope",
            "subject",
            "bundle_name",
            "bundle_version",
            "kind",
            "feature",
            name="uq_drift_states_key",
        ),
    )
    op.create_table(
        "alerts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("device_id", sa.String(128), nullable=True),
        sa.Column("bundle_name", sa.String(128), nullable=False),
        sa.Column("bundle_version", sa.String(64), nullable=False),
        sa.Column("feature", sa.String(256), nullable=True),
        _timestamp("opened_at"),
        _timestamp("resolved_at", nullable=True),
        sa.Column("acknowledged_by", sa.String(128), nullable=True),
        _timestamp("acknowledged_at", nullable=True),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name="fk_alerts_device_id_devices", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_alerts"),
    )
    op.create_index("ix_alerts_device_id", "alerts", ["device_id"])
    op.create_index("ix_alerts_resolved_at", "alerts", ["resolved_at"])


def downgrade() -> None:
    op.drop_index("ix_alerts_resolved_at", table_name="alerts")
    op.drop_index("ix_alerts_device_id", table_name="alerts")
    op.drop_table("alerts")
    op.drop_table("drift_states")
    op.drop_table("drift_references")
