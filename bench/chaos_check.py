"""The verdict of a chaos run: what was accepted, completed, lost and run twice.

Evidence of a job that ran to completion twice, from three sides: the worker's per-job "done"
log lines across all its runs; a completion record whose file was replaced after it was first seen
(every write is a new file renamed into place, so a rewrite changes the inode); and an image written
after its completion record (the worker writes the image first and the record last).
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import Counter
from pathlib import Path

from PIL import Image

from fluxworker.inbox import TEMPORARY_NAME

DONE = re.compile(r"job (\S+) type=\S+ engine=\S+ done in ")


class OutputWatcher(threading.Thread):
    """Notes the inode each file in ``outputs/`` had when first seen, and every file whose inode
    changed later (it was written again)."""

    def __init__(self, outputs: Path, interval: float = 0.2):
        super().__init__(name="output-watcher", daemon=True)
        self.outputs = outputs
        self.interval = interval
        self.first: dict[str, int] = {}
        self.rewritten: set[str] = set()
        self._done = threading.Event()

    def scan(self) -> None:
        try:
            entries = list(os.scandir(self.outputs))
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                inode = entry.inode()
            except OSError:
                continue
            if self.first.setdefault(entry.name, inode) != inode:
                self.rewritten.add(entry.name)

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self.scan()

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=10)
        self.scan()


def _record(outputs: Path, job_id: str) -> dict | None:
    try:
        record = json.loads((outputs / f"{job_id}.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _image_ok(outputs: Path, record: dict, job: dict) -> bool:
    try:
        with Image.open(outputs / record["file"]) as image:
            image.load()
            return image.size == (job["width"], job["height"])
    except (OSError, KeyError, ValueError, SyntaxError):
        return False


def _image_after_record(outputs: Path, record: dict, job_id: str) -> bool:
    try:
        image = (outputs / record["file"]).stat().st_mtime_ns
        written = (outputs / f"{job_id}.json").stat().st_mtime_ns
    except (OSError, KeyError):
        return False
    return image > written


def _leftovers(folder: Path) -> dict[str, list[str]]:
    inbox = folder / "inbox"
    found = {}
    for name, where in (("inbox", inbox), ("processing", inbox / "processing"), ("failed", inbox / "failed"),
                        ("mqtt results owed", inbox / "mqtt" / "pending")):
        try:
            found[name] = sorted(p.name for p in where.iterdir() if p.is_file() and p.name.endswith(".json")
                                 and not p.name.startswith("."))
        except FileNotFoundError:
            found[name] = []
    return found


def _temporaries(folder: Path) -> int:
    """Temporary files of writers killed mid-write (the worker removes them once an hour old)."""
    return sum(1 for path in folder.rglob(".*") if TEMPORARY_NAME.match(path.name))


def check(chaos, producers, follower, watcher) -> dict:
    """Count and explain; ``lines`` is the printed summary, the last line the verdict."""
    outputs = chaos.folder / "outputs"
    worker_logs = chaos.worker.log_texts()
    service_logs = worker_logs + chaos.api.log_texts()
    done_lines = Counter(match.group(1) for log in worker_logs for match in DONE.finditer(log))
    subs = chaos.ledger.of()
    accepted = [s for s in subs if s.accepted_at is not None and not s.at_risk]
    at_risk = [s for s in subs if s.at_risk]
    records = {s.id: _record(outputs, s.id) for s in subs}

    completed, failed, lost, broken = [], [], [], []
    for sub in accepted:
        record = records[sub.id]
        if record is None:
            lost.append(sub.id)
        elif record.get("status") != "done":
            failed.append(f"{sub.id} ({(record.get('error') or {}).get('code')})")
        elif _image_ok(outputs, record, sub.job):
            completed.append(sub.id)
        else:
            broken.append(sub.id)

    duplicated = set()
    for sub in subs:
        record = records[sub.id]
        if done_lines[sub.id] > 1 or f"{sub.id}.json" in watcher.rewritten:
            duplicated.add(sub.id)
        if record and record.get("status") == "done" and _image_after_record(outputs, record, sub.id):
            duplicated.add(sub.id)
    reruns = [name for name in watcher.rewritten if name.endswith(".png") and name[:-4] not in duplicated]

    faults = chaos.faults
    mid_job = [k for k in faults.worker_kills if k["job"]]
    unconfirmed = [s for s in subs if s.accepted_at is None]
    by_transport = {t: sum(1 for s in accepted if s.transport == t) for t in ("inbox", "http", "mqtt")}
    report = {
        "options": vars(chaos.options),
        "sent": len(subs),
        "accepted": len(accepted),
        "accepted_by_transport": by_transport,
        "completed": len(completed),
        "lost": len(lost),
        "duplicated": len(duplicated),
        "failed": failed,
        "broken_images": broken,
        "lost_ids": sorted(lost),
        "duplicated_ids": sorted(duplicated),
        "mqtt_at_risk": len(at_risk),
        "mqtt_at_risk_completed": sum(1 for s in at_risk if (records[s.id] or {}).get("status") == "done"),
        "unconfirmed": len(unconfirmed),
        "unconfirmed_completed": sum(1 for s in unconfirmed if records[s.id] is not None),
        "retried": {t: sum(1 for s in subs if s.transport == t and s.attempts > 1) for t in ("http", "mqtt")},
        "mqtt_refused_no_subscribers": sum(s.refusals.count("reason code 16") for s in subs),
        "http_followed_done": sum(1 for s in accepted if s.transport == "http" and s.followed == "done"),
        "http_unknown_after_accept": sorted(set(follower.unknown)),
        "worker_kills": len(faults.worker_kills),
        "worker_kills_mid_job": len(mid_job),
        "api_restarts": faults.api_restarts,
        "broker_restarts": faults.broker_restarts,
        "broker_kills": len(faults.broker_kills),
        "worker_runs": chaos.worker.runs,
        # A kill between a job's record and its log line loses the line: at most one per kill.
        "completed_and_logged": sum(1 for job_id in completed if done_lines[job_id] >= 1),
        "duplicates_dropped": sum(log.count("duplicate dropped") for log in worker_logs),
        "images_rewritten_before_record": len(reruns),
        "tracebacks": sum(log.count("Traceback") for log in service_logs),
        "producer_errors": [e for p in producers for e in p.errors],
        "leftover_files": _leftovers(chaos.folder),
        "temporary_files_of_killed_writers": _temporaries(chaos.folder),
    }
    report["lines"] = summary(report)
    return report


def summary(r: dict) -> list[str]:
    t = r["accepted_by_transport"]
    lines = [
        f"faults: worker SIGKILL x{r['worker_kills']} ({r['worker_kills_mid_job']} mid-job), API restarts "
        f"x{len(r['api_restarts'])} ({', '.join(r['api_restarts']) or 'none'}), broker SIGTERM+restart "
        f"x{r['broker_restarts']}, broker SIGKILL+restart x{r['broker_kills']}",
        f"sent {r['sent']} jobs; accepted: inbox {t['inbox']}, http {t['http']}, mqtt {t['mqtt']}; "
        f"sent again after no answer or a refusal: http {r['retried']['http']}, mqtt {r['retried']['mqtt']} "
        f"(broker reason code 16 x{r['mqtt_refused_no_subscribers']})",
        f"never confirmed: {r['unconfirmed']} (of which ran: {r['unconfirmed_completed']})",
        f"mqtt at risk (acknowledged after the broker's last save before a SIGKILL, not counted as accepted): "
        f"{r['mqtt_at_risk']} (of which ran: {r['mqtt_at_risk_completed']})",
        f"failed: {len(r['failed'])} {' '.join(r['failed'][:10])}; broken images: {len(r['broken_images'])}",
        f"http jobs seen done through GET /jobs/<id>: {r['http_followed_done']}/{t['http']}; "
        f"reported unknown after acceptance: {len(r['http_unknown_after_accept'])}",
        f"completed jobs with their \"done\" line in a worker log: {r['completed_and_logged']}/{r['completed']}",
        f"redeliveries and resubmissions dropped as duplicates: {r['duplicates_dropped']}; images written "
        f"again by a rerun before their record: {r['images_rewritten_before_record']}",
        f"tracebacks in service logs: {r['tracebacks']}; producer errors: {len(r['producer_errors'])}; "
        f"files left: {sum(map(len, r['leftover_files'].values()))}; temporary files of writers killed "
        f"mid-write: {r['temporary_files_of_killed_writers']} (the worker removes them once an hour old)",
    ]
    if r["lost_ids"]:
        lines.append(f"lost: {' '.join(r['lost_ids'][:20])}")
    if r["duplicated_ids"]:
        lines.append(f"duplicated: {' '.join(r['duplicated_ids'][:20])}")
    lines.append(f"chaos: accepted={r['accepted']} completed={r['completed']} lost={r['lost']} "
                 f"duplicated={r['duplicated']}")
    return lines
