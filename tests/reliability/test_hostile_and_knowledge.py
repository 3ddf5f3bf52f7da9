"""The default-suite hostile-input and knowledge-safety tests, re-run under the
``reliability`` marker so ``make test-reliability`` covers them and counts them in its
summary table (each test asserts every case it sends is rejected; ``rejected`` below is
the number of hostile inputs that test sends)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration import test_hostile_cpm as HC
from tests.integration import test_hostile_exchange as HX
from tests.integration import test_hostile_knowledge as HK
from tests.reliability.summary import record
from tests.unit import test_poison_safety as PS

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]

HOSTILE = [
    (HC.test_peer_revoked_mid_round_is_cut_off_without_state_change, 3),
    (HC.test_replayed_profile_and_feedback_are_refused, 2),
    (HC.test_profile_signed_by_another_key_than_the_noise_peer, 1),
    (HC.test_malformed_and_foreign_bytes_on_cpm_protocol, 13),
    (HC.test_garbage_and_oversize_on_admin_protocol, 5),
    (HC.test_oversize_frame_is_refused_before_the_body_arrives, 1),
    (HC.test_directive_request_for_a_round_not_ours_leaks_nothing, 1),
    (HX.test_hostile_frames_on_exchange_protocol_teach_nothing, 9),
    (HX.test_replayed_knowledge_request_envelope_is_refused, 1),
    (HX.test_oversize_and_slow_loris_on_exchange, 2),
    (HX.test_cpm_answer_signed_by_another_key_is_refused, 1),
]


@pytest.mark.parametrize("fn, n_inputs", HOSTILE, ids=[f.__name__ for f, _ in HOSTILE])
async def test_hostile(fn, n_inputs: int, tmp_path: Path) -> None:
    await fn(tmp_path)
    record("hostile", fn.__name__.removeprefix("test_"), rejected=n_inputs)


@pytest.mark.parametrize("protocol", [HC.CPM_PROTOCOL, HC.ADMIN_PROTOCOL])
async def test_slow_loris(protocol: str, tmp_path: Path) -> None:
    await HC.test_slow_loris_without_a_single_byte_is_reset(tmp_path, protocol)
    record("hostile", f"slow_loris {protocol}", rejected=3)


def test_directive_for_other_peers(tmp_path: Path) -> None:
    HX.test_directive_not_naming_this_daemon_is_refused(tmp_path)
    record("hostile", "directive_not_naming_this_daemon_or_forged", rejected=2)


async def test_guardrail_through_exchange(tmp_path: Path) -> None:
    await HK.test_planted_secrets_are_removed_before_they_leave(tmp_path)
    record("knowledge", "planted secrets removed before they leave", rejected=len(HK.SECRETS) + 3,
           detail="7 secret/PII kinds + 3 private-data spans dropped; clean items intact")


def test_poisoned_teacher_dropped_by_bandit() -> None:
    PS.test_poisoned_teacher_earns_negative_reward_and_is_dropped()
    record("knowledge", "poisoned teacher: negative reward, LinUCB drops it",
           detail=f"rounds {PS.TAIL.start}-{PS.TAIL.stop - 1}: <= {PS.MAX_TAIL_RATE:.0%} of rounds over "
                  f"{len(PS.SEEDS)} seeds, <= {PS.MAX_TAIL_PER_SEED} in any (the unpoisoned control: >= "
                  f"{PS.MIN_CONTROL_TAIL_PER_SEED} in every seed); 8 agents")
