"""The CPM refuses a peer over its request budget with Error{rate_limited}; others are unaffected."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from protocol.envelope import Identity, now_ms
from protocol.errors import RateLimited
from protocol.messages import Registered
from tests.integration.test_cpm_service import _register, ask, client, running_cpm

pytestmark = pytest.mark.timeout(120)


async def test_flooding_peer_is_rate_limited_and_others_are_not(tmp_path) -> None:
    a, b = Identity.generate(), Identity.generate()
    async with running_cpm(tmp_path, rate_limit_per_s=0.5, rate_limit_burst=3) as (svc, info), \
            client(a) as ha, client(b) as hb:
        for ident in (a, b):
            svc.store.admit(ident.peer_id, "org", now_ms())
        for _ in range(3):
            assert isinstance(await ask(ha, info, a, _register(0)), Registered)
        with capture_logs() as logs, pytest.raises(RateLimited):
            await ask(ha, info, a, _register(0))
        assert any(e["event"] == "cpm.rejected" and e["code"] == "rate_limited" for e in logs)
        assert svc.rejected.get("rate_limited") == 1
        assert isinstance(await ask(hb, info, b, _register(1)), Registered)
