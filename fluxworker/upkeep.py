"""Upkeep the worker does between jobs, each part at its own pace: freeing idle engines
(``models.unload_after``), removing temporary files that killed writers left behind, and
enforcing retention (``retention.*``)."""

from __future__ import annotations

import logging
import time

from .config import RetentionConfig
from .engines import EngineSet
from .inbox import Inbox
from .retention import enforce as enforce_retention

log = logging.getLogger(__name__)

ABANDONED_AFTER = 3600.0  # a temporary file this old was left by a writer that died mid-write
SWEEP_INTERVAL = 600.0  # how often the worker looks for such files (first at start)


class Upkeep:
    def __init__(self, inbox: Inbox, rules: RetentionConfig):
        self.inbox = inbox
        self.rules = rules
        self._next_sweep = 0.0
        self._next_retention = 0.0

    def run(self, engines: EngineSet) -> None:
        """Whatever is due now; cheap when nothing is."""
        engines.maintain()
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL
            removed = self.inbox.remove_abandoned(ABANDONED_AFTER)
            if removed:
                log.info("removed %d temporary file(s) left by writers that stopped mid-write", len(removed))
        if not self.rules.enabled or now < self._next_retention:
            return
        self._next_retention = now + self.rules.interval
        try:
            enforce_retention(self.inbox, self.rules.max_age_seconds, self.rules.max_total_bytes)
        except OSError as exc:
            log.warning("retention could not run: %s", exc)
