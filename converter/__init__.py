"""The model converter (imported as edgefleet.converter). Built by the converter issue."""
