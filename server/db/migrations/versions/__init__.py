"""One module per schema revision; 0001 creates every table of `db.models`."""
