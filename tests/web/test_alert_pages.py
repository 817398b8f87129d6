"""The alerts page: open first, filters, acknowledging (operators, with the CSRF token)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select

from edgefleet.server.db.models import Alert, AuditEntry
from edgefleet.server.drift.alerts import open_alert
from edgefleet.server.principals import Role
from tests.server.apiclient import Api
from tests.web.conftest import sign_in


def add_alert(
    web: Api,
    device_id: str,
    kind: str,
    feature: str | None,
    resolved: bool,
    version: str = "1.0.0",
    evidence: dict[str, object] | None = None,
) -> int:
    now = web.clock()
    with web.context.db.session() as session:
        alert = open_alert(
            session,
            Alert(
                kind=kind,
                scope="device",
                device_id=device_id,
                cohort=None,
                bundle_name="demo",
                bundle_version=version,
                feature=feature,
                opened_at=now - dt.timedelta(hours=2),
                resolved_at=now if resolved else None,
                evidence=evidence
                or {"statistic": 31.5, "threshold": 12.25, "samples": 400, "psi": 0.42},
            ),
        )
        return alert.id


def test_open_alerts_come_first_and_filters_narrow_them(web: Api) -> None:
    for device_id in ("dev-a", "dev-b"):
        assert web.enroll(device_id).status_code == 201
    resolved = add_alert(web, "dev-a", "feature-drift", "pixels[3]", resolved=True)
    drift = add_alert(web, "dev-a", "feature-drift", "pixels[53]", resolved=False)
    accuracy = add_alert(web, "dev-b", "accuracy-drop", None, resolved=False)
    browser, _ = sign_in(web, Role.VIEWER)

    text = browser.get("/alerts").text
    open_part, resolved_part = text.split('id="resolved"')
    assert f'id="alert-{drift}"' in open_part and f'id="alert-{accuracy}"' in open_part
    assert f'id="alert-{resolved}"' in resolved_part
    assert "statistic 31.5 over threshold 12.2" in text and "PSI 0.42" in text
    assert "Acknowledge" not in text  # a viewer sees no button

    by_kind = browser.get("/alerts", params={"kind": "accuracy-drop"}).text
    assert f'id="alert-{accuracy}"' in by_kind and f'id="alert-{drift}"' not in by_kind
    by_device = browser.get("/alerts", params={"device": "dev-a", "kind": ""}).text
    assert f'id="alert-{drift}"' in by_device and f'id="alert-{accuracy}"' not in by_device
    assert browser.get("/alerts", params={"kind": "bogus"}).status_code == 422


def test_an_alert_for_values_outside_the_range_says_so(web: Api) -> None:
    assert web.enroll("dev-a").status_code == 201
    outside = {"below": 12, "above": 0, "nan": 3, "chance": 2.5e-9, "cut": 1e-4}
    evidence = {"statistic": 1.5, "threshold": 4.0, "samples": 400, "outside": outside}
    add_alert(web, "dev-a", "feature-drift", "pixels[5]", resolved=False, evidence=evidence)
    browser, _ = sign_in(web, Role.VIEWER)
    text = browser.get("/alerts").text
    assert "12 below the reference's range, 0 above, 3 NaN (chance 2.5e-09)" in text
    assert "over threshold" not in text


def test_an_operator_acknowledges_an_alert_and_it_is_audited(web: Api) -> None:
    assert web.enroll("dev-a").status_code == 201
    alert_id = add_alert(web, "dev-a", "feature-drift", "pixels[53]", resolved=False)
    viewer, viewer_csrf = sign_in(web, Role.VIEWER)
    assert (
        viewer.post(f"/alerts/{alert_id}/ack", data={"csrf_token": viewer_csrf}).status_code == 403
    )
    operator, csrf = sign_in(web, Role.OPERATOR)
    assert operator.post(f"/alerts/{alert_id}/ack").status_code == 403  # no CSRF token
    with web.context.db.session() as session:
        assert session.get(Alert, alert_id).acknowledged_at is None  # type: ignore[union-attr]

    done = operator.post(f"/alerts/{alert_id}/ack", data={"csrf_token": csrf})
    assert done.status_code == 303
    with web.context.db.session() as session:
        alert = session.get(Alert, alert_id)
        assert alert is not None and alert.acknowledged_by is not None
        audit = session.scalars(select(AuditEntry).where(AuditEntry.action == "alert.ack")).all()
    assert [(a.role, a.target) for a in audit] == [("operator", f"alert {alert_id}")]
    assert f"seen by {alert.acknowledged_by}" in operator.get("/alerts").text
    assert operator.post("/alerts/999/ack", data={"csrf_token": csrf}).status_code == 404
