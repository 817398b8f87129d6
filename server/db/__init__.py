"""Storage of the fleet server: tables, the database handle, migrations."""

from edgefleet.server.db.database import Database, create_db_engine

__all__ = ["Database", "create_db_engine"]
