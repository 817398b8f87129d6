"""Alembic migrations of the fleet server's database, applied at start (`db.migrate`)."""
