"""Alembic's entry point: run the migrations on the connection `upgrade_database` passes.

Called only through `edgefleet.server.db.migrate` (no alembic.ini, no logging
set-up, no engine built here): the caller owns the connection, its transaction
and the PostgreSQL advisory lock around it.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from edgefleet.server.db.models import Base

connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError("run migrations through edgefleet.server.db.migrate.upgrade_database")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most things: later migrations use batch mode there.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
