"""The fields of device messages by path: what a server accepts, and payloads narrowed to it.

A device message refuses fields it does not know (`edgefleet.mqtt.messages`), so
a message from an agent newer than its server that carries an optional field
the server's schema lacks is refused whole. So the server announces the path of
every field it accepts, per message kind (`accepted_fields`, signed and
retained as `FleetAccepts`), and an agent that holds the announcement narrows
each payload to it before signing it (`Narrowing`):

- an optional field the server does not accept is left out, at any depth, and
  logged once (the agent is newer than the server);
- a required field is never left out on its own. In an optional part (a
  part that grew a required field), the part is left out whole, since the
  server could not take it without the field. A required field of the
  message itself, or of a required part, stays, and a server that lacks it
  refuses the message as before (changing those is a new schema version);
- without an announcement (a server that predates it, or none heard yet), and
  for a kind the announcement does not name, payloads go out whole.

Paths are field names joined by dots: through a nested part (`link.connects`),
through the items of a list of parts (`breakers.step`) and, with `*`, through
the values of a mapping of parts (`features.*.counts`).
"""

from __future__ import annotations

import json
import logging
import threading
import types
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel

from edgefleet.mqtt.messages import MESSAGE_TYPES
from edgefleet.mqtt.topics import TopicKind

log = logging.getLogger(__name__)

__all__ = ["Narrowing", "accepted_fields", "field_paths"]


def field_paths(model: type[BaseModel]) -> dict[str, bool]:
    """Every field path of `model`, nested parts included, and whether it is required in the
    part that holds it."""
    paths: dict[str, bool] = {}
    for name, info in model.model_fields.items():
        paths[name] = info.is_required()
        for part, through in _parts(info.annotation):
            for path, required in field_paths(part).items():
                paths[f"{name}{through}.{path}"] = required
    return paths


def _parts(annotation: Any, through: str = "") -> Iterator[tuple[type[BaseModel], str]]:
    """The models a field's type holds, each with how a path reaches it ("" or ".*")."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation, through
        return
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        yield from _parts(args[0], through)
    elif origin in (Union, types.UnionType, list, tuple, Sequence):
        for arg in args:
            yield from _parts(arg, through)
    elif origin in (dict, Mapping) and len(args) == 2:
        yield from _parts(args[1], f"{through}.*")


def accepted_fields() -> dict[str, list[str]]:
    """What this version accepts: per device message kind, every field path."""
    return {kind.value: sorted(field_paths(model)) for kind, model in MESSAGE_TYPES.items()}


class _Schema:
    """One message kind's paths, as this agent's schema has them."""

    def __init__(self, model: type[BaseModel]) -> None:
        self.paths = field_paths(model)
        # Paths whose value is a part (`link`) or, ending in `.*`, the values of a mapping
        # that are parts (`inputs.*`).
        self.parts = {path.rsplit(".", 1)[0] for path in self.paths if "." in path}
        # Required fields of parts, deepest first: a part that cannot be sent makes its
        # holder unsendable in turn when it is required there (`sendable`).
        nested = [path for path, required in self.paths.items() if required and "." in path]
        self.required_in_parts = sorted(nested, key=lambda path: path.count("."), reverse=True)

    def sendable(self, accepted: Iterable[str]) -> frozenset[str]:
        """The `accepted` paths less each part the server cannot take as this agent sends
        it: one that holds a required field the server lacks, directly or through required
        parts. Left out if optional; a required one makes its holder unsendable too."""
        paths = set(accepted)
        for path in self.required_in_parts:
            if path not in paths:
                paths.discard(_holder(path))
        return frozenset(paths)


def _holder(path: str) -> str:
    """The path of the part that holds the field at `path` (`inputs` for `inputs.*.counts`)."""
    holder = path.rsplit(".", 1)[0]
    return holder.removesuffix(".*")


class Narrowing:
    """The fields the server announced it accepts, once heard; payloads narrowed to them.

    Thread-safe: `accept` runs in the link's network thread, `narrow` wherever a
    message is handed to the broker.
    """

    def __init__(self) -> None:
        self._schemas = {kind: _Schema(model) for kind, model in MESSAGE_TYPES.items()}
        self._accepted: dict[TopicKind, frozenset[str]] = {}
        self._told: set[str] = set()  # "kind.path" of each field left out, logged once
        self._lock = threading.Lock()

    def accept(self, messages: Mapping[str, Sequence[str]]) -> None:
        """Take the server's announcement (`FleetAccepts.messages`, verified by the caller).

        Kinds it leaves out, and kinds whose every path it accepts, go out whole. Fields
        left out before and accepted now are no longer counted as left out.
        """
        accepted = {}
        for kind, schema in self._schemas.items():
            paths = messages.get(kind.value)
            if paths is not None and not set(schema.paths) <= set(paths):
                accepted[kind] = schema.sendable(paths)
        with self._lock:
            self._accepted = accepted
            self._told = {name for name in self._told if _left_out_by(accepted, name)}

    def narrow(self, kind: TopicKind, payload: bytes) -> bytes:
        """`payload` (a message of `kind`, as `encode_message` wrote it) without the optional
        fields the server does not accept; the same bytes when it has none of them, and for
        a kind that carries no message (a block request)."""
        with self._lock:
            accepted = self._accepted.get(kind)
        if accepted is None:
            return payload
        try:
            message = json.loads(payload)
        except ValueError:
            return payload  # not ours to judge: the server refuses it and says why
        if not isinstance(message, dict):
            return payload
        left_out: set[str] = set()
        narrowed = _narrowed(message, "", self._schemas[kind], accepted, left_out)
        if not left_out:
            return payload
        named = {f"{kind.value}.{path}" for path in left_out}
        with self._lock:
            news = sorted(named - self._told)
            self._told |= named
        if news:
            log.info(
                "the server does not accept %s (it is older than this agent): left out",
                ", ".join(news),
            )
        return json.dumps(narrowed, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    def left_out(self) -> list[str]:
        """Every field left out and not accepted since, as `kind.path` (sorted)."""
        with self._lock:
            return sorted(self._told)


def _left_out_by(accepted: Mapping[TopicKind, frozenset[str]], name: str) -> bool:
    """Whether the field `name` ("kind.path") is still left out under `accepted`."""
    kind, path = name.split(".", 1)
    paths = accepted.get(TopicKind(kind))
    return paths is not None and path not in paths


def _narrowed(
    value: dict[str, Any], prefix: str, schema: _Schema, accepted: frozenset[str], out: set[str]
) -> dict[str, Any]:
    kept = {}
    for key, item in value.items():
        path = f"{prefix}{key}"
        if path not in accepted and not schema.paths.get(path, False):
            out.add(path)
            continue
        kept[key] = _item(item, path, schema, accepted, out)
    return kept


def _item(item: Any, path: str, schema: _Schema, accepted: frozenset[str], out: set[str]) -> Any:
    if isinstance(item, list):
        return [_item(element, path, schema, accepted, out) for element in item]
    if not isinstance(item, dict):
        return item
    if f"{path}.*" in schema.parts:  # a mapping of parts
        return {
            key: _narrowed(part, f"{path}.*.", schema, accepted, out)
            if isinstance(part, dict)
            else part
            for key, part in item.items()
        }
    if path in schema.parts:
        return _narrowed(item, f"{path}.", schema, accepted, out)
    return item  # a plain mapping (model names to counts): its keys are data, not fields
