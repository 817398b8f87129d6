"""The heartbeat charts drawn on the server: every sample is seen, and said in words."""

from __future__ import annotations

import datetime as dt

from edgefleet.server.web.charts import RIGHT, WIDTH, Series, line_chart

AT = dt.datetime(2026, 12, 5, 12, 0, tzinfo=dt.timezone.utc)


def test_a_single_sample_is_drawn_as_a_dot_and_counted_in_the_singular() -> None:
    chart = str(line_chart(Series("CPU (average)", "%", [AT], [42.0], ceiling=100.0)))
    assert "<circle" in chart  # a polyline of one point draws nothing
    assert "latest 42 %, highest 42 %, 1 sample from 2026-12-05 12:00" in chart


def test_the_latest_sample_is_the_dot_at_the_right_end() -> None:
    times = [AT, AT + dt.timedelta(minutes=1), AT + dt.timedelta(minutes=2)]
    chart = str(line_chart(Series("Disk free", "GiB", times, [10.0, None, 5.0])))
    assert f'<circle class="dot" cx="{WIDTH - RIGHT:.1f}"' in chart  # the right end
    assert "latest 5 GiB, highest 10 GiB, 2 samples from" in chart


def test_a_series_without_samples_is_a_sentence() -> None:
    chart = str(line_chart(Series("Temperature (highest)", "°C", [AT], [None])))
    assert chart == "<p>Temperature (highest): no samples in this period.</p>"
