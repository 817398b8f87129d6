"""The wire contract: every error code the API may send names one class, and back."""

from __future__ import annotations

import urllib.error

import pytest

from edgefleet import wire
from edgefleet.errors import (
    BadSignatureError,
    EdgefleetError,
    TamperedFileError,
    UntrustedInputError,
    UsageError,
)
from edgefleet.wire import (
    BundleExistsError,
    ForbiddenError,
    RolloutStateError,
    ServerError,
    error_body,
    error_class,
    error_code,
)


def subclasses(cls: type[EdgefleetError]) -> list[type[EdgefleetError]]:
    return [sub for direct in cls.__subclasses__() for sub in [direct, *subclasses(direct)]]


@pytest.mark.parametrize(
    "cls",
    [BundleExistsError, RolloutStateError, ForbiddenError, BadSignatureError, TamperedFileError],
)
def test_a_code_names_the_class_it_came_from(cls: type[EdgefleetError]) -> None:
    code = error_code(cls("x"))
    assert error_class(error_body(code, "x")["error"]) is cls


def test_every_wire_error_and_refusal_has_a_code_of_its_own() -> None:
    shared = [
        cls
        for cls in subclasses(ServerError) + subclasses(UntrustedInputError)
        if cls.__module__ in {"edgefleet.errors", "edgefleet.wire"}
    ]
    assert len(shared) > 20
    assert [cls for cls in shared if error_class(wire.class_code(cls)) is not cls] == []


def test_codes_of_other_errors_name_no_class() -> None:
    class ElsewhereError(ServerError):  # a subclass defined outside the contract
        pass

    assert error_class(error_code(ElsewhereError("x"))) is None
    assert error_class(error_code(UsageError("x"))) is None  # local errors never cross the wire
    assert error_class("server") is None
    assert error_class(None) is None
    assert error_code(FileNotFoundError(2, "gone")) == "file-not-found"
    assert error_code(OSError(5, "io")) == "os"
    assert error_code(urllib.error.URLError("refused")) == "url"  # an acronym is one word
