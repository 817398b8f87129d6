"""Drift checks, the rest of the loop: the converter's report kept with each bundle
(its reference accuracy), cohorts of alerts, regression errors from labelled
feedback, webhook deliveries, raw-input samples uploaded by devices.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05

Hand-written, like 0001: names follow models.NAMING_CONVENTION, spelled out.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _timestamp(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    with op.batch_alter_table("bundles") as batch:
        batch.add_column(sa.Column("report", sa.JSON(), nullable=True))
    with op.batch_alter_table("alerts") as batch:
        batch.add_column(sa.Column("cohort", sa.String(256), nullable=True))
    # A cohort is named now ("version", "tag:K=V", ...): the one cohort so far, stored with
    # subject "" and no cohort, is the version's.
    with op.batch_alter_table("drift_states") as batch:
        batch.alter_column("subject", existing_type=sa.String(128), type_=sa.String(256))
    op.execute("UPDATE drift_states SET subject = 'version' WHERE scope = 'cohort'")
    op.execute("UPDATE alerts SET cohort = 'version' WHERE scope = 'cohort'")
    with op.batch_alter_table("telemetry_buckets") as batch:
        for name in ("labelled_abs_error", "labelled_squared_error"):
            batch.add_column(
                sa.Column(name, sa.Float(), nullable=False, server_default=sa.text("0"))
            )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("alert_id", sa.Integer(), nullable=True),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        _timestamp("created_at"),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _timestamp("next_attempt_at"),
        _timestamp("delivered_at", nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["alert_id"],
            ["alerts.id"],
            name="fk_webhook_deliveries_alert_id_alerts",
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_deliveries"),
    )
    op.create_index("ix_webhook_deliveries_delivered_at", "webhook_deliveries", ["delivered_at"])
    op.create_table(
        "input_samples",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("bundle_name", sa.String(128), nullable=False),
        sa.Column("bundle_version", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        _timestamp("captured_at"),
        _timestamp("received_at"),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name="fk_input_samples_device_id_devices",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_input_samples"),
    )
    op.create_index("ix_input_samples_device_id", "input_samples", ["device_id"])


def downgrade() -> None:
    op.drop_index("ix_input_samples_device_id", table_name="input_samples")
    op.drop_table("input_samples")
    op.drop_index("ix_webhook_deliveries_delivered_at", table_name="webhook_deliveries")
    op.drop_table("webhook_deliveries")
    with op.batch_alter_table("telemetry_buckets") as batch:
        batch.drop_column("labelled_squared_error")
        batch.drop_column("labelled_abs_error")
    op.execute("DELETE FROM alerts WHERE scope = 'cohort' AND cohort <> 'version'")
    op.execute("DELETE FROM drift_states WHERE scope = 'cohort' AND subject <> 'version'")
    op.execute("UPDATE drift_states SET subject = '' WHERE scope = 'cohort'")
    with op.batch_alter_table("drift_states") as batch:
        batch.alter_column("subject", existing_type=sa.String(256), type_=sa.String(128))
    with op.batch_alter_table("alerts") as batch:
        batch.drop_column("cohort")
    with op.batch_alter_table("bundles") as batch:
        batch.drop_column("report")
