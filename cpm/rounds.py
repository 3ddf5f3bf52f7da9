"""The round state machine of the CPM — sans-IO: the clock is an argument, no sockets.

Why sans-IO: the rules (quorum, timer, expiry, restart recovery, exactly-once feedback)
are the part that must be right, and they are testable with a fake clock and a temp
database in milliseconds. ``cpm.service`` only moves bytes and calls these methods.

One round ``r``::

    open ──(quorum of fresh profiles, or timer + ≥ 2 fresh)──▶ matched
    matched ──(every directive has feedback or has expired)──▶ closed ──▶ open r+1
    closed r = max_rounds ──▶ finished (no new round)

All state lives in the ``Store``; the engine keeps nothing it could not rebuild from
the database (replicas: ``leader``, see ``tick``), so a restart after ``kill -9`` simply calls ``tick(now)``: an open round
stays open (its timer is recomputed from the first profile's arrival), a matched round
keeps its directives and expires the overdue ones.

Reward (Eq. 3, ``cpm.reward``, the one implementation): raw r = γ(L_pre − L_post) − δ·KB,
z-scored by the strategy's running statistics, then ``strategy.update``. A *failed*
exchange (``ok = false``) is recorded and counts as "nothing learned": raw r = −δ·KB,
and its z-score is clipped at 0 so a failure can never look like a success to the
bandit — repeated failures of a pairing push its estimate down. Feedback, directive state and bandit state commit in one
transaction, so a crash cannot count a reward twice or lose it. In a group-commit
batch the bandit state is written once, as the batch's last statement
(``Store.save_bandit_state_at_commit``): it is tens of KiB of JSON plus the reputation,
which grows with the teachers, and rewriting it for every feedback made the cost of a
feedback grow with the federation.

Teacher quarantine (``cpm.reputation``), whatever the strategy: every ok feedback is
evidence about its teacher; once a teacher is quarantined, matching never assigns it
as a teacher (``_select``). Its evidence is saved in the same strategy-state row and
transaction, so a restart neither forgets a quarantine nor counts a delivery twice. Only
an operator lifts it (``release_teacher``, reached through ``AdminRelease``).
"""

from __future__ import annotations

import inspect
import math
import random
import secrets
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import structlog

from cpm.config import CpmConfig
from cpm.faults import match_fault
from cpm.store import DirectiveRow, FeedbackRow, RoundRow, Store
from cpm.reward import Reward
from cpm.reputation import Reputation, TeacherRecord
from cpm.strategies import Pair, Strategy, make_strategy, strategy_class
from protocol.envelope import Identity, seal
from protocol.errors import MalformedFrame, ProtocolError, Unauthorized
from protocol.messages import Directive, Feedback, NoDirective, PeerAddrs, Profile, Register, Registered
from protocol.profile import PROFILE_DIM, ProtocolArm, check_profile

log = structlog.get_logger(__name__)

MAX_WAIT_MS = 60_000
MAX_SELECT_PASSES = 4  # strategy.select calls per round when quarantined teachers are refused


def build_strategy(config: CpmConfig) -> Strategy:
    """``make_strategy`` with the configured parameters, and the configured number of
    arms where the strategy takes it."""
    kw: dict[str, Any] = dict(config.strategy_params)
    if "n_arms" in inspect.signature(strategy_class(config.strategy)).parameters:
        kw["n_arms"] = len(config.arms)
    return make_strategy(config.strategy, **kw)


def _reward_of(strategy: Strategy) -> Reward:
    """The reward a strategy learns from (``strategy.reward``: a LinUCB's, saved in its
    state), else a standalone one: baselines still get raw and z-scored rewards recorded
    with the same γ, δ and running z-score, so runs are comparable in the export."""
    own = getattr(strategy, "reward", None)
    return own if isinstance(own, Reward) else Reward()


class Leader(Protocol):
    """The round lease as the engine sees it (``cpm.lease.Leadership``)."""

    def holds(self) -> bool: ...

    def fence(self) -> bool: ...

    def state_stale(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Pending:
    """DirectiveRequest answer 'not yet': the round is open, wait (long-poll) and retry."""

    round: int


class RoundEngine:
    """Round lifecycle, matching and feedback over a ``Store``. Not thread-safe: the
    service calls it from one trio task at a time (every method is synchronous)."""

    def __init__(
        self,
        store: Store,
        config: CpmConfig,
        identity: Identity,
        strategy: Strategy | None = None,
        reputation: Reputation | None = None,
        leader: Leader | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.identity = identity
        self.leader = leader  # replicas: only the lease holder advances rounds (cpm.lease)
        self._seen_round: tuple[int, str] | None = None
        # the latest round as the last tick() read it: profile() needs it right after its
        # tick, and re-reading it was one of the ~15 statements per profile
        self._tick_row: RoundRow | None = None
        self.strategy: Strategy = strategy if strategy is not None else build_strategy(config)
        self.reputation = reputation if reputation is not None else Reputation()
        self._reward = _reward_of(self.strategy)
        self._load_state()
        self.epoch = 0  # bumps on every round transition; the service wakes long-polls on it
        self.counters: dict[str, int] = {
            "profiles": 0,
            "directives_issued": 0,
            "directives_used": 0,
            "directives_failed": 0,
            "directives_expired": 0,
            "feedback": 0,
        }

    # ---- strategy state ----------------------------------------------------------
    def _load_state(self) -> None:
        saved = self.store.load_bandit_state()
        if saved is None:
            return
        name, state = saved
        if "reputation" in state:  # strategy-independent: kept across a strategy change
            self.reputation.load_state(state["reputation"])
            log.info("cpm.reputation.restored", teachers=len(self.reputation.teachers),
                     quarantined=len(self.reputation.quarantined()))
        if name != self.config.strategy:
            log.warning("cpm.strategy.state_ignored", saved=name, strategy=self.config.strategy)
            return
        self.strategy.load_state(state["strategy"])
        own = getattr(self.strategy, "reward", None)
        if isinstance(own, Reward):  # restored with the strategy's state (a new object)
            self._reward = own
        elif "z" in state:
            z, saved = self._reward.z, state["z"]
            z.n, z.mean, z.m2 = int(saved["n"]), float(saved["mean"]), float(saved["m2"])
        log.info("cpm.strategy.restored", strategy=name)

    def _sync_state(self) -> None:
        """Replicas: reload the strategy state if another replica saved it since this one
        last read or wrote it. Call inside the write transaction that builds on it."""
        if self.leader is None or not self.leader.state_stale():
            return
        self.strategy = build_strategy(self.config)
        self.reputation = Reputation()
        self._reward = _reward_of(self.strategy)
        self._load_state()
        log.info("cpm.strategy.synced")

    def _state(self) -> dict[str, Any]:
        z = self._reward.z
        return {"strategy": self.strategy.to_state(), "z": {"n": z.n, "mean": z.mean, "m2": z.m2},
                "reputation": self.reputation.to_state()}

    def _update(self, d: DirectiveRow, reward: float) -> None:
        context = np.asarray(d.context, dtype=float) if d.context else None
        if context is None and getattr(self.strategy, "bandit", None) is not None:
            log.warning("cpm.strategy.no_context", directive=d.directive_id)
            return
        self.strategy.update(Pair(d.teacher, d.student, d.arm, d.score, context), float(reward))

    # ---- state --------------------------------------------------------------------
    @property
    def current(self) -> RoundRow | None:
        return self.store.latest_round()

    def current_round(self) -> int:
        row = self.store.latest_round()
        return row.round if row is not None else 1

    def finished(self, row: RoundRow | None = None) -> bool:
        """Whether the last round (``row`` if the caller just read it) closed at ``max_rounds``."""
        row = self.store.latest_round() if row is None else row
        cap = self.config.max_rounds
        return bool(cap and row is not None and row.round >= cap and row.state == "closed")

    def start(self, now_ms: int) -> int | None:
        """Recover from the database (first start or after a crash); returns next deadline."""
        row = self.store.latest_round()
        log.info(
            "cpm.rounds.resumed" if row else "cpm.rounds.fresh",
            round=row.round if row else 0,
            state=row.state if row else "none",
            strategy=self.config.strategy,
        )
        return self.tick(now_ms)

    def tick(self, now_ms: int) -> int | None:
        """Advance every transition that is due at ``now_ms``.

        Returns the next time (ms) something may become due without a message arriving
        (round timer or the earliest directive expiry), or None when only messages can
        move the state.

        Replicas (``leader`` set): only the lease holder advances, inside one write
        transaction that first checks its term (the fence) and reloads the strategy state
        if another replica changed it; a follower only watches the latest round, so its
        long-polls wake when the holder's transitions land (``epoch``)."""
        if self.leader is None:
            return self._advance(now_ms)
        if self.leader.holds():
            with self.store.transaction():
                if self.leader.fence():
                    self._sync_state()
                    deadline = self._advance(now_ms)
                    self._watch()
                    return deadline
        self._watch()
        return None

    def _watch(self) -> None:
        """Bump ``epoch`` when the latest round moved (someone else's transition)."""
        row = self._tick_row = self.store.latest_round()
        seen = None if row is None else (row.round, row.state)
        if seen != self._seen_round:
            self._seen_round = seen
            self.epoch += 1

    def _advance(self, now_ms: int) -> int | None:
        while True:
            # every return below leaves the round row unchanged after this read
            row = self._tick_row = self.store.latest_round()
            if row is None:
                self._open(1, now_ms)
                continue
            if self.finished(row):
                return None
            if row.state == "closed":
                self._open(row.round + 1, now_ms)
                continue
            if row.state == "open":
                deadline = self._timer_deadline(row.round)
                n_fresh = self.store.count_fresh(row.round)
                if self._quorum(row.round, n_fresh, now_ms):
                    self._match(row.round, now_ms, trigger="quorum")
                    continue
                if deadline is not None and now_ms >= deadline and n_fresh >= 2:
                    self._match(row.round, now_ms, trigger="timer")
                    continue
                if deadline is not None and now_ms >= deadline:
                    return None  # timer passed with < 2 fresh: the next profile re-checks
                return deadline
            # matched
            for d in self.store.expirable(row.round, now_ms):
                self.store.set_directive_state(d.directive_id, "expired")
                self.counters["directives_expired"] += 1
                log.info("cpm.directive.expired", round=d.round, directive=d.directive_id,
                         teacher=d.teacher, student=d.student)
            if not self.store.has_issued(row.round):
                self.store.set_round_closed(row.round, now_ms)
                self.epoch += 1
                log.info("cpm.round.closed", round=row.round)
                continue
            nxt = self.store.next_expiry(row.round)
            return None if nxt is None else nxt + 1

    def _open(self, round_: int, now_ms: int) -> None:
        self.store.open_round(round_, now_ms)
        self.epoch += 1
        log.info("cpm.round.opened", round=round_)

    def _timer_deadline(self, round_: int) -> int | None:
        first = self.store.first_profile_at(round_)
        return None if first is None else first + int(self.config.round_timer_s * 1000)

    def _quorum(self, round_: int, n_fresh: int, now_ms: int) -> bool:
        active = self.store.count_active(now_ms - int(self.config.active_window_s * 1000))
        need = max(self.config.min_agents, math.ceil(self.config.quorum * active))
        return n_fresh >= need

    # ---- matching -----------------------------------------------------------------
    def _match(self, round_: int, now_ms: int, *, trigger: str) -> None:
        fresh = self.store.fresh_profiles(round_)
        ids = [peer for peer, _ in fresh]
        P = np.asarray([vec for _, vec in fresh], dtype=float).reshape(len(fresh), PROFILE_DIM)
        k = self.config.k_pairs or len(ids) // 2
        rng = np.random.default_rng([self.config.seed, round_])
        pairs = self._select(P, ids, round_, k, rng) if len(ids) >= 2 else []
        ttl_ms = int(self.config.directive_ttl_s * 1000)
        used: set[str] = set()
        rows: list[DirectiveRow] = []
        hub_ok = bool(getattr(self.strategy, "centralized", False))  # central-kd: one teacher, many students
        for pair in pairs:
            teacher, student, arm = str(pair.teacher), str(pair.student), int(pair.arm)
            reused = student in used or (teacher in used and not hub_ok)
            if teacher == student or reused or not 0 <= arm < len(self.config.arms):
                log.error("cpm.match.invalid_pair", round=round_, teacher=teacher, student=student, arm=arm)
                continue
            used.update((teacher, student))
            context = [] if pair.context is None else [float(v) for v in np.asarray(pair.context).ravel()]
            rows.append(self._directive(round_, teacher, student, arm, float(pair.score), context, now_ms, ttl_ms))
        with self.store.transaction():
            for d in rows:
                self.store.add_directive(d)
            self.store.set_round_matched(round_, now_ms)
            self.store.save_bandit_state_at_commit(self.config.strategy, self._state, now_ms)
            match_fault(round_)  # test-only, a no-op unless KNEXA_FAULT_MATCH_HOLD_S (cpm.faults)
        self.counters["directives_issued"] += len(rows)
        self.epoch += 1
        log.info("cpm.round.matched", round=round_, trigger=trigger, agents=len(ids), pairs=len(rows))
        for d in rows:
            log.info("cpm.directive.issued", round=round_, directive=d.directive_id,
                     teacher=d.teacher, student=d.student, arm=d.arm, score=d.score)

    def _select(self, P: np.ndarray, ids: list[str], round_: int, k: int,
                rng: np.random.Generator) -> list[Pair]:
        """``strategy.select`` minus every pair whose teacher is quarantined.

        Strategies know nothing of the reputation, so the engine asks again on the agents
        such a refused pair left unmatched (a quarantined agent may still be a student);
        an agent refused as a teacher twice is left out of the next pass. At most
        ``MAX_SELECT_PASSES`` calls; later passes see only the few leftover agents.
        """
        banned = {p for p in ids if self.reputation.is_quarantined(p)}
        pool = list(range(len(ids)))
        kept: list[Pair] = []
        refused: dict[str, int] = {}
        for _ in range(MAX_SELECT_PASSES):
            if len(pool) < 2 or len(kept) >= k:
                break
            sub = [ids[i] for i in pool]
            pairs = self.strategy.select(P[pool], sub, round_, k - len(kept), rng)
            good = [p for p in pairs if str(p.teacher) not in banned]
            kept.extend(good)
            if len(good) == len(pairs):
                break
            for p in pairs:
                if str(p.teacher) in banned:
                    refused[str(p.teacher)] = refused.get(str(p.teacher), 0) + 1
            taken = {str(p.teacher) for p in good} | {str(p.student) for p in good}
            pool = [i for i in pool if ids[i] not in taken and refused.get(ids[i], 0) < 2]
        if refused:
            log.info("cpm.match.quarantine_applied", round=round_, refused=sorted(refused),
                     pairs=len(kept))
        return kept

    def transfer_ids(self, round_: int, arm_index: int) -> tuple[int, ...]:
        """The arm's share of the transfer set, deterministic by (seed, round, arm)."""
        arm: ProtocolArm = self.config.arms[arm_index]
        size = self.config.transfer_size
        n = arm.items or size
        if n >= size:
            return tuple(range(size))
        rng = random.Random(f"knexa/transfer/{self.config.seed}/{round_}/{arm_index}")
        return tuple(sorted(rng.sample(range(size), n)))

    def _directive(
        self, round_: int, teacher: str, student: str, arm_index: int, score: float,
        context: list[float], now_ms: int, ttl_ms: int,
    ) -> DirectiveRow:
        arm = self.config.arms[arm_index]
        directive = Directive(
            directive_id=f"r{round_}-{secrets.token_hex(8)}",
            round=round_,
            teacher=teacher,
            student=student,
            arm=arm_index,
            alpha=float(arm.alpha),
            temperature=float(arm.temperature),
            n_samples=int(arm.n_samples),
            transfer_ids=self.transfer_ids(round_, arm_index),
            transfer_hash=self.config.transfer_hash,
            issued_at_ms=now_ms,
            expires_at_ms=now_ms + ttl_ms,
        )
        envelope = seal(directive, self.identity, ts_ms=now_ms)
        return DirectiveRow(
            directive_id=directive.directive_id,
            round=round_,
            teacher=teacher,
            student=student,
            arm=arm_index,
            params={"alpha": arm.alpha, "temperature": arm.temperature, "n_samples": arm.n_samples,
                    "items": len(directive.transfer_ids)},
            score=float(score) if math.isfinite(score) else 0.0,
            context=[float(v) for v in context],
            state="issued",
            issued_at=now_ms,
            expires_at=directive.expires_at_ms,
            envelope=envelope,
        )

    # ---- requests -----------------------------------------------------------------
    def register(self, peer: str, msg: Register, now_ms: int) -> Registered:
        if len(msg.listen_addrs) > 32 or any(len(a) > 512 for a in msg.listen_addrs):
            raise MalformedFrame("too many or too long listen_addrs")
        self.store.register(
            peer, org=msg.org[:128], family=msg.family[:64], listen_addrs=msg.listen_addrs,
            agent_version=msg.agent_version[:64], now_ms=now_ms, admit=self.config.open_admission,
        )
        log.info("cpm.agent.registered", peer=peer, org=msg.org, family=msg.family)
        self.tick(now_ms)
        return Registered(round=self.current_round(), cpm_time_ms=now_ms, transfer_hash=self.config.transfer_hash)

    def _require_registered(self, peer: str) -> None:
        agent = self.store.get_agent(peer)
        if agent is None or agent.registered_at is None:
            raise ProtocolError("send Register first")

    def profile(self, peer: str, msg: Profile, now_ms: int) -> NoDirective | None:
        """None = accepted and committed (the caller acks); NoDirective = wrong round."""
        self._require_registered(peer)
        check_profile(msg.vector)
        if msg.transfer_hash != self.config.transfer_hash:
            raise ProtocolError("transfer_hash differs from the CPM's transfer set")
        self.tick(now_ms)
        row = self._tick_row  # tick() just read it
        if row is None:  # a replica before the lease holder opened round 1
            return NoDirective(round=1, reason="round_pending", retry_after_ms=1000)
        if self.finished(row):
            return NoDirective(round=row.round, reason="finished", retry_after_ms=0)
        if msg.round < row.round:
            return NoDirective(round=row.round, reason="advance", retry_after_ms=0)
        if msg.round > row.round:
            return NoDirective(round=row.round, reason="round_pending", retry_after_ms=1000)
        if row.state != "open":
            return NoDirective(round=row.round + 1, reason="round_pending", retry_after_ms=1000)
        self.store.put_profile(peer, msg.round, msg.vector, msg.transfer_hash, now_ms)
        self.counters["profiles"] += 1
        log.info("cpm.profile.accepted", peer=peer, round=msg.round)
        self.tick(now_ms)
        return None

    def directive(self, peer: str, round_: int, now_ms: int) -> bytes | NoDirective | Pending:
        """The stored CPM-signed Directive envelope for ``peer`` in ``round_``, a
        NoDirective, or Pending (round still open: the caller may long-poll)."""
        self.tick(now_ms)
        self.store.touch(peer, now_ms)
        cur = self.current_round()
        row = self.store.directive_for_peer(round_, peer) if round_ <= cur else None
        if row is not None:
            return row.envelope
        if self.finished():
            return NoDirective(round=cur, reason="finished", retry_after_ms=0)
        if round_ > cur:
            return NoDirective(round=cur, reason="round_pending", retry_after_ms=1000)
        if round_ < cur:
            return NoDirective(round=cur, reason="advance", retry_after_ms=0)
        state = self.store.latest_round()
        if state is not None and state.state == "open":
            return Pending(round_)
        return NoDirective(round=cur, reason="not_matched", retry_after_ms=1000)

    def feedback(self, peer: str, msg: Feedback, now_ms: int) -> bool:
        """Record feedback exactly once; True if new, False for a duplicate (still acked)."""
        d = self.store.get_directive(msg.directive_id)
        if d is None:
            raise Unauthorized(f"unknown directive {msg.directive_id}")
        if d.student != peer:
            raise Unauthorized("only the directive's student may report its feedback")
        if (msg.round, msg.teacher, msg.student) != (d.round, d.teacher, d.student):
            raise ProtocolError("feedback round/teacher/student disagree with the directive")
        if min(msg.kb, msg.loss_pre, msg.loss_post) < 0:
            raise MalformedFrame("losses and kb must be ≥ 0")
        if self.store.get_feedback(msg.directive_id) is not None:
            log.info("cpm.feedback.duplicate", peer=peer, directive=msg.directive_id, round=d.round)
            return False
        self._sync_state()  # replicas: build on the latest saved bandit, never an older copy
        raw, reward = self._reward.observe(msg.loss_pre, msg.loss_post, msg.kb, msg.ok)
        verdict = None
        with self.store.transaction():
            inserted = self.store.add_feedback(
                FeedbackRow(
                    directive_id=msg.directive_id, round=d.round, loss_pre=msg.loss_pre,
                    loss_post=msg.loss_post, kb=msg.kb, ok=msg.ok, failure=msg.failure[:512],
                    raw_reward=raw, reward=reward, received_at=now_ms,
                )
            )
            if not inserted:  # a second process raced us; treat as duplicate
                return False
            self.store.set_directive_state(msg.directive_id, "used" if msg.ok else "failed")
            self._update(d, reward)
            stale = msg.ok and self.reputation.predates_release(d.teacher, d.issued_at)
            if msg.ok and not stale:  # a delivery: evidence about the teacher (cpm.reputation)
                verdict = self.reputation.record(d.teacher, msg.loss_pre - msg.loss_post, d.round)
            # in a group-commit batch: written once, as the batch's last statement
            self.store.save_bandit_state_at_commit(self.config.strategy, self._state, now_ms)
        self.counters["feedback"] += 1
        self.counters["directives_used" if msg.ok else "directives_failed"] += 1
        log.info("cpm.feedback.recorded", peer=peer, directive=msg.directive_id, round=d.round,
                 ok=msg.ok, raw_reward=raw, reward=reward, late=d.state == "expired")
        if stale:
            log.info("cpm.reputation.pre_release_delivery", teacher=d.teacher, directive=msg.directive_id,
                     round=d.round)
        if verdict is not None:
            log.warning("cpm.teacher.quarantined", teacher=verdict.teacher, round=verdict.round,
                        directive=msg.directive_id, reason=verdict.reason, deliveries=verdict.deliveries,
                        harmful=verdict.harmful, mean_gain=verdict.mean_gain, p_value=verdict.p_value)
        self.tick(now_ms)
        return True

    def peer_lookup(self, requester: str, peer_id: str) -> PeerAddrs:
        """Addresses of ``peer_id`` — only if a directive of the current round pairs the
        two (the CPM never hands out its member list)."""
        row = self.store.latest_round()
        if row is not None and requester != peer_id:
            for d in self.store.directives_for_round(row.round):
                if {d.teacher, d.student} == {requester, peer_id}:
                    agent = self.store.get_agent(peer_id)
                    return PeerAddrs(peer_id=peer_id, addrs=agent.listen_addrs if agent else ())
        raise Unauthorized("no directive of the current round pairs these peers")

    def stats(self) -> dict[str, Any]:
        row = self.store.latest_round()
        return {
            "round": row.round if row else 0,
            "state": ("finished" if self.finished() else row.state) if row else "none",
            **self.store.counts(),
            "quarantined_teachers": len(self.reputation.quarantined()),
        }

    def release_teacher(self, peer: str, now_ms: int, *, admin: str = "") -> TeacherRecord | None:
        """Operator: lift ``peer``'s teacher quarantine and clear its evidence (see
        ``cpm.reputation``) in one transaction (committed before it returns unless the
        caller groups it, as the admin handler does not). Returns the cleared record, or
        None when ``peer`` is not quarantined: nothing changes, nothing is written. If
        the write fails the in-memory reputation is put back (memory never runs ahead
        of the database)."""
        self._sync_state()
        if not self.reputation.is_quarantined(peer):
            return None
        before = self.reputation.to_state()
        cleared = self.reputation.release(peer, now_ms)
        assert cleared is not None
        try:
            with self.store.transaction():
                self.store.save_bandit_state(self.config.strategy, self._state(), now_ms)
        except BaseException:
            self.reputation.load_state(before)
            raise
        cleared.log_released(peer, admin)
        return cleared
