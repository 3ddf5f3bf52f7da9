"""CPM home directory: ``config.toml``, the identity seed and the SQLite file (unless
``store`` names another location, e.g. a PostgreSQL database).

Why one home directory: the operator (and ``knexa-cpm admit`` from another process) must
find the same key, settings and database without flags. The config is plain TOML, read
with ``tomllib`` and written with ``tomli_w``; every value is validated on load and a bad
one raises ``ConfigError`` naming the key (the CLI maps it to exit code 3), so a typo
fails at start-up instead of in the middle of a round.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from cpm.store import BACKENDS, has_password, scheme_of
from cpm.strategies import NODE_STRATEGIES, make_strategy
from p2p import keyfile
from p2p.files import atomic_write
from p2p.settings import expect_bool, expect_float, expect_int, expect_str, expect_str_list
from protocol.envelope import Identity
from protocol.errors import BadSignature, ConfigError
from protocol.profile import DEFAULT_ARMS, DEFAULT_TRANSFER_SIZE, ProtocolArm, synthetic_transfer_hash
from protocol.peerid import public_key_from_peer_id

CONFIG_FILE = "config.toml"
IDENTITY_FILE = "identity.key"
DB_FILE = "cpm.db"

# what a node can run, from the strategy registry (``oracle`` needs the simulator's truth)
STRATEGIES = NODE_STRATEGIES
LOG_FORMATS = ("auto", "console", "json")


def default_transfer_hash(transfer_size: int = DEFAULT_TRANSFER_SIZE) -> str:
    """The hash of the transfer set that a default ``knexad init`` daemon uses.

    Daemons must present the same value in every Profile. The default daemon model is
    ``synthetic``, so a CPM and daemons initialised with defaults work together out of
    the box; federations of ML agents pass the hash their agents compute
    (``knexad config show`` prints it; the harness does this) with
    ``knexa-cpm init --transfer-hash``.
    """
    return synthetic_transfer_hash(transfer_size)


@dataclass(slots=True)
class CpmConfig:
    listen: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    strategy: str = "linucb"
    strategy_params: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the strategy, e.g. {lam = 0.3, beta0 = 1.0} for linucb (cpm/strategies.py)
    seed: int = 0  # strategy RNG seed (per round: seed ⊕ round → restart-safe)
    k_pairs: int = 0  # 0 = as many as possible (N // 2)
    quorum: float = 1.0  # fraction of active admitted agents with a fresh profile
    min_agents: int = 2
    round_timer_s: float = 60.0  # after the first fresh profile of a round
    active_window_s: float = 600.0  # an agent silent for longer does not count for quorum
    directive_ttl_s: float = 120.0
    max_rounds: int = 0  # 0 = unlimited
    open_admission: bool = False
    admins: list[str] = field(default_factory=list)
    arms: list[ProtocolArm] = field(default_factory=lambda: list(DEFAULT_ARMS))
    transfer_size: int = DEFAULT_TRANSFER_SIZE
    transfer_hash: str = field(default_factory=default_transfer_hash)
    log_format: str = "auto"
    metrics_port: int = 0  # 0 = off
    request_timeout_s: float = 10.0  # per network step (read one frame, write one frame)
    rate_limit_per_s: float = 10.0  # per-peer sustained requests/s on /knexa/cpm (0 = off)
    rate_limit_burst: float = 50.0  # per-peer bucket size (requests allowed back to back)
    store: str = ""  # "" = <home>/cpm.db; "sqlite:PATH" (relative to the home) or "postgresql://user@host/db"
    relay: bool = True  # serve circuit relay v2 (+ AutoNAT dial-back) so daemons behind NAT are reachable (docs/networking.md)
    relay_max_reservations: int = 10_000  # daemons that may hold a relay reservation at once (every member reserves by default)
    relay_reservation_ttl_s: int = 3600  # a reservation's lifetime; daemons refresh at half of it
    relay_circuit_bytes: int = 128 * 1024 * 1024  # per relayed connection, both directions together (0 = unlimited)
    relay_circuit_duration_s: int = 600  # per relayed connection (0 = unlimited)
    lease_s: float = 0.0  # > 0: run as one of several replicas on a PostgreSQL store; the round lease's length (docs/operations.md)

    def to_toml(self) -> dict[str, Any]:
        data = asdict(self)
        data["arms"] = [asdict(a) for a in self.arms]
        return data


_FLOAT_KEYS = ("quorum", "round_timer_s", "active_window_s", "directive_ttl_s", "request_timeout_s",
               "rate_limit_per_s", "rate_limit_burst", "lease_s")
_INT_KEYS = ("seed", "k_pairs", "min_agents", "max_rounds", "transfer_size", "metrics_port",
             "relay_max_reservations", "relay_reservation_ttl_s", "relay_circuit_bytes", "relay_circuit_duration_s")


def validate_peer_id(peer_id: str, key: str = "peer_id") -> str:
    """A peer ID must be an inlined Ed25519 key (the only kind that can sign envelopes)."""
    try:
        public_key_from_peer_id(peer_id)
    except BadSignature as exc:
        raise ConfigError(key, f"invalid peer ID {peer_id!r}: {exc}") from None
    return peer_id


def _arms(value: Any, transfer_size: int) -> list[ProtocolArm]:
    if not isinstance(value, list) or not value:
        raise ConfigError("arms", "must be a non-empty list of {alpha, temperature, n_samples[, items]}")
    out = []
    for i, raw in enumerate(value):
        key = f"arms[{i}]"
        if not isinstance(raw, dict) or not {"alpha", "temperature", "n_samples"} <= set(raw):
            raise ConfigError(key, "needs alpha, temperature, n_samples")
        extra = set(raw) - {"alpha", "temperature", "n_samples", "items"}
        if extra:
            raise ConfigError(key, f"unknown keys {sorted(extra)}")
        arm = ProtocolArm(
            alpha=expect_float(f"{key}.alpha", raw["alpha"]),
            temperature=expect_float(f"{key}.temperature", raw["temperature"]),
            n_samples=expect_int(f"{key}.n_samples", raw["n_samples"]),
            items=expect_int(f"{key}.items", raw.get("items", 0)),
        )
        if not 0.0 <= arm.alpha <= 1.0:
            raise ConfigError(f"{key}.alpha", "must be in [0, 1]")
        if arm.temperature <= 0:
            raise ConfigError(f"{key}.temperature", "must be > 0")
        if arm.n_samples < 1:
            raise ConfigError(f"{key}.n_samples", "must be ≥ 1")
        if not 0 <= arm.items <= transfer_size:
            raise ConfigError(f"{key}.items", f"must be in [0, transfer_size={transfer_size}]")
        out.append(arm)
    return out


def config_from_dict(data: dict[str, Any]) -> CpmConfig:
    """Validate a parsed TOML table; unknown keys are errors (typos must not pass)."""
    cfg = CpmConfig()
    known = set(CpmConfig.__slots__)  # type: ignore[attr-defined]
    unknown = set(data) - known
    if unknown:
        raise ConfigError(sorted(unknown)[0], "unknown configuration key")
    for key in _INT_KEYS:
        if key in data:
            setattr(cfg, key, expect_int(key, data[key]))
    for key in _FLOAT_KEYS:
        if key in data:
            setattr(cfg, key, expect_float(key, data[key]))
    if "listen" in data:
        cfg.listen = expect_str_list("listen", data["listen"])
    if "admins" in data:
        cfg.admins = expect_str_list("admins", data["admins"])
    for key in ("strategy", "transfer_hash", "log_format", "store"):
        if key in data:
            setattr(cfg, key, expect_str(key, data[key], allow_empty=True))
    for key in ("relay", "open_admission"):
        if key in data:
            setattr(cfg, key, expect_bool(key, data[key]))
    if "arms" in data:
        cfg.arms = _arms(data["arms"], cfg.transfer_size)
    if "strategy_params" in data:
        if not isinstance(data["strategy_params"], dict):
            raise ConfigError("strategy_params", "must be a table of the strategy's keyword arguments")
        cfg.strategy_params = dict(data["strategy_params"])
    validate(cfg)
    return cfg


def validate(cfg: CpmConfig) -> None:
    if not cfg.listen:
        raise ConfigError("listen", "needs at least one multiaddr")
    if cfg.strategy not in STRATEGIES:
        raise ConfigError("strategy", f"must be one of {', '.join(STRATEGIES)}")
    try:  # the strategy's own constructor is the one check of its parameters
        make_strategy(cfg.strategy, **cfg.strategy_params)
    except (TypeError, ValueError) as exc:
        raise ConfigError("strategy_params", f"not accepted by {cfg.strategy}: {exc}") from None
    if cfg.k_pairs < 0:
        raise ConfigError("k_pairs", "must be ≥ 0 (0 = as many as possible)")
    if not 0.0 < cfg.quorum <= 1.0:
        raise ConfigError("quorum", "must be in (0, 1]")
    if cfg.min_agents < 2:
        raise ConfigError("min_agents", "must be ≥ 2 (a pair needs two agents)")
    for key in ("round_timer_s", "directive_ttl_s", "request_timeout_s", "active_window_s"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(key, "must be > 0")
    if cfg.max_rounds < 0:
        raise ConfigError("max_rounds", "must be ≥ 0 (0 = unlimited)")
    if cfg.rate_limit_per_s < 0:
        raise ConfigError("rate_limit_per_s", "must be ≥ 0 (0 = off)")
    if cfg.rate_limit_burst < 1:
        raise ConfigError("rate_limit_burst", "must be ≥ 1")
    if cfg.transfer_size < 1:
        raise ConfigError("transfer_size", "must be ≥ 1")
    if len(cfg.transfer_hash) != 64 or any(c not in "0123456789abcdef" for c in cfg.transfer_hash):
        raise ConfigError("transfer_hash", "must be a lowercase hex SHA-256 (64 chars)")
    if cfg.log_format not in LOG_FORMATS:
        raise ConfigError("log_format", f"must be one of {', '.join(LOG_FORMATS)}")
    if not 0 <= cfg.metrics_port <= 65535:
        raise ConfigError("metrics_port", "must be a TCP port (0 = off)")
    if cfg.relay_max_reservations < 1:
        raise ConfigError("relay_max_reservations", "must be ≥ 1")
    if cfg.relay_reservation_ttl_s < 60:
        raise ConfigError("relay_reservation_ttl_s", "must be ≥ 60")
    for key in ("relay_circuit_bytes", "relay_circuit_duration_s"):
        if getattr(cfg, key) < 0:
            raise ConfigError(key, "must be ≥ 0 (0 = unlimited)")
    for i, admin in enumerate(cfg.admins):
        validate_peer_id(admin, f"admins[{i}]")
    validate_store(cfg.store)
    if cfg.lease_s < 0:
        raise ConfigError("lease_s", "must be ≥ 0 (0 = a single node, no replicas)")
    if cfg.lease_s > 0 and scheme_of(cfg.store or "sqlite:cpm.db") == "sqlite":
        raise ConfigError("lease_s", "replicas need a PostgreSQL store (store = \"postgresql://…\"); "
                          "SQLite is single-node")
    for i, arm in enumerate(cfg.arms):
        if arm.items > cfg.transfer_size:
            raise ConfigError(f"arms[{i}].items", f"exceeds transfer_size={cfg.transfer_size}")


def validate_store(location: str, key: str = "store") -> str:
    """A store location this build can open, without a password: config.toml is
    world-readable (0644) and ``knexa-cpm config show`` prints it, so a database
    password goes to libpq's ``~/.pgpass`` (or ``PGPASSFILE``) instead."""
    if not location:
        return location
    scheme = scheme_of(location)
    if scheme not in BACKENDS:
        raise ConfigError(key, f"unknown store backend {scheme!r} (one of: sqlite:PATH, postgresql://…)")
    if has_password(location):
        raise ConfigError(key, "must not contain a password: put it in ~/.pgpass or PGPASSFILE (docs/cpm.md)")
    if scheme == "sqlite" and location.lower() in ("sqlite:", ""):
        raise ConfigError(key, "sqlite: needs a path")
    return location


# --- home directory --------------------------------------------------------------------


def config_path(home: Path) -> Path:
    return Path(home) / CONFIG_FILE


def db_path(home: Path) -> Path:
    return Path(home) / DB_FILE


def identity_path(home: Path) -> Path:
    return Path(home) / IDENTITY_FILE


def load_config(home: Path) -> CpmConfig:
    path = config_path(home)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError("home", f"{path} not found (run `knexa-cpm init --home {home}`)") from None
    except OSError as exc:
        raise ConfigError("home", f"cannot read {path}: {exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("config.toml", f"not valid TOML: {exc}") from None
    return config_from_dict(data)


def save_config(home: Path, cfg: CpmConfig) -> Path:
    validate(cfg)
    path = config_path(home)
    atomic_write(path, tomli_w.dumps(cfg.to_toml()).encode("utf-8"), mode=0o644)
    return path


def create_identity(home: Path) -> Identity:
    """New Ed25519 seed, written 0600 (the key is both the libp2p and the signing key)."""
    return keyfile.create_identity(identity_path(home))


def load_identity_file(path: Path, key: str = "identity") -> Identity:
    """Read a key file; group/world-accessible keys are refused (exit 3)."""
    return keyfile.load_identity(path, key=key, init_hint="knexa-cpm init")


def load_identity(home: Path) -> Identity:
    return load_identity_file(identity_path(home))
