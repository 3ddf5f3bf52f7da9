"""knexad config + identity + CLI usage: every bad key is exit 3 with the key named."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import pytest
import tomli_w
from click.testing import CliRunner

from knexad.cli import main
from knexad.config import DaemonConfig, apply_env, from_mapping, load_config
from knexad.identity import create_identity, load_identity
from protocol.envelope import Identity
from protocol.errors import ConfigError

CPM_ID = Identity(bytes(range(32))).peer_id
CPM = f"/ip4/127.0.0.1/tcp/4001/p2p/{CPM_ID}"


def init_home(tmp_path: Path, *extra: str) -> tuple[Path, object]:
    home = tmp_path / "home"
    result = CliRunner().invoke(main, ["init", "--home", str(home), "--cpm", CPM, *extra])
    return home, result


def test_init_writes_config_and_private_key(tmp_path: Path) -> None:
    home, result = init_home(tmp_path, "--org", "acme", "--agent-index", "1", "--n-agents", "4")
    assert result.exit_code == 0, result.output
    cfg = load_config(home, env={})
    assert cfg.cpm == CPM and cfg.cpm_peer_id == CPM_ID
    assert cfg.org == "acme" and cfg.agent.index == 1 and cfg.agent.n_agents == 4
    assert cfg.agent.model == "synthetic"
    key = home / "identity.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(key.read_bytes()) == 32
    # every documented section is materialised in the file
    data = tomllib.loads((home / "config.toml").read_text())
    assert {"agent", "limits", "timeouts", "retry", "listen", "on_unauthorized", "metrics_port"} <= set(data)

    peer = CliRunner().invoke(main, ["peer-id", "--home", str(home)])
    assert peer.exit_code == 0
    assert peer.output.strip() == load_identity(key).peer_id
    assert peer.output.strip() in result.output  # init shows the admit hint with it


def test_init_budget_and_rate_limits(tmp_path: Path) -> None:
    home, result = init_home(tmp_path, "--model", "tiny-gpt2", "--budget", "fast")
    assert result.exit_code == 0, result.output
    cfg = load_config(home, env={})
    assert cfg.agent.budget == "fast" and cfg.agent.model == "tiny-gpt2"
    assert cfg.limits.rate_limit_per_s == 1.0 and cfg.limits.rate_limit_burst == 10.0
    _, bad = init_home(tmp_path / "x", "--budget", "huge")
    assert bad.exit_code == 2  # usage error, nothing written
    assert not (tmp_path / "x" / "home" / "config.toml").exists()


def test_init_refuses_to_clobber_config(tmp_path: Path) -> None:
    home, first = init_home(tmp_path)
    key = (home / "identity.key").read_bytes()
    home, second = init_home(tmp_path)
    assert first.exit_code == 0 and second.exit_code == 3
    home, forced = init_home(tmp_path, "--force", "--org", "b")
    assert forced.exit_code == 0
    assert (home / "identity.key").read_bytes() == key  # the key is never replaced


@pytest.mark.parametrize(
    "args, key",
    [
        (["--cpm", "/ip4/127.0.0.1/tcp/4001"], "cpm"),  # no /p2p/
        (["--cpm", "not-a-multiaddr"], "cpm"),
        (["--model", "tiny-llama9"], "agent.model"),
        (["--model", "/nonexistent/model/dir"], "agent.model"),
        (["--agent-index", "5", "--n-agents", "2"], "agent.index"),
        (["--n-agents", "0"], "agent.n_agents"),
        (["--listen", "/ip4/127.0.0.1/tcp/0/p2p/" + CPM_ID], "listen"),
        (["--listen", "garbage"], "listen"),
        (["--org", " "], "org"),
    ],
)
def test_init_bad_values_exit_3_naming_the_key(tmp_path: Path, args: list[str], key: str) -> None:
    base = {"--cpm": CPM}
    argv = ["init", "--home", str(tmp_path / "h")]
    if "--cpm" not in args:
        argv += ["--cpm", base["--cpm"]]
    result = CliRunner().invoke(main, argv + args)
    assert result.exit_code == 3, result.output
    assert f"config error: {key}:" in result.output
    assert not (tmp_path / "h" / "config.toml").exists()


@pytest.mark.parametrize(
    "patch, key",
    [
        ({"timeouts": {"dial_s": 0}}, "timeouts.dial_s"),
        ({"timeouts": {"long_poll_s": 120}}, "timeouts.long_poll_s"),
        ({"timeouts": {"request_s": "fast"}}, "timeouts.request_s"),
        ({"timeouts": {"give_up_s": -1}}, "timeouts.give_up_s"),
        ({"retry": {"jitter": 1.5}}, "retry.jitter"),
        ({"retry": {"base_s": 5, "max_s": 1}}, "retry.max_s"),
        ({"limits": {"max_frame": 64 * 1024 * 1024}}, "limits.max_frame"),
        ({"limits": {"chunk_bytes": 8 * 1024 * 1024}}, "limits.chunk_bytes"),
        ({"limits": {"max_package_bytes": 10}}, "limits.max_package_bytes"),
        ({"log_format": "xml"}, "log_format"),
        ({"on_unauthorized": "ignore"}, "on_unauthorized"),
        ({"metrics_port": 70000}, "metrics_port"),
        ({"metrics_port": True}, "metrics_port"),
        ({"agent": {"seed": -1}}, "agent.seed"),
        ({"agent": {"colour": "red"}}, "agent.colour"),
        ({"typo_key": 1}, "typo_key"),
        ({"timeouts": 5}, "timeouts"),
    ],
)
def test_bad_config_file_exits_3_naming_the_key(tmp_path: Path, patch: dict, key: str) -> None:
    home, result = init_home(tmp_path)
    assert result.exit_code == 0
    data = tomllib.loads((home / "config.toml").read_text())
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k].update(v)
        else:
            data[k] = v
    (home / "config.toml").write_text(tomli_w.dumps(data))

    with pytest.raises(ConfigError) as info:
        load_config(home, env={})
    assert info.value.key == key
    for command in (["status", "--home", str(home)], ["run", "--home", str(home)]):
        out = CliRunner().invoke(main, command)
        assert out.exit_code == 3, (command, out.output)
        assert key in out.output


def test_missing_config_and_missing_cpm(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["status", "--home", str(tmp_path / "nothing")])
    assert result.exit_code == 3 and "home:" in result.output
    with pytest.raises(ConfigError) as info:
        from_mapping({"org": "x"})
    assert info.value.key == "cpm"
    (tmp_path / "config.toml").write_text("cpm = [unclosed")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, env={})
    assert info.value.key == "config.toml"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    home, result = init_home(tmp_path)
    key = home / "identity.key"
    os.chmod(key, mode)
    with pytest.raises(ConfigError) as info:
        load_identity(key)
    assert info.value.key == "identity" and "chmod 600" in str(info.value)
    for command in ("run", "peer-id"):
        out = CliRunner().invoke(main, [command, "--home", str(home)])
        assert out.exit_code == 3 and "identity" in out.output


def test_key_wrong_size_and_no_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "k"
    ident = create_identity(path)
    assert load_identity(path).peer_id == ident.peer_id
    with pytest.raises(ConfigError):
        create_identity(path)
    path.write_bytes(b"short")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError) as info:
        load_identity(path)
    assert info.value.key == "identity"


def test_env_overrides(tmp_path: Path) -> None:
    home, _ = init_home(tmp_path)
    other = Identity(bytes([7] * 32)).peer_id
    env = {
        "KNEXA_CPM": f"/ip4/127.0.0.1/tcp/5/p2p/{other}",
        "KNEXA_TIMEOUTS_DIAL_S": "2.5",
        "KNEXA_AGENT_INDEX": "1",
        "KNEXA_LISTEN": "/ip4/127.0.0.1/tcp/7000",
        "KNEXA_ON_UNAUTHORIZED": "retry",
    }
    cfg = load_config(home, env=env)
    assert cfg.cpm_peer_id == other
    assert cfg.timeouts.dial_s == 2.5 and cfg.agent.index == 1
    assert cfg.listen == ("/ip4/127.0.0.1/tcp/7000",) and cfg.on_unauthorized == "retry"
    with pytest.raises(ConfigError) as info:
        load_config(home, env={"KNEXA_RETRY_JITTER": "3"})
    assert info.value.key == "retry.jitter"
    assert apply_env({"cpm": "x"}, {}) == {"cpm": "x"}


def test_round_trip_of_defaults() -> None:
    cfg = DaemonConfig(cpm=CPM)
    again = from_mapping(tomllib.loads(cfg.to_toml()))
    assert again == cfg


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(main, ["init", "--home", str(tmp_path)]).exit_code == 2  # --cpm missing
    assert runner.invoke(main, ["bogus"]).exit_code == 2
    assert runner.invoke(main, ["run"]).exit_code == 2
    assert runner.invoke(main, ["status", "--home", str(tmp_path), "--nope"]).exit_code == 2


def test_status_without_state_is_runtime_error(tmp_path: Path) -> None:
    home, _ = init_home(tmp_path)
    out = CliRunner().invoke(main, ["status", "--home", str(home), "--json"])
    assert out.exit_code == 1 and "never_run" in out.output
