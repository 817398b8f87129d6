"""The fleet server (imported as edgefleet.server). Built by the server issue."""
