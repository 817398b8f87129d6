"""The field view: heartbeat history, presence changes, diagnostics on request, web sessions,
and an index of a device's telemetry buckets by time.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05

Hand-written, like 0001: names follow models.NAMING_CONVENTION, spelled out.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _timestamp(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _device_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["device_id"], ["devices.id"], name=f"fk_{table}_device_id_devices", ondelete="CASCADE"
    )


def upgrade() -> None:
    op.create_index(
        "ix_telemetry_buckets_device_id_bucket_start",
        "telemetry_buckets",
        ["device_id", "bucket_start"],
    )
    op.create_table(
        "heartbeat_samples",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(128), nullable=False),
        _timestamp("slot_start"),
        sa.Column("resolution_s", sa.Integer(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("cpu_sum", sa.Float(), nullable=False),
        sa.Column("cpu_max", sa.Float(), nullable=False),
        sa.Column("memory_used_sum", sa.Float(), nullable=False),
        sa.Column("memory_total", sa.BigInteger(), nullable=False),
        sa.Column("disk_free_min", sa.BigInteger(), nullable=False),
        sa.Column("disk_total", sa.BigInteger(), nullable=False),
        sa.Column("temperature_samples", sa.Integer(), nullable=False),
        sa.Column("temperature_sum", sa.Float(), nullable=False),
        sa.Column("temperature_max", sa.Float(), nullable=True),
        _device_fk("heartbeat_samples"),
        sa.PrimaryKeyConstraint("id", name="pk_heartbeat_samples"),
        sa.UniqueConstraint(
            "device_id", "resolution_s", "slot_start", name="uq_heartbeat_samples_key"
        ),
    )
    op.create_index("ix_heartbeat_samples_slot_start", "heartbeat_samples", ["slot_start"])
    op.create_table(
        "presence_changes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(128), nullable=False),
        _timestamp("at"),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        _device_fk("presence_changes"),
        sa.PrimaryKeyConstraint("id", name="pk_presence_changes"),
    )
    op.create_index("ix_presence_changes_device_id_at", "presence_changes", ["device_id", "at"])
    op.create_table(
        "diagnostics_requests",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("requested_by", sa.String(128), nullable=False),
        _timestamp("requested_at"),
        _timestamp("expires_at"),
        sa.Column("directive_sequence", sa.BigInteger(), nullable=True),
        _timestamp("answered_at", nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        _device_fk("diagnostics_requests"),
        sa.PrimaryKeyConstraint("id", name="pk_diagnostics_requests"),
    )
    op.create_index("ix_diagnostics_requests_device_id", "diagnostics_requests", ["device_id"])
    op.create_table(
        "web_sessions",
        sa.Column("id_hash", sa.String(64), nullable=False),
        sa.Column("token_id", sa.Integer(), nullable=False),
        sa.Column("csrf_token", sa.String(64), nullable=False),
        _timestamp("created_at"),
        _timestamp("expires_at"),
        sa.ForeignKeyConstraint(
            ["token_id"],
            ["api_tokens.id"],
            name="fk_web_sessions_token_id_api_tokens",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id_hash", name="pk_web_sessions"),
    )
    op.create_index("ix_web_sessions_expires_at", "web_sessions", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_web_sessions_expires_at", table_name="web_sessions")
    op.drop_table("web_sessions")
    op.drop_index("ix_diagnostics_requests_device_id", table_name="diagnostics_requests")
    op.drop_table("diagnostics_requests")
    op.drop_index("ix_presence_changes_device_id_at", table_name="presence_changes")
    op.drop_table("presence_changes")
    op.drop_index("ix_heartbeat_samples_slot_start", table_name="heartbeat_samples")
    op.drop_table("heartbeat_samples")
    op.drop_index("ix_telemetry_buckets_device_id_bucket_start", table_name="telemetry_buckets")
