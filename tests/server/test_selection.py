"""Device selection: selectors, matching, and the per-rollout order of devices."""

from __future__ import annotations

import hashlib

import pytest

from edgefleet.server.errors import InvalidRequestError
from edgefleet.server.rollouts.selection import (
    format_selector,
    matches,
    order_selection,
    parse_selector,
)

PARSED = [
    (None, {}),
    ("", {}),
    ("   ", {}),
    ("site=berlin", {"site": "berlin"}),
    (" site = berlin , line=2", {"site": "berlin", "line": "2"}),
    ("k8s.io/zone=eu-west:1", {"k8s.io/zone": "eu-west:1"}),
    ("owner=Jane Doe", {"owner": "Jane Doe"}),
    ("city=Zürich", {"city": "Zürich"}),
]


@pytest.mark.parametrize(("text", "selector"), PARSED)
def test_parse_selector(text: str | None, selector: dict[str, str]) -> None:
    assert parse_selector(text) == selector


BAD = [
    ("site", "item 1 'site' is not tag=value"),
    ("site=berlin,", "item 2 '' is not tag=value"),
    (",site=berlin", "item 1"),
    ("=berlin", "item 1"),
    ("site=", "value '' of tag 'site'"),
    ("site=a=b", "value 'a=b'"),
    ("site=ber\tlin", "value"),
    ("-site=x", "tag '-site'"),
    ("si te=x", "tag 'si te'"),
    ("k" * 65 + "=x", "tag"),
    ("site=" + "v" * 129, "value"),
    ("site=a,site=b", "tag 'site' is given twice"),
    (",".join(f"t{i}=v" for i in range(33)), "more than 32 tags"),
    ("a=" + "b," * 1100, "longer than"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_bad_selector_is_refused(text: str, message: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse_selector(text)
    assert str(caught.value).startswith("selector: ")
    assert message in str(caught.value)


def test_format_selector_reads_back() -> None:
    selector = {"site": "berlin", "line": "2"}
    assert format_selector(selector) == "line=2,site=berlin"
    assert parse_selector(format_selector(selector)) == selector
    assert format_selector({}) == ""


MATCHES = [
    ({"site": "berlin", "line": "2"}, {}, True),
    ({"site": "berlin", "line": "2"}, {"site": "berlin"}, True),
    ({"site": "berlin", "line": "2"}, {"site": "berlin", "line": "2"}, True),
    ({"site": "berlin", "line": "2"}, {"site": "paris"}, False),
    ({"site": "berlin"}, {"site": "berlin", "line": "2"}, False),
    ({}, {"site": "berlin"}, False),
    ({"line": 2}, {"line": "2"}, True),  # values compare as strings
    ({"site": "Berlin"}, {"site": "berlin"}, False),  # and exactly
]


@pytest.mark.parametrize(("tags", "selector", "expected"), MATCHES)
def test_matches(tags: dict[str, object], selector: dict[str, str], expected: bool) -> None:
    assert matches(tags, selector) is expected


DEVICES = [f"cam-{i:03d}" for i in range(200)]


def test_order_is_the_documented_hash_order() -> None:
    def rank(device_id: str) -> str:
        return hashlib.sha256(f"7:{device_id}".encode()).hexdigest()

    assert order_selection(7, DEVICES) == sorted(DEVICES, key=rank)


def test_order_is_deterministic_and_independent_of_input_order() -> None:
    assert order_selection(7, DEVICES) == order_selection(7, list(reversed(DEVICES)))
    assert sorted(order_selection(7, DEVICES)) == DEVICES


def test_order_differs_between_rollouts_and_spreads_canaries() -> None:
    first, second = order_selection(1, DEVICES), order_selection(2, DEVICES)
    assert first != second
    assert first[:10] != second[:10]
    # The first tenth is drawn from the whole fleet, not from its alphabetical start.
    head = sorted(int(device_id[4:]) for device_id in first[:20])
    assert head[-1] - head[0] > 100


def test_order_drops_repeats() -> None:
    assert order_selection(3, ["b", "a", "b", "a"]) == order_selection(3, ["a", "b"])
    assert order_selection(3, []) == []
