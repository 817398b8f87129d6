"""The initial schema: tokens, bundles, devices, telemetry, rollouts, leases, audit.

Revision ID: 0001
Revises:
Create Date: 2026-11-25

Hand-written: a migration never imports edgefleet.server.db.models (the models
move on; a migration must keep describing its own step). Names of keys,
indexes and constraints follow models.NAMING_CONVENTION, spelled out. Every
timestamp column is DateTime(timezone=True): the models' UtcDateTime stores as
that type. tests/server/test_storage.py checks that this schema equals the models.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _timestamp(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _device_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["device_id"], ["devices.id"], name=f"fk_{table}_device_id_devices", ondelete="CASCADE"
    )


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        _timestamp("created_at"),
        _timestamp("revoked_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
    )
    op.create_table(
        "enroll_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        _timestamp("created_at"),
        _timestamp("expires_at"),
        sa.Column("tags", sa.JSON(), nullable=False),
        _timestamp("used_at", nullable=True),
        sa.Column("used_by", sa.String(128), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_enroll_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_enroll_tokens_token_hash"),
    )
    op.create_table(
        "bundles",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("length", sa.BigInteger(), nullable=False),
        sa.Column("release_counter", sa.BigInteger(), nullable=False),
        sa.Column("profiles", sa.JSON(), nullable=False),
        sa.Column("min_agent_version", sa.String(64), nullable=True),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("pushed_by", sa.String(128), nullable=False),
        _timestamp("pushed_at"),
        sa.PrimaryKeyConstraint("id", name="pk_bundles"),
        sa.UniqueConstraint("name", "version", name="uq_bundles_name_version"),
    )
    op.create_index("ix_bundles_sha256", "bundles", ["sha256"])
    op.create_table(
        "devices",
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("public_key", sa.String(64), nullable=False),
        _timestamp("enrolled_at"),
        sa.Column("profile", sa.String(64), nullable=False),
        sa.Column("arch", sa.String(32), nullable=False),
        sa.Column("runtimes", sa.JSON(), nullable=False),
        sa.Column("agent_version", sa.String(64), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("online", sa.Boolean(), nullable=False),
        _timestamp("last_seen", nullable=True),
        sa.Column("model_name", sa.String(128), nullable=True),
        sa.Column("model_version", sa.String(64), nullable=True),
        sa.Column("previous_version", sa.String(64), nullable=True),
        sa.Column("install_state", sa.String(32), nullable=True),
        sa.Column("health", sa.String(16), nullable=False),
        sa.Column("heartbeat", sa.JSON(), nullable=True),
        sa.Column("status_sequence", sa.BigInteger(), nullable=False),
        sa.Column("directive_sequence", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_devices"),
    )
    op.create_index("ix_devices_profile", "devices", ["profile"])
    op.create_table(
        "status_reports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        _timestamp("received_at"),
        _timestamp("sent_at"),
        sa.Column("install_state", sa.String(32), nullable=False),
        sa.Column("bundle_name", sa.String(128), nullable=True),
        sa.Column("bundle_version", sa.String(64), nullable=True),
        sa.Column("directive_sequence", sa.BigInteger(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        _device_fk("status_reports"),
        sa.PrimaryKeyConstraint("id", name="pk_status_reports"),
    )
    op.create_index(
        "ix_status_reports_device_sequence", "status_reports", ["device_id", "sequence"]
    )
    op.create_table(
        "telemetry_buckets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("bundle_name", sa.String(128), nullable=False),
        sa.Column("bundle_version", sa.String(64), nullable=False),
        _timestamp("bucket_start"),
        sa.Column("windows", sa.Integer(), nullable=False),
        *(
            sa.Column(name, sa.BigInteger(), nullable=False)
            for name in (
                "requests",
                "errors",
                "fallbacks",
                "schema_violations",
                "dropped_windows",
                "shadow_requests",
                "shadow_agreements",
                "labelled_count",
                "labelled_correct",
            )
        ),
        sa.Column("latency", sa.JSON(), nullable=False),
        sa.Column("bins", sa.JSON(), nullable=False),
        _device_fk("telemetry_buckets"),
        sa.PrimaryKeyConstraint("id", name="pk_telemetry_buckets"),
        sa.UniqueConstraint(
            "device_id",
            "bundle_name",
            "bundle_version",
            "bucket_start",
            name="uq_telemetry_buckets_key",
        ),
    )
    op.create_index("ix_telemetry_buckets_bucket_start", "telemetry_buckets", ["bucket_start"])
    op.create_table(
        "rollouts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("bundle_id", sa.Integer(), nullable=False),
        sa.Column("selector", sa.JSON(), nullable=False),
        sa.Column("plan", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("stage_index", sa.Integer(), nullable=False),
        _timestamp("stage_started_at", nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_by", sa.String(128), nullable=False),
        _timestamp("created_at"),
        _timestamp("updated_at"),
        sa.ForeignKeyConstraint(
            ["bundle_id"], ["bundles.id"], name="fk_rollouts_bundle_id_bundles"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_rollouts"),
    )
    op.create_index("ix_rollouts_state", "rollouts", ["state"])
    op.create_table(
        "rollout_transitions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        _timestamp("at"),
        sa.Column("from_state", sa.String(16), nullable=False),
        sa.Column("to_state", sa.String(16), nullable=False),
        sa.Column("stage_index", sa.Integer(), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollouts.id"],
            name="fk_rollout_transitions_rollout_id_rollouts",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_rollout_transitions"),
    )
    op.create_index("ix_rollout_transitions_rollout_id", "rollout_transitions", ["rollout_id"])
    op.create_table(
        "rollout_devices",
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("stage_index", sa.Integer(), nullable=False),
        sa.Column("shadow", sa.Boolean(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("directive_sequence", sa.BigInteger(), nullable=True),
        _timestamp("notified_at", nullable=True),
        _timestamp("updated_at"),
        sa.Column("previous_version", sa.String(64), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        _device_fk("rollout_devices"),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollouts.id"],
            name="fk_rollout_devices_rollout_id_rollouts",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("rollout_id", "device_id", name="pk_rollout_devices"),
    )
    op.create_index("ix_rollout_devices_device_id", "rollout_devices", ["device_id"])
    op.create_index("ix_rollout_devices_rollout_state", "rollout_devices", ["rollout_id", "state"])
    op.create_table(
        "leases",
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("owner", sa.String(128), nullable=False),
        _timestamp("expires_at"),
        sa.PrimaryKeyConstraint("name", name="pk_leases"),
    )
    op.create_table(
        "counters",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_counters"),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), nullable=False),
        _timestamp("at"),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(256), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at"])


def downgrade() -> None:
    for table in (
        "audit_log",
        "counters",
        "leases",
        "rollout_devices",
        "rollout_transitions",
        "rollouts",
        "telemetry_buckets",
        "status_reports",
        "devices",
        "bundles",
        "enroll_tokens",
        "api_tokens",
    ):
        op.drop_table(table)  # drops its indexes too
