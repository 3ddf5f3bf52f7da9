"""Durable outbox for Feedback: written to disk before sending, deleted after the Ack.

Why: Feedback is the only thing the bandit learns from; losing it on a CPM restart or a
daemon crash biases the reward. Each pending Feedback is one file named after its
``directive_id`` (the CPM's de-duplication key, so a retry after a lost Ack is harmless),
written as msgpack via temp file + fsync + rename + directory fsync, so after a crash a
file is either absent or complete. The stored form is the protocol body bytes
(``protocol.encode_body``), decoded with the same strict codec as the wire. The envelope
is *not* stored: every retry is sealed anew with a fresh nonce and timestamp, so it is
never refused as a replay or as stale.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import structlog

from p2p.files import atomic_write, fsync_dir, remove_stale_temps
from protocol.codec import decode_body, encode_body, pack, unpack_strict
from protocol.errors import MalformedFrame, UnknownMessage
from protocol.messages import Feedback

log = structlog.get_logger(__name__)

_SUFFIX = ".fb"
_FORMAT = "knexa/outbox/1"


def _file_name(directive_id: str) -> str:
    # directive IDs come from the CPM: hash them so no ID can escape the directory
    return hashlib.sha256(directive_id.encode("utf-8")).hexdigest()[:32] + _SUFFIX


class Outbox:
    """One directory of pending Feedback files. Not thread-safe; used from the trio loop."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._cleanup_temps()

    def _cleanup_temps(self) -> None:
        remove_stale_temps(self.directory)  # a crash mid-write: the rename never happened

    def put(self, feedback: Feedback) -> Path:
        """Durably queue ``feedback``; returns once it is on disk (idempotent per directive)."""
        final = self.directory / _file_name(feedback.directive_id)
        atomic_write(final, pack({"format": _FORMAT, "body": encode_body(feedback)}), mode=0o600)
        log.info("outbox.queued", directive=feedback.directive_id, round=feedback.round, ok=feedback.ok)
        return final

    def pending(self) -> list[Feedback]:
        """Every queued Feedback, oldest file first; unreadable files are quarantined."""
        out: list[tuple[int, Feedback]] = []
        for path in self.directory.glob("*" + _SUFFIX):
            try:
                raw = unpack_strict(path.read_bytes())
                if not isinstance(raw, dict) or raw.get("format") != _FORMAT or not isinstance(raw.get("body"), bytes):
                    raise MalformedFrame("not a knexa outbox record")
                feedback = decode_body("Feedback", raw["body"])
                mtime = path.stat().st_mtime_ns
            except (MalformedFrame, UnknownMessage, OSError) as exc:
                bad = path.with_suffix(".corrupt")
                os.replace(path, bad)
                log.error("outbox.corrupt", file=str(path), error=str(exc))
                continue
            out.append((mtime, feedback))
        # oldest first; files written within one timestamp tick tie-break by id so the
        # order is deterministic
        out.sort(key=lambda item: (item[0], item[1].directive_id))
        return [fb for _, fb in out]

    def ack(self, directive_id: str) -> bool:
        """The CPM committed it: forget it. True if a file was removed."""
        path = self.directory / _file_name(directive_id)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        fsync_dir(self.directory)
        log.info("outbox.acked", directive=directive_id)
        return True

    def reject(self, directive_id: str) -> bool:
        """The CPM refused this record for good: keep it for the operator, stop sending."""
        path = self.directory / _file_name(directive_id)
        try:
            os.replace(path, path.with_suffix(".rejected"))
        except FileNotFoundError:
            return False
        fsync_dir(self.directory)
        return True

    def __len__(self) -> int:
        return sum(1 for _ in self.directory.glob("*" + _SUFFIX))
