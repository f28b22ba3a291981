"""The one error shape every transport reports: a machine-readable code, a message and the field."""

from __future__ import annotations

from typing import Any


class JobError(Exception):
    """A job was refused or failed, for a reason a client can act on.

    ``code`` is stable and machine-readable, ``message`` is for people, and ``field`` names the
    job field at fault (``None`` when no single field is).
    """

    def __init__(self, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "field": self.field}

    def __repr__(self) -> str:
        return f"JobError({self.code!r}, {self.message!r}, field={self.field!r})"
