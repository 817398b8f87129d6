"""The bundle pages: /bundles (every version, newest push first) and
/bundles/{name}/{version} (lineage, release counter, security floor, profiles,
the converter's report with the chosen candidate marked, the reference accuracy).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import HTMLResponse

from edgefleet.server.api.deps import ContextDep, SessionDep
from edgefleet.server.db.models import BundleRow
from edgefleet.server.drift.accuracy import reference_accuracy
from edgefleet.server.errors import NotFoundError
from edgefleet.server.web import units
from edgefleet.server.web.auth import ViewerPage
from edgefleet.server.web.errors import PageError
from edgefleet.server.web.render import render

router = APIRouter(include_in_schema=False)

Name = Annotated[str, Path(max_length=128)]
Version = Annotated[str, Path(max_length=64)]


@router.get("/bundles", response_class=HTMLResponse)
def bundles_page(
    request: Request, context: ContextDep, session: SessionDep, _viewer: ViewerPage
) -> HTMLResponse:
    bundles = context.bundles.list(session)
    return render(request, "bundles.html", bundles=bundles, units=units, section="bundles")


def replaced_version(versions: list[BundleRow], bundle: BundleRow) -> BundleRow | None:
    """The version of the same name `bundle` follows: the highest release counter below
    its own (pushed before it when counters are equal)."""
    older = [
        other
        for other in versions
        if other.id != bundle.id
        and (other.release_counter, other.pushed_at) < (bundle.release_counter, bundle.pushed_at)
    ]
    return max(older, key=lambda other: (other.release_counter, other.pushed_at), default=None)


def candidate_headline(row: dict[str, Any]) -> str:
    """The one accuracy figure of a report's candidate, in words."""
    metrics = row.get("metrics") if isinstance(row.get("metrics"), dict) else {}
    assert isinstance(metrics, dict)
    if isinstance(metrics.get("accuracy"), int | float):
        return f"accuracy {metrics['accuracy']:.2f}%"
    if isinstance(metrics.get("rmse"), int | float):
        return f"rmse {metrics['rmse']:.4g}"
    return "no accuracy measured"


@router.get("/bundles/{name}/{version}", response_class=HTMLResponse)
def bundle_page(
    request: Request,
    name: Name,
    version: Version,
    context: ContextDep,
    session: SessionDep,
    _viewer: ViewerPage,
) -> HTMLResponse:
    try:
        bundle = context.bundles.get(session, name, version)
    except NotFoundError:
        raise PageError(404, f"there is no bundle {name}@{version}: see the bundles") from None
    versions = context.bundles.list(session, name)
    report = bundle.report if isinstance(bundle.report, dict) else None
    candidates = [row for row in (report or {}).get("candidates", []) if isinstance(row, dict)]
    return render(
        request,
        "bundle.html",
        bundle=bundle,
        versions=versions,
        replaced=replaced_version(versions, bundle),
        report=report,
        candidates=candidates,
        headline=candidate_headline,
        reference=reference_accuracy(bundle),
        units=units,
        section="bundles",
    )


__all__ = ["router"]
