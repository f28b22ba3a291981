"""Cross-origin access: which origins may call the API, what their scripts may read, and the
answers to preflight requests."""

from __future__ import annotations

import re

# Without these, a script on another origin cannot read when to retry (503), where a queued job
# is followed (202) or how to authenticate (401).
EXPOSED_HEADERS = "Retry-After, Location, WWW-Authenticate"
DEFAULT_ALLOWED_HEADERS = "Content-Type, Authorization, X-API-Key"
ALLOWED_METHODS = "GET, HEAD, POST, OPTIONS"
# A comma-separated list of header names (RFC 9110 tokens), as browsers send it in a preflight.
_HEADER_NAMES = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+(?:[ \t]*,[ \t]*[!#$%&'*+.^_`|~0-9A-Za-z-]+)*")


class Cors:
    """The CORS policy of ``http.cors_origins``: ``["*"]`` or a list of exact origins."""

    def __init__(self, origins: list[str]):
        self.origins = set(origins)
        self.any = "*" in self.origins

    def headers(self, origin: str | None) -> list[tuple[str, str]]:
        """The headers every answer to a request from ``origin`` carries."""
        if self.any:
            return [("Access-Control-Allow-Origin", "*"), ("Access-Control-Expose-Headers", EXPOSED_HEADERS)]
        if origin in self.origins:
            return [("Access-Control-Allow-Origin", origin), ("Vary", "Origin"),
                    ("Access-Control-Expose-Headers", EXPOSED_HEADERS)]
        return [("Vary", "Origin")]

    @staticmethod
    def preflight(requested_headers: str | None) -> dict[str, str]:
        """The extra headers of a preflight answer. The headers the page asks for are allowed as
        asked (a page may send any header it likes, X-Requested-With included); the API reads
        only its own."""
        requested = (requested_headers or "").strip()
        allowed = requested if _HEADER_NAMES.fullmatch(requested) else DEFAULT_ALLOWED_HEADERS
        return {
            "Access-Control-Allow-Methods": ALLOWED_METHODS,
            "Access-Control-Allow-Headers": allowed,
            "Access-Control-Max-Age": "600",
            "Vary": "Access-Control-Request-Headers",
        }
