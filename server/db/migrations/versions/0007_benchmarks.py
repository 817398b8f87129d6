"""Benchmarks: candidates measured on devices of the target profile, and each device's results.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06

Hand-written, like 0001: names follow models.NAMING_CONVENTION, spelled out.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def _timestamp(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "benchmarks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("requested_by", sa.String(128), nullable=False),
        _timestamp("requested_at"),
        _timestamp("expires_at"),
        sa.Column("profile", sa.String(64), nullable=False),
        sa.Column("selector", sa.String(256), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("length", sa.BigInteger(), nullable=False),
        sa.Column("candidates", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_benchmarks"),
    )
    op.create_table(
        "benchmark_results",
        sa.Column("benchmark_id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("directive_sequence", sa.BigInteger(), nullable=True),
        _timestamp("answered_at", nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["benchmark_id"],
            ["benchmarks.id"],
            name="fk_benchmark_results_benchmark_id_benchmarks",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name="fk_benchmark_results_device_id_devices",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("benchmark_id", "device_id", name="pk_benchmark_results"),
    )


def downgrade() -> None:
    op.drop_table("benchmark_results")
    op.drop_table("benchmarks")
