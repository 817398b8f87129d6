"""The on-device agent (imported as edgefleet.agent). Built by the agent issue."""
