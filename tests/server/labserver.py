"""The fleet server's own runner with lab timings, as a child process for end-to-end tests.

`edgefleet server run` judges drift over 5-minute telemetry buckets and
15-minute windows: right for a fleet, hours for a test. This runs the same
`run_server` with the same storage, broker link, workers and API, and only
the durations shortened (2-second buckets, 4-second windows, a tick a second).

    python -m tests.server.labserver SETTINGS.json
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from edgefleet.server.runner import run_server
from edgefleet.server.settings import ServerSettings

LAB_TIMINGS: dict[str, Any] = {
    "telemetry_bucket": dt.timedelta(seconds=2),
    "telemetry_flush_s": 0.5,
    "drift_interval_s": 1.0,
    "drift_window": dt.timedelta(seconds=4),
    "drift_window_max": dt.timedelta(seconds=20),
    "drift_persistence": 2,
    "driver_interval_s": 0.5,
    "webhook_interval_s": 0.5,
}


def write_settings(path: Path, **values: Any) -> Path:
    """SETTINGS.json for `main`: paths and strings only (the secret comes from the environment)."""
    path.write_text(json.dumps({key: str(value) for key, value in values.items()}))
    return path


def main(argv: list[str]) -> None:
    values: dict[str, Any] = json.loads(Path(argv[0]).read_text())
    for key in ("data_dir", "trust_path", "server_key_path"):
        values[key] = Path(values[key])
    values["port"] = int(values["port"])
    values["open_enrollment"] = True
    secret = os.environ.get("LAB_WEBHOOK_SECRET")
    if secret:
        values["webhook_secret"] = secret.encode()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run_server(ServerSettings(**values, **LAB_TIMINGS))


if __name__ == "__main__":
    main(sys.argv[1:])
