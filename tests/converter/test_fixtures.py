"""The committed fixture models are the ones make_models.py trained, and still score as trained."""

from __future__ import annotations

from tests.fixtures import check_models


def test_fixture_models_match_their_training_run() -> None:
    assert check_models.main() == 0
