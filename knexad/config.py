"""knexad configuration: one TOML file per home directory, validated on load.

Why a strict loader: a daemon that starts with a typo in a timeout or a CPM address
without ``/p2p/`` fails later in a confusing way (an unauthenticated dial, a hung round).
Every value is checked here and a bad one raises ``ConfigError(key, …)`` naming the
dotted key, which the CLI maps to exit code 3.

Layout of ``<home>/config.toml`` (see docs/knexad.md for the full table)::

    org = "org-a"
    cpm = "/ip4/127.0.0.1/tcp/4001/p2p/12D3Koo…"
    listen = ["/ip4/127.0.0.1/tcp/0"]
    log_format = "auto"        # auto | console | json
    metrics_port = 0           # 0 = no Prometheus endpoint
    on_unauthorized = "exit"   # exit (code 5) | retry
    [agent]   model, data, index, n_agents, seed, budget, local_when_idle
    [limits]  max_frame, chunk_bytes, max_package_bytes, rate_limit_per_s, rate_limit_burst
    [timeouts] dial_s, request_s, long_poll_s, exchange_step_s, teach_s, learn_s, give_up_s
    [retry]   base_s, max_s, jitter
    [network] relay, advertise, holepunch, direct_dial_s, reachability

Environment overrides: ``KNEXA_<KEY>`` for top-level keys (``KNEXA_CPM``) and
``KNEXA_<SECTION>_<KEY>`` for section keys (``KNEXA_TIMEOUTS_DIAL_S``); values are parsed
as TOML scalars when possible (``KNEXA_AGENT_INDEX=3``) and as strings otherwise.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import tomli_w

from p2p.files import atomic_write
from p2p.settings import expect_bool, expect_float, expect_int, expect_str
from protocol.errors import ConfigError
from protocol.ids import CHUNK_BYTES, MAX_FRAME_EXCHANGE

CONFIG_FILE = "config.toml"
KEY_FILE = "identity.key"
STATE_FILE = "state.json"
OUTBOX_DIR = "outbox"
USED_DIRECTIVES_FILE = "used_directives.log"  # taught (teacher side)
STUDIED_DIRECTIVES_FILE = "studied_directives.log"  # acted on (student side)
CHECKPOINT_DIR = "checkpoint"

LOG_FORMATS = ("auto", "console", "json")
ON_UNAUTHORIZED = ("exit", "retry")
ADVERTISE = ("all", "direct", "relay-only")
TINY_MODELS = ("tiny-qwen2", "tiny-gpt2", "tiny-neox", "tiny-bloom")
# names of knexad.agent.ml_agent.BUDGETS (kept here so validation needs no torch; a unit
# test checks both lists agree)
AGENT_BUDGETS = ("fast", "standard", "thorough")
AGENT_REWARD_MEASURES = ("val_pass", "val_loss")  # knexad.agent.ml_agent.REWARD_MEASURES (no torch here)
ENV_PREFIX = "KNEXA_"


@dataclass(frozen=True, slots=True)
class AgentSection:
    model: str = "synthetic"  # synthetic | tiny-* | path to an HF model directory
    data: str = "builtin"  # data spec handed to the agent (builtin | humaneval | mbpp:PATH …)
    index: int = 0  # this agent's index in the population (non-IID partition slot)
    n_agents: int = 2  # population size the partition was drawn for
    seed: int = 0
    budget: str = "standard"  # ML agent's local LoRA / KD steps: fast 100/60, standard 200/150, thorough 400/300.
    verify_knowledge: bool = True  # Execution-verified distillation: a teacher sends, and a student trains on, only completions that pass their transfer task's public tests in its own sandbox.
    reward_measure: str = "val_pass"  # What an ML student reports as validation loss before/after KD (Eq. 3): val_pass = error rate 1 − pass@1 on its validation split (sandboxed), val_loss = token cross-entropy.
    replay_knowledge: bool = True  # Idle rounds (teacher, unpaired) train their local steps with the items accepted in earlier KD rounds as Eq. 2's L_KD term, so what was taught is rehearsed, not overwritten (same steps). Off: private data only, as the v1 table of docs/results.md §6 ran.
    local_when_idle: bool = True  # In a round without distillation (teacher, unpaired, failed exchange) train a KD round's steps on private data: a gain over LocalOnly is then knowledge, not extra steps.


@dataclass(frozen=True, slots=True)
class LimitsSection:
    max_frame: int = MAX_FRAME_EXCHANGE
    chunk_bytes: int = CHUNK_BYTES
    max_package_bytes: int = 256 * 1024 * 1024
    rate_limit_per_s: float = 1.0  # KnowledgeRequests per peer per second, sustained (0 = off)
    rate_limit_burst: float = 10.0  # KnowledgeRequests a peer may send at once before the sustained rate applies


@dataclass(frozen=True, slots=True)
class TimeoutsSection:
    dial_s: float = 10.0  # connect + protocol negotiation to a peer or the CPM
    request_s: float = 15.0  # one CPM request/response (other than the long-poll)
    long_poll_s: float = 30.0  # DirectiveRequest wait_ms (the CPM caps it at 60 s)
    exchange_step_s: float = 60.0  # each read/write step of the exchange protocol
    teach_s: float = 600.0  # agent.teach (generation) on the teacher
    learn_s: float = 1800.0  # agent.learn (distillation) on the student
    give_up_s: float = 0.0  # >0: exit 4 when the CPM is unreachable this long; 0 = forever


@dataclass(frozen=True, slots=True)
class RetrySection:
    base_s: float = 0.5
    max_s: float = 30.0
    jitter: float = 0.5  # fraction of the delay drawn at random (0 … 1)


@dataclass(frozen=True, slots=True)
class NetworkSection:
    relay: bool = True  # keep a circuit relay v2 reservation on the CPM node and advertise the /p2p-circuit address (docs/networking.md)
    advertise: str = "all"  # addresses registered with the CPM: all (direct + circuit) | direct | relay-only (testing aid: pretend to be unreachable)
    holepunch: bool = True  # try DCUtR over a relayed connection before moving the package over the relay
    direct_dial_s: float = 3.0  # deadline for the direct attempt before the relayed path (the relayed one gets timeouts.dial_s)
    reachability: bool = True  # ask the CPM to dial back the direct addresses (AutoNAT) at start and after each re-reservation


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    cpm: str
    cpm_replicas: tuple[str, ...] = ()  # further addresses of the same CPM (its replicas), tried in turn when one fails; config.toml writes them into cpm = [first, …]
    org: str = "default"
    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    log_format: str = "auto"
    metrics_port: int = 0
    on_unauthorized: str = "exit"
    agent: AgentSection = field(default_factory=AgentSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    timeouts: TimeoutsSection = field(default_factory=TimeoutsSection)
    retry: RetrySection = field(default_factory=RetrySection)
    network: NetworkSection = field(default_factory=NetworkSection)

    @property
    def cpm_addrs(self) -> tuple[str, ...]:
        """Every address of the CPM, the configured order (``cpm`` first)."""
        return (self.cpm, *self.cpm_replicas)

    @property
    def cpm_peer_id(self) -> str:
        """The CPM's peer ID, from the mandatory ``/p2p/`` part of ``cpm``."""
        return self.cpm.rsplit("/p2p/", 1)[1].split("/", 1)[0]

    def to_toml(self) -> str:
        data = asdict(self)
        data["listen"] = list(self.listen)
        del data["cpm_replicas"]
        if self.cpm_replicas:  # several replicas: cpm = [first, …]
            data["cpm"] = list(self.cpm_addrs)
        return tomli_w.dumps(data)


_SECTIONS: dict[str, type] = {
    "agent": AgentSection,
    "limits": LimitsSection,
    "timeouts": TimeoutsSection,
    "retry": RetrySection,
    "network": NetworkSection,
}


# --- validation ------------------------------------------------------------------------


def validate_multiaddr(key: str, text: Any, *, need_peer: bool) -> str:
    """Parse with the multiaddr library (no libp2p import: keeps `knexad status` fast)."""
    import multiaddr  # local: only config validation needs it

    text = expect_str(key, text)
    try:
        addr = multiaddr.Multiaddr(text)
    except (ValueError, TypeError, multiaddr.exceptions.Error) as exc:
        raise ConfigError(key, f"invalid multiaddr {text!r}: {exc}") from None
    protos = [p.name for p in addr.protocols()]
    if need_peer:
        if "p2p" not in protos:
            raise ConfigError(key, f"must include /p2p/<peer-id> (the CPM's identity), got {text!r}")
        peer = text.rsplit("/p2p/", 1)[1].split("/", 1)[0]
        from protocol.peerid import public_key_from_peer_id

        try:
            public_key_from_peer_id(peer)
        except Exception as exc:  # noqa: BLE001 — any decode failure means a bad peer ID
            raise ConfigError(key, f"/p2p/ part is not an Ed25519 peer ID: {exc}") from None
    elif "p2p" in protos:
        raise ConfigError(key, f"listen address must not include /p2p/: {text!r}")
    return text


def validate_model(value: Any) -> str:
    model = expect_str("agent.model", value)
    if model == "synthetic" or model in TINY_MODELS:
        return model
    if model.startswith("tiny-"):
        raise ConfigError("agent.model", f"unknown tiny model {model!r} (known: {', '.join(TINY_MODELS)})")
    if not Path(model).expanduser().is_dir():
        raise ConfigError("agent.model", f"not synthetic, a tiny-* model or an existing directory: {model!r}")
    return model


def _check_keys(section: str, data: Mapping[str, Any], cls: type) -> None:
    known = {f.name for f in fields(cls)}
    for key in data:
        if key not in known:
            name = f"{section}.{key}" if section else str(key)
            raise ConfigError(name, "unknown key")


def from_mapping(data: Mapping[str, Any]) -> DaemonConfig:
    """Build and validate a config from parsed TOML (every error names its key)."""
    _check_keys("", data, DaemonConfig)
    if "cpm" not in data:
        raise ConfigError("cpm", "missing (the CPM's multiaddr with /p2p/<peer-id>)")
    extra = data.get("cpm_replicas", [])  # KNEXA_CPM_REPLICAS may add replicas to a file's cpm
    cpm_addrs = _cpm_addrs(_as_list("cpm", data["cpm"]) + _as_list("cpm_replicas", extra))
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        raw = data.get(name, {})
        if not isinstance(raw, Mapping):
            raise ConfigError(name, "must be a table")
        _check_keys(name, raw, cls)
        sections[name] = replace(cls(), **dict(raw))
    listen = data.get("listen", list(DaemonConfig.__dataclass_fields__["listen"].default))
    if isinstance(listen, str):
        listen = [listen]
    if not isinstance(listen, list) or not listen:
        raise ConfigError("listen", "must be a non-empty list of multiaddrs")
    cfg = DaemonConfig(
        cpm=cpm_addrs[0],
        cpm_replicas=cpm_addrs[1:],
        org=expect_str("org", data.get("org", "default")),
        listen=tuple(validate_multiaddr("listen", a, need_peer=False) for a in listen),
        log_format=expect_str("log_format", data.get("log_format", "auto"), LOG_FORMATS),
        metrics_port=expect_int("metrics_port", data.get("metrics_port", 0), 0, 65535),
        on_unauthorized=expect_str("on_unauthorized", data.get("on_unauthorized", "exit"), ON_UNAUTHORIZED),
        **sections,
    )
    _validate_sections(cfg)
    return cfg


def _as_list(key: str, value: Any) -> list[Any]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ConfigError(key, "must be a multiaddr or a list of multiaddrs")
    return list(value)


def _cpm_addrs(value: Any) -> tuple[str, ...]:
    """``cpm``: one multiaddr, or a list of the replicas' multiaddrs (docs/operations.md,
    "High availability"). Replicas share one identity, so every address must name the
    same ``/p2p/`` peer ID — the key directives are verified with."""
    items = value
    if not isinstance(items, list) or not items:
        raise ConfigError("cpm", "must be a multiaddr or a non-empty list of multiaddrs")
    addrs = tuple(validate_multiaddr("cpm", a, need_peer=True) for a in items)
    ids = {a.rsplit("/p2p/", 1)[1].split("/", 1)[0] for a in addrs}
    if len(ids) > 1:
        raise ConfigError("cpm", "every address must name the same CPM peer ID (replicas share one identity key)")
    if len(set(addrs)) != len(addrs):
        raise ConfigError("cpm", "an address is listed twice")
    return addrs


def _validate_sections(cfg: DaemonConfig) -> None:
    a, lim, t, r = cfg.agent, cfg.limits, cfg.timeouts, cfg.retry
    validate_model(a.model)
    expect_str("agent.data", a.data)
    expect_int("agent.n_agents", a.n_agents, 1)
    expect_int("agent.index", a.index, 0, a.n_agents - 1)
    expect_int("agent.seed", a.seed, 0)
    expect_str("agent.budget", a.budget, AGENT_BUDGETS)
    expect_bool("agent.local_when_idle", a.local_when_idle)
    expect_bool("agent.verify_knowledge", a.verify_knowledge)
    expect_str("agent.reward_measure", a.reward_measure, AGENT_REWARD_MEASURES)
    expect_bool("agent.replay_knowledge", a.replay_knowledge)
    expect_int("limits.max_frame", lim.max_frame, 64 * 1024, MAX_FRAME_EXCHANGE)
    # a sealed chunk = plaintext + msgpack wrapper + 40 B box + envelope: keep headroom
    expect_int("limits.chunk_bytes", lim.chunk_bytes, 1024, lim.max_frame - 4096)
    expect_int("limits.max_package_bytes", lim.max_package_bytes, lim.chunk_bytes)
    expect_float("limits.rate_limit_per_s", lim.rate_limit_per_s, 0.0, 1e6)
    expect_float("limits.rate_limit_burst", lim.rate_limit_burst, 1.0, 1e6)
    for name in ("dial_s", "request_s", "long_poll_s", "exchange_step_s", "teach_s", "learn_s"):
        expect_float(f"timeouts.{name}", getattr(t, name), 0.0, 86_400.0, lo_open=True)
    expect_float("timeouts.long_poll_s", t.long_poll_s, 0.0, 60.0, lo_open=True)
    expect_float("timeouts.give_up_s", t.give_up_s, 0.0, 86_400.0)
    expect_float("retry.base_s", r.base_s, 0.0, 3600.0, lo_open=True)
    expect_float("retry.max_s", r.max_s, r.base_s, 86_400.0)
    expect_float("retry.jitter", r.jitter, 0.0, 1.0)
    n = cfg.network
    for name in ("relay", "holepunch", "reachability"):
        expect_bool(f"network.{name}", getattr(n, name))
    expect_str("network.advertise", n.advertise, ADVERTISE)
    if n.advertise == "relay-only" and not n.relay:
        raise ConfigError("network.advertise", "relay-only needs network.relay = true")
    expect_float("network.direct_dial_s", n.direct_dial_s, 0.0, 600.0, lo_open=True)


# --- environment overrides ------------------------------------------------------------


def _parse_env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """Overlay ``KNEXA_<KEY>`` / ``KNEXA_<SECTION>_<KEY>`` variables onto parsed TOML."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    top = {f.name for f in fields(DaemonConfig)} - set(_SECTIONS)
    for name in top:
        var = ENV_PREFIX + name.upper()
        if var in env:
            value = _parse_env_value(env[var])
            out[name] = [value] if name == "listen" and isinstance(value, str) else value
    for section, cls in _SECTIONS.items():
        for f in fields(cls):
            var = f"{ENV_PREFIX}{section.upper()}_{f.name.upper()}"
            if var in env:
                out.setdefault(section, {})
                if not isinstance(out[section], dict):
                    raise ConfigError(section, "must be a table")
                value = _parse_env_value(env[var])
                if f.name in ("model", "data") and not isinstance(value, str):
                    value = env[var]
                out[section][f.name] = value
    return out


# --- files ----------------------------------------------------------------------------


def config_path(home: Path) -> Path:
    return Path(home) / CONFIG_FILE


def load_config(home: Path, env: Mapping[str, str] | None = None) -> DaemonConfig:
    """Read ``<home>/config.toml`` (+ env overrides) and validate it."""
    path = config_path(home)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("home", f"{path} not found (run `knexad init --home {home}` first)") from None
    except OSError as exc:
        raise ConfigError("home", f"cannot read {path}: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config.toml", f"invalid TOML: {exc}") from None
    return from_mapping(apply_env(data, os.environ if env is None else env))


def write_config(home: Path, cfg: DaemonConfig) -> Path:
    """Atomically write the config (temp file + rename) so a crash never leaves half a file."""
    path = config_path(home)
    atomic_write(path, cfg.to_toml(), mode=0o644)
    return path
