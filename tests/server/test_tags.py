"""One set of tag rules: enrollment, enrollment tokens, selectors and tag filters agree."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from pydantic import ValidationError

from edgefleet.server.api.routes.devices import parse_tag_filters
from edgefleet.server.api.schemas.enroll import EnrollRequest, EnrollTokenCreate
from edgefleet.server.errors import InvalidRequestError
from edgefleet.server.rollouts.selection import parse_selector
from edgefleet.server.tags import MAX_TAGS, check_tags
from tests.server.apiclient import enroll_body

GOOD = [
    ("site", "berlin"),
    ("a", "b"),
    ("0", "x"),
    ("k8s.io/zone", "eu-west 1"),
    ("x" * 64, "v" * 128),
    ("line_3:A-b", "Zürich / Hall 2"),
]
BAD = [
    ("", "v"),  # empty name
    ("_site", "v"),  # starts with neither letter nor digit
    ("-site", "v"),
    ("a b", "v"),  # space in a name
    ("site=x", "v"),  # the selector's separators
    ("si,te", "v"),
    ("x" * 65, "v"),  # too long
    ("site", ""),  # an empty value could not be selected
    ("site", "v" * 129),
    ("site", "a,b"),
    ("site", "a=b"),
    ("site", "a\x00b"),
    ("site", "a\nb"),
    ("site", "a\x7fb"),
]


def enroll_tags(tags: dict[str, str]) -> object:
    return EnrollRequest.model_validate({**enroll_body("cam-1"), "tags": tags})


def token_tags(tags: dict[str, str]) -> object:
    return EnrollTokenCreate.model_validate({"tags": tags})


def selector(tags: dict[str, str]) -> object:
    return parse_selector(",".join(f"{k}={v}" for k, v in tags.items()))


def tag_filters(tags: dict[str, str]) -> object:
    return parse_tag_filters([f"{k}={v}" for k, v in tags.items()])


ENTRY_POINTS: dict[str, Callable[[dict[str, str]], object]] = {
    "check_tags": check_tags,
    "enrollment": enroll_tags,
    "enrollment token": token_tags,
    "selector": selector,
    "tag filters": tag_filters,
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize(("name", "value"), GOOD)
def test_every_entry_point_takes_a_good_tag(entry: str, name: str, value: str) -> None:
    ENTRY_POINTS[entry]({name: value})


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize(("name", "value"), BAD)
def test_every_entry_point_refuses_a_bad_tag(entry: str, name: str, value: str) -> None:
    # The selector and the tag filters cannot even express some (a "," splits an item);
    # a refusal is what counts.
    with pytest.raises((InvalidRequestError, ValidationError)):
        ENTRY_POINTS[entry]({name: value})


@pytest.mark.parametrize("entry", ["check_tags", "enrollment", "enrollment token"])
def test_at_most_max_tags(entry: str) -> None:
    tags = {f"t{i}": "v" for i in range(MAX_TAGS)}
    ENTRY_POINTS[entry](tags)
    with pytest.raises((InvalidRequestError, ValidationError)):
        ENTRY_POINTS[entry]({**tags, "one-more": "v"})


def test_check_tags_returns_a_copy_and_refuses_non_strings() -> None:
    tags = {"site": "berlin"}
    checked = check_tags(tags)
    assert checked == tags and checked is not tags
    with pytest.raises(InvalidRequestError, match="strings to strings"):
        check_tags({"site": 3})  # type: ignore[dict-item]
    with pytest.raises(InvalidRequestError, match="at most 32 tags"):
        check_tags({f"t{i}": "v" for i in range(33)})


def test_tag_filters_are_one_pair_each_and_names_do_not_repeat() -> None:
    assert parse_tag_filters([" site = berlin ", "line=3"]) == {"site": "berlin", "line": "3"}
    assert parse_tag_filters([]) == {}
    for bad in (["site=a,line=b"], ["site"], ["site=a", "site=b"], ["=x"]):
        with pytest.raises(InvalidRequestError):
            parse_tag_filters(bad)
    with pytest.raises(InvalidRequestError, match="at most 16 tag filters"):
        parse_tag_filters([f"t{i}=v" for i in range(17)])
