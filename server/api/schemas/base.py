"""What every entity's bodies share: the bases of requests and of row-mapped answers."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

# Printable text: no control characters (NUL included).
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"
MAX_ID = 2**31 - 1  # ids are 32-bit integers on PostgreSQL
Reason = Annotated[str, Field(max_length=1000, pattern=PRINTABLE)]


class RequestBody(BaseModel):
    """A request body: unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")


class RowView(BaseModel):
    """An answer mapped from an ORM row: `Model.model_validate(row)`."""

    model_config = ConfigDict(from_attributes=True)


__all__ = ["MAX_ID", "PRINTABLE", "Reason", "RequestBody", "RowView"]
