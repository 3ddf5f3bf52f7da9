"""A teacher refuses a student over its budget with Error{rate_limited} before reading."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from p2p.ratelimit import PeerRateLimiter
from protocol.envelope import Identity, open_envelope
from protocol.ids import EXCHANGE_PROTOCOL
from protocol.messages import Error
from tests.reliability.netkit import client, raw_send, running_teacher

pytestmark = pytest.mark.timeout(120)


async def test_flooding_student_is_rate_limited(tmp_path) -> None:
    async with running_teacher(tmp_path) as t, client(Identity.generate()) as h:
        t.server.limiter = PeerRateLimiter(rate_per_s=0.01, burst=2)
        codes = []
        with capture_logs() as logs:
            for _ in range(4):
                reply = await raw_send(h, t.info(), EXCHANGE_PROTOCOL, b"\x01\x00")
                assert reply.frame is not None
                codes.append(open_envelope(reply.frame, allowed=(Error,))[1].code)
        assert codes == ["malformed", "malformed", "rate_limited", "rate_limited"], codes
        assert sum(e["event"] == "exchange.refused" and e["error"] == "rate_limited" for e in logs) == 2
