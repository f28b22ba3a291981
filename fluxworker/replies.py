"""The API's answers other than 2xx: one exception, rendered as ``{"error": {"code", "message", "field"}}``."""

from __future__ import annotations

import json

import bottle

from .errors import JobError


class ApiError(Exception):
    """An answer other than 2xx, as JSON: ``{"error": {"code", "message", "field"}}`` plus ``extra``
    keys (the job id of a job that stays queued)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.headers, self.extra = status, headers or {}, extra or {}
        self.error = JobError(code, message, field)

    @classmethod
    def from_job_error(cls, exc: JobError, status: int = 400) -> ApiError:
        return cls(status, exc.code, exc.message, exc.field)

    def body(self) -> dict:
        return {"error": self.error.to_dict(), **self.extra}

    def response(self) -> bottle.HTTPResponse:
        return json_response(self.status, self.body(), self.headers)


def json_response(status: int, body: dict, headers: dict | None = None) -> bottle.HTTPResponse:
    response = bottle.HTTPResponse(json.dumps(body), status=status, headers=headers or {})
    response.content_type = "application/json"
    return response


def error_json(code: str, message: str) -> str:
    """The body of an error answer that concerns no single field (a bad path or method, a
    malformed request), in the shape every error answer has."""
    return json.dumps({"error": JobError(code, message).to_dict()})
