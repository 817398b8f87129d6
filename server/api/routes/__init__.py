"""One router per resource; `edgefleet.server.api.app` includes them all.

Each router carries its full path prefix (`edgefleet.wire.API_PREFIX` +
resource), so the route a request matched names its whole path template (the
metrics' label).
"""
