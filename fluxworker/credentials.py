"""Secrets from the environment or systemd credentials, never from the repository.

systemd's ``LoadCredential=fluxworker:/etc/fluxworker/credentials`` turns every file in that folder
into ``$CREDENTIALS_DIRECTORY/fluxworker_<file>``; ``LoadCredential=<name>:<path>`` gives
``$CREDENTIALS_DIRECTORY/<name>``. Both are read.
"""

from __future__ import annotations

import os
from pathlib import Path


def read_secret(name: str, env_var: str) -> str | None:
    """``$env_var`` if set, else the credential ``name`` (or ``fluxworker_<name>``) without its
    final line break; ``None`` if neither exists or it is empty."""
    value = os.environ.get(env_var)
    if value:
        return value
    folder = os.environ.get("CREDENTIALS_DIRECTORY")
    if not folder:
        return None
    for candidate in (name, f"fluxworker_{name}"):
        path = Path(folder, candidate)
        if path.is_file():
            return path.read_text(encoding="utf-8").rstrip("\r\n") or None
    return None
