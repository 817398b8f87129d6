"""One router per resource; `edgefleet.server.api.app` includes them all.

Each router carries its full path prefix (`API_PREFIX` + resource), so the
route a request matched names its whole path template (the metrics' label).
"""

API_PREFIX = "/api/v1"
