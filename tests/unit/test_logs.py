"""p2p.logs: py-libp2p's stdlib warnings reach structlog, repeats are counted, not repeated."""

from __future__ import annotations

import io
import json
import logging

from p2p.logs import _ToStructlog, configure_logging


def _events(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def test_libp2p_warnings_are_forwarded_as_json() -> None:
    buf = io.StringIO()
    configure_logging("json", stream=buf)
    logging.getLogger("libp2p.network.swarm").warning("dial to %s failed", "peerA")
    logging.getLogger("libp2p.network.swarm").info("chatty detail")  # below WARNING: dropped
    events = _events(buf)
    assert [e["event"] for e in events] == ["libp2p.log"]
    assert events[0]["message"] == "dial to peerA failed" and events[0]["logger"] == "libp2p.network.swarm"


def test_repeated_template_is_rate_limited_and_counted() -> None:
    buf = io.StringIO()
    configure_logging("json", stream=buf)
    now = [100.0]
    handler = _ToStructlog(window_s=10.0, clock=lambda: now[0])

    def warn(msg: str, *args: object) -> None:
        handler.emit(logging.LogRecord("libp2p.swarm", logging.WARNING, __file__, 1, msg, args, None))

    for i in range(50):
        warn("redial to %s failed", f"peer{i}")
    warn("other problem")
    now[0] += 11.0
    warn("redial to %s failed", "peer99")
    events = _events(buf)
    assert [e["message"] for e in events] == ["redial to peer0 failed", "other problem", "redial to peer99 failed"]
    assert "suppressed" not in events[0]
    assert events[2]["suppressed"] == 49


def test_log_events_reads_json_lines_and_filters_by_event() -> None:
    from p2p.logs import log_events

    text = '{"event": "a", "x": 1}\nplain text\n{"event": "b"}\n[1, 2]\n{"event": "a", "x": 2\n{"event": "a", "x": 3}\n'
    assert [e["x"] for e in log_events(text, "a")] == [1, 3]
    assert [e["event"] for e in log_events(text)] == ["a", "b", "a"]
    assert log_events("") == []
