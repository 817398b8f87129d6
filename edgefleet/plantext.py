"""Rollout plan text (YAML or JSON) to data, safely: what the client reads and the server parses.

A plan file is small and plain, so anything beyond that is refused before it
costs time or memory:

- more than `MAX_PLAN_BYTES` of text;
- YAML aliases (`*name`): a few kilobytes of nested aliases expand to
  billions of nodes; a plan never needs them;
- nesting deeper than `MAX_DEPTH` (a plan is four levels deep);
- numbers that are not finite (`.inf`, `.nan`): no plan value is infinite,
  and JSON cannot carry them to the server; nor can it carry what YAML alone
  has (dates, sets, binary), which are refused too.

The client (`edgefleet.client`) and the server both read plan text and neither
may import the other, so the rules live here, in the core. The core does not
depend on PyYAML: `parse_plan_text` imports it when called, and the client and
server extras install it; `check_plain` needs nothing.
"""

from __future__ import annotations

import functools
import math
from typing import Any

MAX_PLAN_BYTES = 64 * 1024
MAX_DEPTH = 16


@functools.cache
def _plan_loader() -> Any:
    """PyYAML's safe loader, refusing aliases and deep nesting while it composes."""
    import yaml
    from yaml.nodes import Node

    class PlanLoader(yaml.SafeLoader):
        _depth = 0

        def compose_node(self, parent: Node | None, index: Any) -> Node | None:
            refusal = None
            if self.check_event(yaml.AliasEvent):
                refusal = "aliases (*name) are not allowed"
            elif self._depth >= MAX_DEPTH:
                refusal = f"nested deeper than {MAX_DEPTH} levels"
            if refusal is not None:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]  # stubs
                raise ValueError(f"{refusal} (line {mark.line + 1}, column {mark.column + 1})")
            self._depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

    return PlanLoader


def parse_plan_text(text: str) -> Any:
    """The data of a plan's text (JSON types only), not yet validated as a plan.

    Raises:
        ValueError: one line saying what is wrong, and where.
        ImportError: PyYAML is not installed (the client and server extras have it).
    """
    import yaml

    if len(text.encode("utf-8", "surrogatepass")) > MAX_PLAN_BYTES:
        raise ValueError(f"longer than {MAX_PLAN_BYTES} bytes")
    try:
        data = yaml.load(text, Loader=_plan_loader())  # a SafeLoader: builds plain data only
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"not valid YAML or JSON{at}") from None
    check_plain(data)
    return data


def check_plain(data: Any, where: str = "") -> None:
    """Raises: ValueError naming the first value JSON cannot carry or no plan holds
    (an infinite or NaN number, a date, a key that is not text)."""
    here = where or "the plan"
    if isinstance(data, float) and not math.isfinite(data):
        raise ValueError(f"{here}: {data} is not a finite number")
    if isinstance(data, dict):
        for key, value in data.items():
            if not isinstance(key, str):
                raise ValueError(f"{here}: the key {key!r} is not text (quote it)")
            check_plain(value, f"{where}.{key}" if where else key)
    elif isinstance(data, list):
        for index, value in enumerate(data):
            check_plain(value, f"{where}.{index}" if where else str(index))
    elif not isinstance(data, (str, int, float, bool, type(None))):
        raise ValueError(f"{here}: a {type(data).__name__} is not plan data (quote it)")
