"""Generate docs/configuration.md and docs/cli.md from the code, so they cannot drift.

Sources of truth:

* configuration — the config dataclasses (``cpm.config.CpmConfig``, ``knexad.config.
  DaemonConfig`` and its section dataclasses): key, type (the annotation), default (an
  instance's value, rendered as TOML), meaning (``DESCRIPTIONS`` below, else the
  trailing ``# comment`` on the field's line in the source);
* command line — the click command trees of ``knexad``, ``knexa-cpm`` and
  ``knexa-harness``: each command's ``--help`` text at a fixed width.

Usage::

    python tools/gen_config_docs.py          # rewrite both files
    python tools/gen_config_docs.py --check  # exit 1 if either is out of date

``tests/unit/test_config_docs.py`` runs the check; a key with no description at all
fails generation, so a new setting cannot land undocumented.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import tomli_w

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG_MD = ROOT / "docs" / "configuration.md"
CLI_MD = ROOT / "docs" / "cli.md"
HELP_WIDTH = 100

# Curated meanings; where a key is missing here the field's trailing source comment is used.
DESCRIPTIONS: dict[str, str] = {
    # knexa-cpm
    "cpm.listen": "Listen multiaddrs of the CPM host (`/ip4/<addr>/tcp/<port>`). Daemons dial the address printed by `serve`; pin the port (e.g. 4001) in production so the address is stable.",
    "cpm.strategy": "Matching strategy: `linucb`, `random`, `heuristic`, `local-only`, `central-kd` (`oracle` exists only in the simulator).",
    "cpm.seed": "Strategy RNG seed; the generator of round r is seeded with `[seed, r]`, so a restart replays the same choices.",
    "cpm.k_pairs": "Pairs per round; 0 = as many as possible (N // 2).",
    "cpm.quorum": "Fraction of *active* admitted agents that must have sent a fresh profile before the round is matched.",
    "cpm.min_agents": "The quorum also needs at least this many fresh profiles (≥ 2).",
    "cpm.round_timer_s": "Seconds after the first fresh profile of a round after which the round is matched with what is there (≥ 2 profiles).",
    "cpm.active_window_s": "An admitted agent seen (any request) within this many seconds counts as active for the quorum.",
    "cpm.directive_ttl_s": "Directive lifetime: `expires_at_ms = issued_at_ms + ttl`. The teacher refuses an expired directive.",
    "cpm.max_rounds": "Stop after this many rounds (the CPM then answers `finished`); 0 = unlimited.",
    "cpm.open_admission": "Admit every peer that registers. For a local harness only; revoked peers stay out.",
    "cpm.admins": "Peer IDs allowed on `/knexa/admin/1.0.0` (`knexa-cpm … --remote MADDR --key FILE`).",
    "cpm.arms": "Distillation protocol arms k the strategy chooses from: a list of tables `{alpha, temperature, n_samples, items}` (`items` = transfer prompts per directive, 0 = all).",
    "cpm.transfer_size": "Size of the shared transfer set.",
    "cpm.transfer_hash": "SHA-256 of the shared transfer set; every Profile must carry exactly this value. Set it to the hash your daemons compute (`knexad doctor` prints it).",
    "cpm.log_format": "`auto` (JSON unless stderr is a TTY), `console` or `json`. `serve --log-format` overrides.",
    "cpm.metrics_port": "Prometheus `/metrics` on 127.0.0.1:port; 0 = off. `serve --metrics-port` overrides.",
    "cpm.request_timeout_s": "Deadline for reading one request frame and for writing one response.",
    "cpm.store": "Where the CPM keeps its state. Empty: `<home>/cpm.db` (SQLite, WAL). `sqlite:PATH` (relative to the home) or a PostgreSQL URL `postgresql://user@host:5432/db` (needs the `postgres` extra; the database must exist; no password here — use `~/.pgpass`). `init --store` sets it, `serve --store` overrides; docs/cpm.md \"Store backends\".",
    # knexad
    "knexad.cpm": "The CPM's multiaddr **including** `/p2p/<cpm-peer-id>`: that ID is the key every directive must be signed with. Required. A list (`cpm = [\"…\", \"…\"]`, `init --cpm` repeated) names the replicas of one CPM (same peer ID): a request that gets no answer moves to the next (docs/operations.md, \"High availability\").",
    "knexad.org": "Organisation label sent in `Register` (shown by `knexa-cpm agents`).",
    "knexad.listen": "Listen multiaddrs (no `/p2p/`). They are registered at the CPM and given to the students that dial this daemon as teacher, so they must be reachable from the other members (not 127.0.0.1 across hosts).",
    "knexad.log_format": "`auto` (JSON unless stderr is a TTY), `console` or `json`. `run --log-format` overrides.",
    "knexad.metrics_port": "Prometheus `/metrics` on 127.0.0.1:port; 0 = off (docs/operations.md lists the metrics).",
    "knexad.on_unauthorized": "`exit`: exit 5 when the CPM says not admitted; `retry`: keep retrying with backoff (e.g. while waiting for the CPM operator).",
    "knexad.agent.model": "`synthetic` (numeric stand-in, no torch), `tiny-qwen2`, `tiny-gpt2`, `tiny-neox`, `tiny-bloom` (offline tiny LMs), or the path of a Hugging Face causal-LM directory.",
    "knexad.agent.data": "Data spec handed to the agent; the ML agent supports `builtin` only.",
    "knexad.agent.index": "This agent's slot in the population partition (non-IID split of the built-in data), 0 … n_agents − 1.",
    "knexad.agent.n_agents": "Population size the partition is drawn for; every daemon of a federation uses the same value.",
    "knexad.agent.seed": "Seed of the population partition (and of the synthetic agents); the same on every daemon of a federation, or their transfer sets differ.",
    "knexad.limits.max_frame": "Largest exchange frame accepted, checked on the length prefix before reading (64 KiB … 4 MiB). The CPM protocol always uses 256 KiB.",
    "knexad.limits.chunk_bytes": "Plaintext bytes per encrypted chunk (`KnowledgeBox`, or `KnowledgeChunk` in exchange 1.0.0; ≤ max_frame − 4 KiB).",
    "knexad.limits.max_package_bytes": "The student refuses larger knowledge packages; the teacher refuses to send them.",
    "knexad.retry.base_s": "First reconnect delay; doubles per failure: `min(max_s, base_s·2ⁿ)·(1 − jitter·U[0,1))`.",
    "knexad.retry.max_s": "Cap of the reconnect delay.",
}


# --- configuration ---------------------------------------------------------------------


def _field_comments(cls: type) -> dict[str, str]:
    """Trailing ``# comment`` of each field line in the class source."""
    source = textwrap.dedent(inspect.getsource(cls))
    tree = ast.parse(source)
    body = tree.body[0]
    assert isinstance(body, ast.ClassDef)
    lines = {node.lineno: node.target.id for node in body.body
             if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}
    out: dict[str, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and tok.start[0] in lines:
            out[lines[tok.start[0]]] = tok.string.lstrip("#").strip()
    return out


def _annotation(cls: type, name: str) -> str:
    source = textwrap.dedent(inspect.getsource(cls))
    for node in ast.parse(source).body[0].body:  # type: ignore[attr-defined]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            text = ast.unparse(node.annotation)
            return {"tuple[str, ...]": "list[str]", "list[Arm]": "list[table]"}.get(text, text)
    raise KeyError(name)


def _toml_value(value: Any) -> str:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, (list, tuple)):
        value = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
        if value and isinstance(value[0], dict):
            return "[" + ", ".join("{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in d.items()) + "}"
                                   for d in value) + "]"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = tomli_w.dumps({"v": value}).strip()
    return text[len("v = "):] if text.startswith("v = ") else text


def _describe(doc_key: str, comments: dict[str, str], name: str) -> str:
    text = DESCRIPTIONS.get(doc_key) or comments.get(name, "")
    if not text:
        raise SystemExit(f"gen_config_docs: no description for {doc_key!r}: add a trailing comment to the "
                         f"field or an entry in DESCRIPTIONS")
    return text.replace("|", "\\|")


def _rows(prefix: str, cls: type, instance: Any, section: str = "", env: bool = False) -> Iterator[str]:
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type) and f.name != "arms":
            continue  # sections get their own table
        key = f"{section}.{f.name}" if section else f.name
        default = "— (required)" if (prefix == "knexad" and key == "cpm") else f"`{_toml_value(value)}`"
        env_col = ""
        if env:
            var = f"KNEXA_{section.upper()}_{f.name.upper()}" if section else f"KNEXA_{f.name.upper()}"
            env_col = f" `{var}` |"
        yield (f"| `{key}` | {_annotation(cls, f.name)} | {default} |{env_col} "
               f"{_describe(f'{prefix}.{key}', comments, f.name)} |")


def render_configuration() -> str:
    from cpm.config import CpmConfig
    from knexad.config import DaemonConfig

    out = [
        "# Configuration reference",
        "",
        "<!-- GENERATED by tools/gen_config_docs.py from cpm/config.py and knexad/config.py: do not edit;",
        "     run `python tools/gen_config_docs.py` (tests/unit/test_config_docs.py checks it). -->",
        "",
        "Both binaries read `<home>/config.toml` (TOML) at start. Unknown keys and wrong types are",
        "errors: the command exits 3 and names the key (`config error: timeouts.dial_s: …`).",
        "`knexad config show --home DIR` / `knexa-cpm config show --home DIR` print the effective",
        "configuration with every default filled in; `… doctor --home DIR` validates it and more.",
        "",
        "## knexa-cpm (`<cpm-home>/config.toml`)",
        "",
        "Written by `knexa-cpm init` (flags set the common keys). `serve --listen/--strategy/",
        "--log-format/--metrics-port` override for one run. The CPM reads no environment variables.",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
        *_rows("cpm", CpmConfig, CpmConfig()),
        "",
        "## knexad (`<daemon-home>/config.toml`)",
        "",
        "Written by `knexad init`. Top-level keys, then one table per section (`[agent]`,",
        "`[limits]`, `[timeouts]`, `[retry]`).",
        "",
        "**Environment overrides.** Every key can be overridden for one run by an environment",
        "variable: `KNEXA_<KEY>` for top-level keys, `KNEXA_<SECTION>_<KEY>` for section keys",
        "(column *env*). The value is parsed as a TOML scalar when it is one (`KNEXA_AGENT_INDEX=3`,",
        "`KNEXA_TIMEOUTS_DIAL_S=2.5`, `KNEXA_LISTEN='[\"/ip4/0.0.0.0/tcp/4002\"]'`), otherwise taken as a",
        "string (`KNEXA_CPM=/ip4/…/p2p/…`; a single string for `listen` becomes a one-element list).",
        "Overrides are validated like the file. `knexad config show` lists the overrides in effect;",
        "`knexad doctor` warns about `KNEXA_*` variables that are not settings (typos).",
        "`KNEXA_CACHE` (not a setting) moves the model cache (default `~/.cache/knexa`).",
        "",
    ]
    sample = DaemonConfig(cpm="")
    header = ["| key | type | default | env | meaning |", "|---|---|---|---|---|"]
    out += ["### top level", "", *header, *_rows("knexad", DaemonConfig, sample, env=True), ""]
    for f in dataclasses.fields(DaemonConfig):
        value = getattr(sample, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out += [f"### [{f.name}]", "", *header,
                    *_rows("knexad", type(value), value, section=f.name, env=True), ""]
    return "\n".join(out).rstrip() + "\n"


# --- command line ----------------------------------------------------------------------

EXIT_CODES = """\
| code | meaning (every command of every binary) |
|---|---|
| 0 | ok (also: `run`/`serve` stopped by SIGINT/SIGTERM; `doctor` with warnings only) |
| 1 | runtime error (e.g. a listen port in use, a failed run) |
| 2 | usage error (unknown option, bad argument) |
| 3 | configuration error: bad/missing `config.toml` (the message names the key), key file, database, transfer-set mismatch |
| 4 | cannot reach a peer / the CPM (`knexad` after `timeouts.give_up_s`; `--remote`; `doctor`) |
| 5 | not admitted / unauthorized at the CPM |
"""


def _walk(chain: list[tuple[str, click.Command]]) -> Iterator[list[tuple[str, click.Command]]]:
    """Depth-first over a command tree; each item is the (name, command) chain from the root."""
    yield chain
    name, cmd = chain[-1]
    if isinstance(cmd, click.Group):
        ctx = click.Context(cmd, info_name=name)
        for sub_name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, sub_name)
            if sub is not None and not sub.hidden:
                yield from _walk([*chain, (sub_name, sub)])


def _help(chain: list[tuple[str, click.Command]]) -> str:
    """``--help`` of the last command, with the real parent contexts (inherited settings
    such as ``-h``) at a fixed width, so the text does not depend on the terminal."""
    ctx: click.Context | None = None
    for _, cmd in chain:
        # click ≥ 8.1.8 caches a command's help option on first use; a command invoked
        # standalone earlier in the process (CliRunner in tests) would otherwise keep
        # `--help` without the parent's `-h`, and the text would depend on history
        if hasattr(cmd, "_help_option"):
            cmd._help_option = None
    for name, cmd in chain:
        settings = {k: v for k, v in cmd.context_settings.items() if k not in ("terminal_width", "max_content_width")}
        ctx = click.Context(cmd, info_name=name, parent=ctx, terminal_width=HELP_WIDTH,
                            max_content_width=HELP_WIDTH, **settings)
    assert ctx is not None
    return chain[-1][1].get_help(ctx)


def binaries() -> list[tuple[str, Callable[[], click.Command]]]:
    def knexad() -> click.Command:
        from knexad.cli import main

        return main

    def cpm() -> click.Command:
        from cpm.cli import cli

        return cli

    def harness() -> click.Command:
        from harness.cli import main

        return main

    return [("knexad", knexad), ("knexa-cpm", cpm), ("knexa-harness", harness)]


def render_cli() -> str:
    out = [
        "# Command-line reference",
        "",
        "<!-- GENERATED by tools/gen_config_docs.py from the click commands: do not edit;",
        "     run `python tools/gen_config_docs.py` (tests/unit/test_config_docs.py checks it). -->",
        "",
        "Three binaries: `knexad` (one per organisation), `knexa-cpm` (the matchmaker) and",
        "`knexa-harness` (local multi-process runs and benchmarks). Every command accepts `-h/--help`.",
        "",
        "## Exit codes",
        "",
        EXIT_CODES,
        "## Logs",
        "",
        "Long-running commands log structured events to stderr: JSON lines when stderr is not a",
        "terminal, a console format on a terminal (`--log-format console|json` forces one).",
        "Event names are dotted (`exchange.package.sent`) with stable keys (`peer`, `round`,",
        "`directive`, `bytes`, `duration_ms`, `error`); see docs/operations.md.",
        "",
    ]
    for binary, load in binaries():
        root = load()
        out += [f"## {binary}", ""]
        for chain in _walk([(binary, root)]):
            title = " ".join(name for name, _ in chain)
            out += [f"### `{title}`", "", "```text", _help(chain).rstrip(), "```", ""]
    return "\n".join(out).rstrip() + "\n"


# --- main ------------------------------------------------------------------------------


def outputs() -> dict[Path, str]:
    return {CONFIG_MD: render_configuration(), CLI_MD: render_cli()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated file is out of date")
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current != text:
            stale.append(path)
            if not args.check:
                path.write_text(text, encoding="utf-8")
    if args.check and stale:
        names = ", ".join(str(p.relative_to(ROOT)) for p in stale)
        print(f"out of date: {names}; run `python tools/gen_config_docs.py`", file=sys.stderr)
        return 1
    for path in stale:
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
