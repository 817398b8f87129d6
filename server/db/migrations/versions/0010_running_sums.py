"""Telemetry buckets carry running sums of the counters the rollout gates add up, and
`telemetry_latest` names each device's newest bucket per bundle version: a stage's sums
then read two buckets a device, however long the stage has run.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07

Hand-written, like 0001: names follow models.NAMING_CONVENTION, spelled out. The
buckets already stored get their running sums from a window over each device and
version (UPDATE ... FROM: SQLite 3.33 and later, PostgreSQL).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

COUNTERS = (
    "requests",
    "errors",
    "fallbacks",
    "shadow_requests",
    "shadow_agreements",
    "labelled_count",
    "labelled_correct",
)
SUMS = ("labelled_abs_error", "labelled_squared_error")


def upgrade() -> None:
    with op.batch_alter_table("telemetry_buckets") as batch:
        for name in COUNTERS:
            batch.add_column(
                sa.Column(f"running_{name}", sa.BigInteger(), nullable=False, server_default="0")
            )
        for name in SUMS:
            batch.add_column(
                sa.Column(f"running_{name}", sa.Float(), nullable=False, server_default="0")
            )
    op.create_table(
        "telemetry_latest",
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("bundle_name", sa.String(128), nullable=False),
        sa.Column("bundle_version", sa.String(64), nullable=False),
        sa.Column("bucket_start", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name="fk_telemetry_latest_device_id_devices",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "device_id", "bundle_name", "bundle_version", name="pk_telemetry_latest"
        ),
    )
    names = (*COUNTERS, *SUMS)
    window = "PARTITION BY device_id, bundle_name, bundle_version ORDER BY bucket_start"
    sums = ", ".join(f"SUM({name}) OVER ({window}) AS {name}" for name in names)
    sets = ", ".join(f"running_{name} = so_far.{name}" for name in names)
    op.execute(
        f"UPDATE telemetry_buckets SET {sets} FROM "
        f"(SELECT id, {sums} FROM telemetry_buckets) AS so_far "
        "WHERE telemetry_buckets.id = so_far.id"
    )
    op.execute(
        "INSERT INTO telemetry_latest (device_id, bundle_name, bundle_version, bucket_start) "
        "SELECT device_id, bundle_name, bundle_version, MAX(bucket_start) "
        "FROM telemetry_buckets GROUP BY device_id, bundle_name, bundle_version"
    )


def downgrade() -> None:
    op.drop_table("telemetry_latest")
    with op.batch_alter_table("telemetry_buckets") as batch:
        for name in (*COUNTERS, *SUMS):
            batch.drop_column(f"running_{name}")
