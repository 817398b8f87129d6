"""The bundle pages: versions, lineage and the converter's report with the chosen candidate."""

from __future__ import annotations

from pathlib import Path

from edgefleet.bundle import build_bundle
from edgefleet.server.principals import Role
from tests.conftest import PROFILE, KeySet, write_model_dir
from tests.server.apiclient import Api
from tests.server.test_accuracy import converter_report
from tests.server.test_accuracy_api import write_bundle
from tests.web.conftest import sign_in


def test_bundle_pages_show_versions_lineage_report_and_reference(
    web: Api, tmp_path: Path, keyset: KeySet
) -> None:
    for version, accuracy in (("1.0.0", 95.0), ("2.0.0", 93.5)):
        assert (
            web.push(
                write_bundle(tmp_path, keyset, version, converter_report(accuracy))
            ).status_code
            == 201
        )
    browser, _ = sign_in(web, Role.VIEWER)

    listing = browser.get("/bundles")
    assert listing.status_code == 200
    assert (
        'href="/bundles/demo/1.0.0"' in listing.text
        and 'href="/bundles/demo/2.0.0"' in listing.text
    )
    assert "chose int8-static" in listing.text

    page = browser.get("/bundles/demo/2.0.0")
    assert page.status_code == 200
    text = page.text
    assert 'href="/bundles/demo/1.0.0">demo@1.0.0</a>' in text  # the version it replaces
    assert "int8-static <strong>(chosen)</strong>" in text
    assert "float <strong>(chosen)</strong>" not in text
    assert "accuracy 97.00%" in text and "accuracy 93.50%" in text  # every candidate's figure
    assert "93.5% of validation answers right" in text  # the reference accuracy
    assert "none stated" in text  # no security floor in this manifest

    first = browser.get("/bundles/demo/1.0.0").text
    assert "no earlier version of demo" in first


def test_a_bundle_without_a_report_says_so_and_unknown_ones_are_404(
    web: Api, bundle_file: Path
) -> None:
    assert web.push(bundle_file).status_code == 201
    browser, _ = sign_in(web, Role.VIEWER)
    page = browser.get("/bundles/demo/1.2.3")
    assert page.status_code == 200
    assert "carries no converter report" in page.text
    assert "the bundle's report gives no figure" in page.text
    missing = browser.get("/bundles/demo/9.9.9")
    assert missing.status_code == 404 and "no bundle demo@9.9.9" in missing.text


def test_a_stated_security_floor_is_shown(web: Api, tmp_path: Path, keyset: KeySet) -> None:
    src = write_model_dir(tmp_path / "src")
    output = tmp_path / "floor.efb"
    build_bundle(
        src,
        output,
        name="demo",
        version="3.0.0",
        keys=[keyset.release],
        profiles=[PROFILE],
        release_counter=7,
        security_floor=5,
    )
    assert web.push(output).status_code == 201
    browser, _ = sign_in(web, Role.VIEWER)
    text = browser.get("/bundles/demo/3.0.0").text
    assert "5: devices that install it refuse releases below" in text
