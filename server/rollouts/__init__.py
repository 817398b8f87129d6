"""Part of the fleet server."""
