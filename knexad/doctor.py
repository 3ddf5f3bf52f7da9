"""``knexad doctor`` and ``knexad config show``: diagnose a daemon home before (or while)
it runs, from the operator's side of the wire.

Why: the daemon itself can only say "unreachable" or "unauthorized" and retry. The
doctor walks the same path step by step — config, key, listen ports, CPM address, TCP +
Noise dial, protocol negotiation, a signed ``Register``, the CPM clock, the transfer set,
then the local machine (accelerator, memory, disk) — and prints one line per step with a
fix, so the first broken step is obvious. Exit code: the first failing check's code
(3 config, 4 cannot reach the CPM, 5 not admitted, 1 other); warnings exit 0. With
several CPM addresses (replicas) it walks the network steps at every one of them — the
daemon may fail over to any — and says which one is in use (``check_cpm_replicas``).

Side effect, on purpose: the ``Register`` it sends is the same one the daemon sends at
start-up (it refreshes the agent's ``last_seen`` at the CPM; if the daemon is running,
its registered addresses are re-sent unchanged). It uses the daemon's own identity,
because admission is per peer ID; a running daemon may see its CPM connection replaced
once and reconnects by itself.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

import click

from knexad.config import ENV_PREFIX, KEY_FILE, OUTBOX_DIR, TINY_MODELS, DaemonConfig, config_path, load_config
from knexad.state import pid_alive, read_state
from p2p import checks as K
from protocol.errors import ConfigError, KnexaError

# |skew| below OK_SKEW_S is fine; up to the ±120 s replay window is a warning (a little
# more drift and every envelope is refused as `expired`); beyond it nothing works.
OK_SKEW_S = 30.0
REPLAY_WINDOW_S = 120.0
NON_CONFIG_ENV = frozenset({"KNEXA_CACHE"})  # read by knexad.agent.zoo (model cache root)
PROBE_LISTEN = "/ip4/127.0.0.1/tcp/0"


# --- environment overrides ------------------------------------------------------------


def config_sections() -> dict[str, type]:
    """The ``[section]`` tables of the daemon config: the fields holding dataclasses."""
    sample = DaemonConfig(cpm="")
    return {f.name: type(getattr(sample, f.name)) for f in fields(DaemonConfig)
            if is_dataclass(getattr(sample, f.name))}


def known_env_vars() -> dict[str, str]:
    """Every ``KNEXA_*`` variable knexad.config understands → the dotted key it sets."""
    out = {}
    sections = config_sections()
    for f in fields(DaemonConfig):
        if f.name not in sections:
            out[ENV_PREFIX + f.name.upper()] = f.name
    for section, cls in sections.items():
        for f in fields(cls):
            out[f"{ENV_PREFIX}{section.upper()}_{f.name.upper()}"] = f"{section}.{f.name}"
    return out


def env_overrides(env: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """(applied ``VAR → key``, unknown ``KNEXA_*`` names — probably typos)."""
    known = known_env_vars()
    applied = {var: known[var] for var in sorted(env) if var in known}
    unknown = [var for var in sorted(env) if var.startswith(ENV_PREFIX) and var not in known
               and var not in NON_CONFIG_ENV]
    return applied, unknown


# --- local checks ---------------------------------------------------------------------


def check_config(home: Path, env: Mapping[str, str]) -> tuple[K.Check, DaemonConfig | None]:
    applied, _unknown = env_overrides(env)
    try:
        cfg = load_config(home, env)
    except ConfigError as exc:
        hint = (f"edit {config_path(home)} (docs/configuration.md lists every key)"
                if exc.key not in ("home",) else f"knexad init --home {home} --cpm <cpm-multiaddr>")
        if applied and any(exc.key == key for key in applied.values()):
            hint = f"the value comes from the environment ({', '.join(applied)}): fix or unset it"
        return K.fail("config", str(exc), hint, K.EXIT_CONFIG), None
    via = f"; env overrides: {', '.join(applied)}" if applied else ""
    return K.ok("config", f"{config_path(home)} valid (org={cfg.org}, model={cfg.agent.model}{via})"), cfg


def check_env(env: Mapping[str, str]) -> K.Check | None:
    _applied, unknown = env_overrides(env)
    if not unknown:
        return None
    return K.warn("environment", f"ignored, not a knexad setting: {', '.join(unknown)}",
                  "check the spelling: KNEXA_<KEY> or KNEXA_<SECTION>_<KEY> (docs/configuration.md)")


def check_cpm_address(cfg: DaemonConfig) -> K.Check:
    """Every configured address of the CPM (``cpm = [...]``: its replicas), parsed."""
    from p2p.host import parse_peer_addr

    try:
        infos = [parse_peer_addr(a, "cpm") for a in cfg.cpm_addrs]
    except ConfigError as exc:
        return K.fail("cpm address", str(exc), "cpm = \"/ip4/<host>/tcp/<port>/p2p/<cpm-peer-id>\"", K.EXIT_CONFIG)
    addrs = ", ".join(str(a) for info in infos for a in info.addrs)
    detail = f"{addrs} peer {infos[0].peer_id.to_base58()}"
    if len(infos) > 1:
        detail = f"{len(infos)} replicas: {detail}"
    if any(str(a).startswith(("/ip4/0.0.0.0", "/ip6/::/")) for info in infos for a in info.addrs):
        return K.warn("cpm address", detail, "0.0.0.0 is a listen address, not a destination: use the CPM's IP")
    return K.ok("cpm address", detail)


def agent_facts(cfg: DaemonConfig) -> tuple[str, str | None]:
    """(family sent in Register, transfer-set hash). Both hashes are exact and need no
    torch: the synthetic world is cheap to build, and an ML agent's transfer set is drawn
    from the built-in task set by (n_agents, seed) alone (``tasks.partition_for``). None
    only when the agent's data is not the built-in set."""
    model = cfg.agent.model
    if model == "synthetic":
        from knexad.agents import build_agent

        agent = build_agent(cfg)
        return agent.family, agent.transfer_set_hash()
    return _ml_family(model), _ml_transfer_hash(cfg)


def _ml_transfer_hash(cfg: DaemonConfig) -> str | None:
    if cfg.agent.data != "builtin":
        return None
    from knexad.agent import tasks  # numpy only

    return tasks.partition_for(cfg.agent.n_agents, tasks.BUILTIN_ALPHA, cfg.agent.seed).transfer_set_hash()


def _ml_family(model: str) -> str:
    if model in TINY_MODELS:
        return model
    if model in ("smollm2", "smollm2-135m-instruct"):
        return "llama"
    cfg_json = Path(model).expanduser() / "config.json"
    try:
        model_type = json.loads(cfg_json.read_text()).get("model_type", "")
    except (OSError, ValueError):
        return "other"
    from knexad.agent.zoo import family_of  # torch: an ML agent needs it anyway

    return family_of(model_type)


# --- the CPM, over the network --------------------------------------------------------


async def check_cpm_replicas(cfg: DaemonConfig, seed: bytes, *, family: str, transfer_hash: str | None,
                             listen_addrs: tuple[str, ...], in_use: str | None) -> list[K.Check]:
    """``check_cpm`` on every configured CPM address. One address: its checks. Several
    (replicas, docs/operations.md "High availability"): one ``cpm replica N`` line per
    address — reachable or not, handshake and Register latency, which one the running
    daemon uses (``in_use``, from its status file) or, not running, which one it would
    start on (the first reachable in the configured order) — then the full checks of
    that one. An unreachable replica is a warning while another answers (the daemon
    fails over; redundancy is gone until it is back), a failure when none does."""
    addrs = cfg.cpm_addrs
    probes = []
    for addr in addrs:
        timing: dict[str, float] = {}
        checks = await check_cpm(cfg, seed, family=family, transfer_hash=transfer_hash, listen_addrs=listen_addrs,
                                 addr=addr, timing=timing)
        probes.append((addr, checks, timing))
    if len(addrs) == 1:
        return probes[0][1]
    answered = [i for i, (_a, _c, t) in enumerate(probes) if "register_ms" in t]
    chosen = (addrs.index(in_use) if in_use in addrs and addrs.index(in_use) in answered
              else answered[0] if answered else 0)
    out = []
    for i, (addr, checks, timing) in enumerate(probes):
        name, where = f"cpm replica {i + 1}", addr.split("/p2p/")[0]
        role = ("in use by the running daemon" if addr == in_use
                else "a starting daemon settles here (the first to answer, in the configured order)"
                if in_use is None and i == chosen and answered else "")
        if i in answered:
            detail = (f"{where}: reachable, handshake {timing['connect_ms']:.0f} ms, Register answered in "
                      f"{timing['register_ms']:.0f} ms" + (f"; {role}" if role else "")
                      + ("; checked in full below" if i == chosen else ""))
            out.append(K.ok(name, detail))
            continue
        first = next((c for c in checks if c.status == K.FAIL), None)
        why = first.detail if first is not None else "no answer"
        detail = f"{where}: not reachable: {why}" + (f"; {role}, it fails over to the next" if role else "")
        if answered:
            out.append(K.warn(name, detail, "the daemon fails over to the other replicas; until this one is back "
                              "it adds no redundancy: " + (first.hint if first is not None else "")))
        else:
            out.append(K.fail(name, detail, first.hint if first is not None else "", K.EXIT_UNREACHABLE))
    return out + probes[chosen][1]


async def check_cpm(cfg: DaemonConfig, seed: bytes, *, family: str, transfer_hash: str | None,
                    listen_addrs: tuple[str, ...], addr: str | None = None,
                    timing: dict[str, float] | None = None) -> list[K.Check]:
    """Dial (TCP + Noise), negotiate /knexa/cpm/1.0.0, send a signed Register and judge
    the answer: admission, clock skew, transfer set. Every step has a deadline. ``addr``:
    which of the CPM's addresses (default the first); ``timing`` receives the handshake
    (``connect_ms``) and Register round trip (``register_ms``, only if it was answered)."""
    import trio

    from knexad.cpm_client import AGENT_VERSION
    from p2p.host import build_host, parse_listen_addrs, parse_peer_addr
    from p2p.streams import NET_ERRORS, FramedStream
    from protocol.envelope import Identity, now_ms, open_envelope, seal
    from protocol.errors import Expired, Unauthorized, error_from_code
    from protocol.ids import CPM_PROTOCOL, MAX_FRAME_CPM
    from protocol.messages import Error, Register, Registered

    out: list[K.Check] = []
    ident = Identity(seed)
    addr = cfg.cpm if addr is None else addr
    timing = {} if timing is None else timing
    info = parse_peer_addr(addr, "cpm")
    cpm_id = info.peer_id.to_base58()
    dial_s, request_s = cfg.timeouts.dial_s, cfg.timeouts.request_s
    host = build_host(seed, dial_timeout_s=dial_s)
    rest = ("cpm protocol", "admission", "clock", "transfer set")

    def give_up(start: int, why: str) -> list[K.Check]:
        """The checks that need the failed step are skipped; the hash is still shown."""
        return out + [K.skip(n, why) for n in rest[start:-1]] + [_unchecked_transfer(transfer_hash, "not compared")]

    async with host.run(parse_listen_addrs([PROBE_LISTEN])):
        tcp_error = await _tcp_probe(addr, dial_s)
        if tcp_error is not None:
            out.append(K.fail("cpm dial", f"TCP to {addr.split('/p2p/')[0]}: {tcp_error}",
                              "is `knexa-cpm serve` running there and listening on that address/port? "
                              "firewall? (docs/operations.md: ports)", K.EXIT_UNREACHABLE))
            return give_up(0, "needs the CPM dial")
        started = time.monotonic()
        try:
            with trio.fail_after(dial_s):
                await host.connect(info)
        except (trio.TooSlowError, *NET_ERRORS) as exc:
            why = "timed out" if isinstance(exc, trio.TooSlowError) else type(exc).__name__
            out.append(K.fail("cpm dial", f"TCP connects, but the libp2p/Noise handshake with {cpm_id} failed ({why})",
                              "the /p2p/ id in `cpm` is probably not the key of the node at that address: compare "
                              "with `knexa-cpm peer-id --home <cpm-home>`", K.EXIT_UNREACHABLE))
            return give_up(0, "needs the CPM dial")
        timing["connect_ms"] = (time.monotonic() - started) * 1000
        out.append(K.ok("cpm dial", f"TCP + Noise handshake with {cpm_id} (identity verified)"))
        try:
            with trio.fail_after(dial_s):
                stream = await host.new_stream(info.peer_id, [CPM_PROTOCOL])
        except (trio.TooSlowError, *NET_ERRORS) as exc:
            out.append(K.fail("cpm protocol", f"{CPM_PROTOCOL} not negotiated: {type(exc).__name__}",
                              "the node at that address is not a KNEXA CPM of protocol version 1",
                              K.EXIT_UNREACHABLE))
            return give_up(1, "needs the CPM protocol")
        framed = FramedStream(stream, MAX_FRAME_CPM)
        register = Register(org=cfg.org, family=family, listen_addrs=listen_addrs, agent_version=AGENT_VERSION)
        sent_ms, started = now_ms(), time.monotonic()
        try:
            with trio.fail_after(request_s):
                try:
                    await framed.write_frame(seal(register, ident))
                except KnexaError:
                    pass  # an unadmitted peer is refused before the CPM reads; its answer waits
                raw = await framed.read_frame()
        except (trio.TooSlowError, KnexaError, *NET_ERRORS) as exc:
            await framed.reset()
            out.append(K.fail("cpm protocol", f"no answer to Register within {request_s} s: {exc!r}"[:300],
                              "look at the CPM's log (cpm.rejected / cpm.internal_error)", K.EXIT_UNREACHABLE))
            return give_up(1, "needs an answer")
        recv_ms, elapsed_s = now_ms(), time.monotonic() - started
        await framed.close()
        if raw is None:
            out.append(K.fail("cpm protocol", "the CPM closed the stream without answering",
                              "look at the CPM's log", K.EXIT_UNREACHABLE))
            return give_up(1, "needs an answer")
        try:
            _env, reply = open_envelope(raw, expected_sender=cpm_id, allowed=(Registered, Error))
        except KnexaError as exc:
            out.append(K.fail("cpm protocol", f"answer refused: {exc.code}: {exc}",
                              "the CPM's answer is not signed by the configured CPM key", K.EXIT_RUNTIME))
            return give_up(1, "needs a valid answer")
        timing["register_ms"] = elapsed_s * 1000  # a signed answer from this address: it is reachable
        out.append(K.ok("cpm protocol", f"{CPM_PROTOCOL} negotiated, answer signed by the CPM"))
        if isinstance(reply, Error):
            err = error_from_code(reply.code, reply.message)
            if isinstance(err, Unauthorized):
                out.append(K.fail("admission", f"{ident.peer_id} is not admitted (or revoked) at the CPM",
                                  f"the CPM operator runs: knexa-cpm admit {ident.peer_id} --org {cfg.org} "
                                  "--home <cpm-home>", K.EXIT_UNAUTHORIZED))
            elif isinstance(err, Expired):
                out.append(K.fail("admission", f"the CPM refused our timestamp: {reply.message}",
                                  "this clock is more than 120 s off the CPM's: enable NTP (timedatectl "
                                  "set-ntp true / chrony)", K.EXIT_RUNTIME))
            else:
                out.append(K.fail("admission", f"Register refused: {reply.code}: {reply.message}",
                                  "look at the CPM's log (cpm.rejected)", K.EXIT_RUNTIME))
            return give_up(2, "needs a Registered answer")
        assert isinstance(reply, Registered)
        out.append(K.ok("admission", f"admitted; CPM round {reply.round}"))
        out.append(_skew_check(reply.cpm_time_ms, sent_ms, recv_ms))
        out.append(_transfer_check(reply.transfer_hash, transfer_hash))
    return out


def _unchecked_transfer(ours: str | None, why: str) -> K.Check:
    """Without a Registered answer the hash cannot be compared, but the operator still
    needs it (the CPM's ``transfer_hash`` must equal it)."""
    if ours is None:
        return K.skip("transfer set", f"{why}; this agent's data is not the built-in set: its hash is known at start "
                      "(log cpm.transfer_hash_mismatch)")
    return K.skip("transfer set", f"{why}; this agent's hash is {ours}")


async def _tcp_probe(maddr: str, timeout_s: float) -> str | None:
    """Plain TCP connect to the CPM's address: tells "nothing listens there / filtered"
    apart from "something answers but is not that CPM". None when it connects."""
    import trio

    parts = maddr.strip("/").split("/")
    if len(parts) < 4 or parts[0] not in ("ip4", "ip6", "dns", "dns4", "dns6") or parts[2] != "tcp":
        return None  # an address shape we do not probe; the libp2p dial will tell
    try:
        with trio.fail_after(timeout_s):
            stream = await trio.open_tcp_stream(parts[1], int(parts[3]))
    except trio.TooSlowError:
        return f"no answer within {timeout_s} s (host down or packets dropped by a firewall)"
    except OSError as exc:
        return f"{exc.strerror or exc} (nothing listens there, or a firewall rejects it)"
    await stream.aclose()
    return None


def _skew_check(cpm_ms: int, sent_ms: int, recv_ms: int) -> K.Check:
    """Compare the CPM clock with the midpoint of our request (error ≤ half the RTT)."""
    skew_s = (cpm_ms - (sent_ms + recv_ms) / 2) / 1000
    text = f"CPM clock {skew_s:+.2f} s from ours (±{(recv_ms - sent_ms) / 2000:.2f} s); window ±{REPLAY_WINDOW_S:.0f} s"
    if abs(skew_s) >= REPLAY_WINDOW_S:
        return K.fail("clock", text, "enable NTP on both hosts (timedatectl set-ntp true / chrony)")
    if abs(skew_s) >= OK_SKEW_S:
        return K.warn("clock", text, "close to the replay window: enable NTP on both hosts")
    return K.ok("clock", text)


def _transfer_check(cpm_hash: str, ours: str | None) -> K.Check:
    if ours is None:
        return K.skip("transfer set", f"CPM uses {cpm_hash[:16]}…; this agent's data is not the built-in set "
                      "(checked at start)")
    if cpm_hash and cpm_hash != ours:
        return K.fail("transfer set", f"CPM uses {cpm_hash[:16]}…, this agent {ours[:16]}…",
                      f"the CPM operator sets transfer_hash = \"{ours}\" in its config.toml (or every daemon "
                      "uses the same agent settings)", K.EXIT_CONFIG)
    return K.ok("transfer set", f"{ours[:16]}… matches the CPM")


# --- orchestration --------------------------------------------------------------------



def check_accelerator(needed: bool, name: str = "accelerator") -> K.Check:
    """CUDA devices via the ML agent's zoo (torch stays inside knexad/agent/), imported
    only when the configured model needs torch — it takes seconds."""
    if not needed:
        return K.skip(name, "not needed by this agent (no torch)")
    if importlib.util.find_spec("torch") is None:
        return K.fail(name, "torch is not installed but the configured model needs it",
                      "pip install 'knexa[ml]' (it pins torch==2.13.0; for a CUDA build install that torch "
                      "version from the PyTorch index first), or use agent.model = \"synthetic\"", K.EXIT_CONFIG)
    from knexad.agent.zoo import accelerator_summary

    return K.ok(name, accelerator_summary())

def run_checks(home: Path, env: Mapping[str, str] | None = None) -> list[K.Check]:
    """Every check in dependency order; a failed prerequisite turns dependants into skips."""
    import trio

    env = dict(os.environ if env is None else env)
    home = Path(home)
    out = [K.check_home(home)]
    cfg_check, cfg = check_config(home, env)
    out.append(cfg_check)
    env_check = check_env(env)
    if env_check is not None:
        out.append(env_check)
    key_path = home / KEY_FILE

    def peer_of(seed: bytes) -> str:
        from protocol.envelope import Identity

        return Identity(seed).peer_id

    out.append(K.check_key_file(key_path, peer_of))
    state = read_state(home) if home.is_dir() else None
    running = state is not None and state.status != "stopped" and pid_alive(state.pid)
    out.append(_process_check(state, running))
    if cfg is None:
        return out + [K.skip(n, "needs a valid config") for n in ("listen", "cpm address", "cpm dial")]
    out += K.check_bindable(cfg.listen, running_pid=state.pid if running and state else None)
    wildcard = [a for a in cfg.listen if a.startswith(("/ip4/0.0.0.0/", "/ip6/::/"))]
    if wildcard:
        out.append(K.warn("reachability", f"{', '.join(wildcard)} is registered at the CPM as-is, and students "
                          "on other hosts cannot dial a wildcard address",
                          "listen on this host's routable address, e.g. /ip4/<host-ip>/tcp/4002 "
                          "(docs/operations.md: ports, NAT)"))
    addr_check = check_cpm_address(cfg)
    out.append(addr_check)
    seed = K.read_seed(key_path)
    if addr_check.status == K.FAIL or seed is None:
        out.append(K.skip("cpm dial", "needs a valid CPM address and key"))
    else:
        try:
            family, transfer_hash = agent_facts(cfg)
        except (ConfigError, ImportError, ValueError, OSError) as exc:
            out.append(K.fail("agent", f"cannot build the configured agent: {exc}",
                              "fix [agent] in config.toml", K.EXIT_CONFIG))
            family, transfer_hash = "other", None
        # the same addresses the daemon registered (its circuit address included), so the
        # doctor's Register does not replace them at the CPM
        listen_addrs = (tuple(state.advertised if state.advertised is not None else state.addrs)
                        if running and state else ())
        in_use = (state.cpm_addr or None) if running and state else None
        out += trio.run(functools.partial(check_cpm_replicas, cfg, seed, family=family, transfer_hash=transfer_hash,
                                          listen_addrs=listen_addrs, in_use=in_use))
    out.append(check_network(state, running, cfg))
    out.append(K.check_metrics(cfg.metrics_port, running=running, marker="knexad_round",
                               flag="metrics_port in config.toml or KNEXA_METRICS_PORT"))
    out.append(check_outbox(home, running))
    ml = cfg.agent.model != "synthetic"
    out.append(check_accelerator(ml))
    out.append(K.check_memory(warn_below=(2 if ml else 0.25) * K.GIB, purpose="ML agent" if ml else "synthetic agent"))
    out.append(K.check_disk(home, warn_below=(2 if ml else 0.5) * K.GIB, fail_below=100 * K.MIB,
                            purpose="checkpoints, outbox"))
    return out


def check_network(state: Any, running: bool, cfg: DaemonConfig) -> K.Check:
    """Reachability as the CPM's dial-back saw the running daemon, and its relay
    reservation (docs/networking.md). Private with a reservation works — peers reach it
    over the CPM's relay or a hole punch; private without one is unreachable."""
    if not running or state is None:
        return K.skip("network", "reachability is measured by the running daemon")
    relay = ("relay reservation held" if state.relay_reserved
             else "no relay reservation" if cfg.network.relay else "relay off (network.relay = false)")
    paths = ", ".join(f"{k} {v}" for k, v in sorted(state.paths.items())) or "no exchange yet"
    detail = f"reachability {state.reachability}; {relay}; paths: {paths}"
    if state.reachability == "public":
        return K.ok("network", detail)
    if state.reachability == "private" and state.relay_reserved:
        return K.ok("network", detail + " (peers reach this daemon through the CPM's relay or a hole punch)")
    if state.reachability == "private":
        return K.warn("network", detail + ": students cannot reach this daemon",
                      "open the listen port to the peers, or set network.relay = true (the CPM relays by default)")
    return K.warn("network", detail + ": the CPM has not answered a dial-back yet",
                  "wait for the first registration; a CPM with relay = false serves no dial-back")


def check_outbox(home: Path, running: bool) -> K.Check:
    """Feedback not yet acknowledged by the CPM, and records the daemon set aside."""
    box = home / OUTBOX_DIR
    pending = sorted(box.glob("*.fb")) if box.is_dir() else []
    rejected = sorted(box.glob("*.rejected")) if box.is_dir() else []
    corrupt = sorted(box.glob("*.corrupt")) if box.is_dir() else []
    if corrupt:
        return K.warn("outbox", f"{len(corrupt)} unreadable feedback record(s) set aside in {box}",
                      "look at the outbox.corrupt log lines; the files can be deleted once inspected")
    if rejected:
        return K.warn("outbox", f"{len(rejected)} feedback record(s) refused by the CPM ({box}/*.rejected)",
                      "look at cpm.feedback.rejected in the daemon log (e.g. sent under a rotated key)")
    if pending and not running:
        return K.warn("outbox", f"{len(pending)} feedback record(s) wait for the CPM",
                      "start the daemon: it delivers them first")
    return K.ok("outbox", f"{len(pending)} feedback record(s) pending")


def _process_check(state: Any, running: bool) -> K.Check:
    if state is None:
        return K.ok("daemon", "not started yet in this home")
    if running:
        return K.ok("daemon", f"running (pid {state.pid}), status {state.status}; the CPM checks below reuse "
                              "its identity and may make it reconnect once")
    if state.status == "stopped":
        return K.ok("daemon", f"stopped cleanly (last pid {state.pid})")
    return K.warn("daemon", f"pid {state.pid} is gone without a clean stop (last status {state.status}; "
                            f"last error: {state.last_error or '-'})",
                  "check `journalctl -u knexad@…` or its stderr; `knexad run` restarts it safely")


@click.command("doctor")
@click.option("--home", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Daemon home directory to diagnose.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor_command(home: Path, as_json: bool) -> None:
    """Check config, key, ports, CPM reachability, admission, clock, GPU, disk.

    One line per check (ok / WARN / FAIL / skip) with a fix. Exit code: the first
    failing check's (3 config, 4 CPM unreachable, 5 not admitted, 1 other); 0 when
    there are only warnings.
    """
    from p2p.logs import configure_logging

    configure_logging("console", level="error", stream=sys.stderr)  # libp2p noise off
    started = time.monotonic()
    results = run_checks(home)
    if as_json:
        click.echo(K.to_json(results))
    else:
        K.render(f"knexad doctor — {home} ({time.monotonic() - started:.1f} s)", results, click.echo)
    sys.exit(K.exit_code(results))


# --- config show ----------------------------------------------------------------------


@click.group("config")
def config_group() -> None:
    """Inspect the effective configuration."""


@config_group.command("show")
@click.option("--home", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Daemon home directory.")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of TOML.")
def config_show(home: Path, as_json: bool) -> None:
    """Print the configuration the daemon would run with: config.toml + defaults +
    KNEXA_* environment overrides (listed first). Exit 3 if it is invalid."""
    env = dict(os.environ)
    try:
        cfg = load_config(home, env)
    except ConfigError as exc:
        click.echo(f"config error: {exc}", err=True)
        sys.exit(K.EXIT_CONFIG)
    applied, unknown = env_overrides(env)
    thash = agent_facts(cfg)[1]  # the CPM's transfer_hash must equal it
    if as_json:
        data = asdict(cfg)
        data["listen"] = list(cfg.listen)
        click.echo(json.dumps({"config": data, "env_overrides": applied, "env_ignored": unknown,
                               "transfer_hash": thash}, indent=2))
        return
    click.echo(f"# effective configuration of {config_path(home)}")
    for var, key in applied.items():
        click.echo(f"# {key} = {env[var]!r}  (from {var})")
    for var in unknown:
        click.echo(f"# ignored: {var} is not a knexad setting")
    if thash is not None:
        click.echo(f"# agent transfer-set hash: {thash}  (the CPM's transfer_hash must equal it)")
    click.echo(cfg.to_toml(), nl=False)
