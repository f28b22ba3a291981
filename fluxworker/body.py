"""Reading a request's JSON body: within the size limit, and with every way a body can be
malformed (a negative or lying Content-Length, bad chunked coding, a client that stops sending)
answered 400 ``invalid_body`` rather than failing inside the server."""

from __future__ import annotations

from typing import Any

from .errors import JobError
from .jobs import parse_json
from .replies import ApiError

# The rest of a body that could not be read cannot be told apart from the next request.
_CLOSE = {"Connection": "close"}


def invalid_body(message: str) -> ApiError:
    return ApiError(400, "invalid_body", message, headers=_CLOSE)


def too_large(limit: int) -> ApiError:
    return ApiError(413, "too_large", f"the body is larger than the limit of {limit} bytes (http.max_body_bytes)",
                    headers=_CLOSE)


def declared_length(environ: dict) -> int | None:
    """The body's length from Content-Length; ``None`` for a chunked body."""
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return None
    declared = (environ.get("CONTENT_LENGTH") or "0").strip()
    try:
        length = int(declared)
    except ValueError:
        raise invalid_body(f"Content-Length {declared!r} is not a number") from None
    if length < 0:
        raise invalid_body(f"Content-Length {declared!r} is negative")
    return length


def read_json_object(environ: dict, limit: int) -> dict:
    """The request's JSON object, or an ``ApiError``: 415 (not JSON), 413 (over ``limit``, refused
    from its Content-Length before it is uploaded), 400 (unreadable, malformed, not an object)."""
    ctype = (environ.get("CONTENT_TYPE") or "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the body as JSON with Content-Type: application/json")
    length = declared_length(environ)
    if length is not None and length > limit:
        raise too_large(limit)
    try:
        raw = environ["wsgi.input"].read(limit + 1 if length is None else length)
    except (ValueError, OSError) as exc:  # bad chunked coding; the client went quiet (socket timeout)
        raise invalid_body(f"the body could not be read: {exc or type(exc).__name__}") from None
    if len(raw) > limit:
        raise too_large(limit)
    if length is not None and len(raw) < length:
        raise invalid_body(f"the body ended after {len(raw)} of the {length} bytes its Content-Length announced")
    try:
        data: Any = parse_json(raw, limit)
    except JobError as exc:
        raise ApiError.from_job_error(exc) from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_job", "the body must be a JSON object")
    return data
