"""Retention: keep outputs and failed files within an age and a total size.

Files are removed by job: an image goes with its completion record, a failed file with its
error file. The oldest go first. The job in hand is never touched: the worker runs retention
between jobs, and whatever belongs to a job still in processing/ is skipped anyway.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .inbox import Inbox, is_job_name, read_json

log = logging.getLogger(__name__)


@dataclass
class Group:
    """Files that go together, with the newest modification time among them."""

    key: str
    paths: list[Path] = field(default_factory=list)
    mtime: float = 0.0
    size: int = 0

    def add(self, path: Path) -> None:
        try:
            stat = path.stat()
        except FileNotFoundError:
            return
        self.paths.append(path)
        self.mtime = max(self.mtime, stat.st_mtime)
        self.size += stat.st_size


def _groups(inbox: Inbox) -> list[Group]:
    groups: dict[str, Group] = {}
    busy = {p.name[: -len(".json")] for p in inbox.processing.glob("*.json") if is_job_name(p.name)}
    for path in inbox.outputs.iterdir():
        name = path.name
        if name.startswith(".") or not path.is_file():
            continue
        if name.endswith(".json"):
            job_id = name[: -len(".json")]
            record = read_json(path)
            key = f"job:{job_id}"
            groups.setdefault(key, Group(key)).add(path)
            if isinstance(record, dict) and isinstance(record.get("file"), str):
                image = inbox.outputs / os.path.basename(record["file"])
                if image.exists():
                    groups[key].add(image)
    claimed = {p for g in groups.values() for p in g.paths}
    for path in inbox.outputs.iterdir():
        if path.is_file() and not path.name.startswith(".") and path not in claimed:
            stem = path.stem.removeprefix("upscale_")
            groups.setdefault(f"job:{stem}", Group(f"job:{stem}")).add(path)
    for path in inbox.failed.iterdir():
        if path.name.startswith(".") or not path.is_file():
            continue
        base = path.name.removesuffix(".error.json")
        groups.setdefault(f"failed:{base}", Group(f"failed:{base}")).add(path)
    return [g for k, g in groups.items() if g.paths and not (k.startswith("job:") and k[4:] in busy)]


def enforce(inbox: Inbox, max_age_s: float | None, max_total_bytes: int | None,
            now: float | None = None) -> list[Path]:
    """Remove what the rules say; returns the removed paths."""
    if max_age_s is None and max_total_bytes is None:
        return []
    now = time.time() if now is None else now
    groups = sorted(_groups(inbox), key=lambda g: (g.mtime, g.key))
    doomed: list[Group] = []
    if max_age_s is not None:
        doomed = [g for g in groups if now - g.mtime > max_age_s]
    kept = [g for g in groups if g not in doomed]
    if max_total_bytes is not None:
        total = sum(g.size for g in kept)
        while kept and total > max_total_bytes:
            oldest = kept.pop(0)
            doomed.append(oldest)
            total -= oldest.size
    removed = []
    for group in doomed:
        for path in group.paths:
            try:
                path.unlink()
                removed.append(path)
            except FileNotFoundError:
                pass
    if removed:
        freed = sum(g.size for g in doomed)
        log.info("retention removed %d file(s) of %d job(s), %.1f MB: %s", len(removed), len(doomed), freed / 1e6,
                 _listing([f"{path.parent.name}/{path.name}" for path in removed]))
    return removed


def _listing(names: list[str], limit: int = 20) -> str:
    """The names, up to ``limit`` of them: the log says what went without growing without bound."""
    if len(names) <= limit:
        return ", ".join(names)
    return f"{', '.join(names[:limit])} and {len(names) - limit} more"
