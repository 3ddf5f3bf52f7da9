"""Durable feedback outbox: survives a crash, drains each item exactly once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from knexad.config import DaemonConfig, RetrySection
from knexad.cpm_client import Backoff, FeedbackSender
from knexad.outbox import Outbox
from knexad.state import StateFile
from p2p.files import temp_path
from protocol.codec import encode_body, pack
from protocol.envelope import Identity
from protocol.errors import PeerUnavailable
from protocol.messages import Ack, Feedback

CPM = f"/ip4/127.0.0.1/tcp/4001/p2p/{Identity(bytes(32)).peer_id}"


def feedback(i: int, ok: bool = True) -> Feedback:
    return Feedback(
        directive_id=f"d-{i}", round=i, teacher="T", student="S",
        loss_pre=1.0, loss_post=0.5 - i / 100, kb=12.5, ok=ok, failure="" if ok else "peer_unavailable",
    )


def test_put_survives_reopen_and_ack_removes(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox")
    for i in range(3):
        box.put(feedback(i))
    box.put(feedback(1))  # same directive again: still one entry (idempotent)
    del box  # "crash": nothing in memory survives

    reopened = Outbox(tmp_path / "outbox")
    assert len(reopened) == 3
    assert sorted(fb.directive_id for fb in reopened.pending()) == ["d-0", "d-1", "d-2"]
    by_id = {fb.directive_id: fb for fb in reopened.pending()}
    assert by_id["d-0"] == feedback(0)  # field-for-field round trip
    assert reopened.ack("d-1") is True
    assert reopened.ack("d-1") is False
    assert [fb.directive_id for fb in Outbox(tmp_path / "outbox").pending()] == ["d-0", "d-2"]


def test_crash_mid_write_leaves_no_partial_record(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o")
    box.put(feedback(0))
    # a crash between write and rename leaves only a temp file
    (tmp_path / "o" / "deadbeef.tmp").write_bytes(b"\x85partial")  # an older release's temp name
    temp_path(tmp_path / "o" / "cafe.fb").write_bytes(b"\x85partial")
    reopened = Outbox(tmp_path / "o")
    assert [fb.directive_id for fb in reopened.pending()] == ["d-0"]
    assert not list((tmp_path / "o").glob("*.tmp"))


def test_corrupt_record_is_quarantined_not_fatal(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o")
    box.put(feedback(0))
    (tmp_path / "o" / "garbage.fb").write_bytes(b"\xc1\xc1 not msgpack")
    assert [fb.directive_id for fb in box.pending()] == ["d-0"]
    assert (tmp_path / "o" / "garbage.corrupt").exists()
    assert len(box) == 1


def test_directive_ids_cannot_escape_the_directory(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o")
    path = box.put(feedback(0).__class__(**{**_fields(feedback(0)), "directive_id": "../../etc/x"}))
    assert path.parent == tmp_path / "o"
    assert box.pending()[0].directive_id == "../../etc/x"


def _fields(fb: Feedback) -> dict:
    return {name: getattr(fb, name) for name in Feedback.__slots__}


class FlakyRpc:
    """Stands in for CpmRpc: fails the first ``failures`` calls, then Acks; records sends."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.sent: list[Feedback] = []

    async def call(self, message, timeout_s=None):
        if self.failures:
            self.failures -= 1
            raise PeerUnavailable("CPM down")
        self.sent.append(message)
        return Ack(ref=b"x" * 16)


def sender(tmp_path: Path, rpc: FlakyRpc) -> FeedbackSender:
    cfg = DaemonConfig(cpm=CPM, retry=RetrySection(base_s=0.01, max_s=0.05, jitter=0.0))
    return FeedbackSender(rpc, Outbox(tmp_path / "outbox"), cfg, StateFile(tmp_path))


async def test_drain_after_restart_sends_each_exactly_once(tmp_path: Path) -> None:
    first = Outbox(tmp_path / "outbox")
    for i in range(4):
        first.put(feedback(i, ok=i % 2 == 0))
    rpc = FlakyRpc()
    s = sender(tmp_path, rpc)  # a restarted daemon: only the disk knows
    assert await s.drain() == 4
    assert sorted(fb.directive_id for fb in rpc.sent) == ["d-0", "d-1", "d-2", "d-3"]
    assert len(Outbox(tmp_path / "outbox")) == 0
    assert await s.drain() == 0  # nothing is sent twice
    assert len(rpc.sent) == 4


async def test_sender_retries_until_acked(tmp_path: Path) -> None:
    rpc = FlakyRpc(failures=3)
    s = sender(tmp_path, rpc)
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        await s.enqueue(feedback(7))
        assert len(s.outbox) == 1  # on disk before any send succeeded
        with trio.fail_after(10):  # hang guard only
            while len(s.outbox):
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert [fb.directive_id for fb in rpc.sent] == ["d-7"]
    assert s.state.state.last_feedback["directive"] == "d-7"


def test_backoff_grows_caps_and_jitters() -> None:
    b = Backoff(0.5, 4.0, 0.0)
    assert [b.next_delay() for _ in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    b.reset()
    assert b.next_delay() == 0.5
    import random

    j = Backoff(1.0, 8.0, 0.5, rng=random.Random(1))
    delays = [j.next_delay() for _ in range(6)]
    caps = [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert all(c * 0.5 <= d <= c for d, c in zip(delays, caps))
    assert len(set(delays)) > 1


def test_records_are_private(tmp_path: Path) -> None:
    path = Outbox(tmp_path / "o").put(feedback(0))
    assert path.stat().st_mode & 0o077 == 0


def test_record_file_names_are_stable_across_releases(tmp_path: Path) -> None:
    """A record written by one release must be found (acked, rejected) by the next: the
    file name is part of the on-disk format."""
    path = Outbox(tmp_path / "o").put(feedback(0))
    assert path.name == "c0e9a3fadfe2d2d3acec25f05c93270e.fb"


def test_outbox_directory_is_created_with_its_parents(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "home" / "state" / "outbox")
    box.put(feedback(0))
    assert len(box) == 1


@pytest.mark.parametrize(
    "record",
    [
        pack(["knexa/outbox/1", b""]),
        pack({"format": "knexa/outbox/0", "body": encode_body(feedback(1))}),
        pack({"format": "knexa/outbox/1", "body": "not bytes"}),
    ],
)
def test_records_in_another_format_are_quarantined(tmp_path: Path, record: bytes) -> None:
    box = Outbox(tmp_path / "o")
    box.put(feedback(0))
    (tmp_path / "o" / "other.fb").write_bytes(record)
    assert [fb.directive_id for fb in box.pending()] == ["d-0"]
    assert (tmp_path / "o" / "other.corrupt").exists()


def test_pending_is_oldest_first_then_by_directive(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o")
    paths = {i: box.put(feedback(i)) for i in (1, 2, 3)}
    os.utime(paths[3], ns=(1_000, 1_000))  # the oldest file
    os.utime(paths[1], ns=(2_000, 2_000))  # written within one timestamp tick ...
    os.utime(paths[2], ns=(2_000, 2_000))
    assert [fb.directive_id for fb in box.pending()] == ["d-3", "d-1", "d-2"]


def test_rejected_record_is_kept_for_the_operator_and_not_resent(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o")
    path = box.put(feedback(0))
    box.put(feedback(1))
    assert box.reject("d-0") is True
    assert path.with_suffix(".rejected").exists() and not path.exists()
    assert [fb.directive_id for fb in box.pending()] == ["d-1"]
    assert box.reject("d-0") is False
