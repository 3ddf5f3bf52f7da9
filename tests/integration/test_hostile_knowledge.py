"""Knowledge safety through the real exchange path: planted secrets never leave a teacher.

A teacher agent whose outputs contain planted secrets/PII and verbatim spans of its
private training data serves a real student over ``/knexa/exchange/1.0.0`` (py-libp2p,
Noise + yamux, E2E box). The guardrail runs in ``ExchangeServer`` before packing: the
student's decoded package holds none of the planted strings, the trailer's ``dropped``
count and the teacher's ``exchange.guardrail.dropped`` line account for every one, and
the clean items arrive intact.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from structlog.testing import capture_logs

from knexad.agent_api import KnowledgeItem, KnowledgePackage, TeachRequest
from knexad.student import fetch_package
from protocol.envelope import Identity
from tests.integration.test_exchange import CountingAgent, make_config, make_directive
from tests.reliability.netkit import client, running_teacher

pytestmark = pytest.mark.timeout(120)

PRIVATE_DOC = ("def settle_ledger(accounts, rate):\n    total = sum(a.balance * rate for a in accounts "
               "if a.region == 'north-7')\n    return round(total * 1.0375, 2)  # internal formula v3\n")
SECRETS = {
    "aws": "AKIAQWERTYUIOPASDFGH",
    "private_key": "-----BEGIN RSA PRIVATE KEY-----",
    "github": "ghp_" + "a1B2c3D4e5" * 4,
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    "email": "jane.doe@acme-corp.com",
    "assigned": 'api_token = "Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MA"',
    "card": "4111 1111 1111 1111",
}


class LeakyAgent(CountingAgent):
    """Half of its outputs carry a planted secret or a verbatim private span."""

    def teach(self, request: TeachRequest) -> KnowledgePackage:
        self.teach_calls += 1
        items = []
        for i in range(40):
            if i < len(SECRETS):
                completion = f"    x = 1\n    # {list(SECRETS.values())[i]}\n    return x\n"
            elif i < len(SECRETS) + 3:
                completion = PRIVATE_DOC
            else:
                completion = f"    return x + {i}\n"
            items.append(KnowledgeItem(f"{i}", f"def f_{i}(x):\n", completion, i % 12, 0.5))
        return KnowledgePackage(self.family, tuple(items), {"round": request.round})


async def test_planted_secrets_are_removed_before_they_leave(tmp_path: Path) -> None:
    student = Identity.generate()
    async with running_teacher(tmp_path, agent=LeakyAgent(), private_texts=(PRIVATE_DOC,)) as t, \
            client(student) as h:
        raw, directive = make_directive(t.cpm, t.identity.peer_id, student.peer_id)
        cfg = make_config(t.cpm)
        with capture_logs() as logs, trio.fail_after(30):
            result = await fetch_package(h, student, cfg, t.info(), raw, directive)
    received = "\n".join(i.prompt + i.completion for i in result.package.items)
    for name, secret in SECRETS.items():
        assert secret not in received, f"{name} leaked"
    assert "internal formula v3" not in received
    n_bad = len(SECRETS) + 3
    assert result.dropped == n_bad
    assert len(result.package.items) == 40 - n_bad
    assert {i.item_id for i in result.package.items} == {str(i) for i in range(n_bad, 40)}
    dropped = [e for e in logs if e["event"] == "exchange.guardrail.dropped"]
    assert dropped and dropped[0]["dropped"] == n_bad
    reasons = next(e for e in logs if e["event"] == "guardrail.dropped")["reasons"]
    assert reasons.get("overlap.private_data") == 3 and sum(reasons.values()) == n_bad
