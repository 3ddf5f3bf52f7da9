"""docs/configuration.md and docs/cli.md are generated from the code and must not drift.

When one of these fails after a deliberate change to a config dataclass or a click
command, regenerate: ``python tools/gen_config_docs.py``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "tools" / "gen_config_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def test_configuration_md_is_up_to_date() -> None:
    current = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert current == gen.render_configuration(), "docs/configuration.md is stale: run python tools/gen_config_docs.py"


def test_cli_md_is_up_to_date() -> None:
    current = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert current == gen.render_cli(), "docs/cli.md is stale: run python tools/gen_config_docs.py"


def test_check_mode_reports_stale_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text("old\n")
    monkeypatch.setattr(gen, "outputs", lambda: {stale: "new\n"})
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    assert gen.main(["--check"]) == 1
    assert stale.read_text() == "old\n"  # --check never writes
    assert gen.main([]) == 0
    assert stale.read_text() == "new\n"


def test_every_cpm_key_is_documented_with_its_default() -> None:
    from cpm.config import CpmConfig

    text = gen.render_configuration().split("## knexad", 1)[0]
    cfg = CpmConfig()
    for f in dataclasses.fields(CpmConfig):
        row = next((line for line in text.splitlines() if line.startswith(f"| `{f.name}` |")), None)
        assert row is not None, f"{f.name} missing"
        if f.name not in ("arms",):
            assert gen._toml_value(getattr(cfg, f.name)) in row


def test_every_knexad_key_and_env_var_is_documented() -> None:
    from knexad.doctor import known_env_vars

    text = gen.render_configuration().split("## knexad", 1)[1]
    for var, key in known_env_vars().items():
        row = next((line for line in text.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, f"{key} missing"
        assert f"`{var}`" in row


def test_undocumented_key_fails_generation() -> None:
    @dataclasses.dataclass
    class NewSection:
        brand_new_knob: int = 3

    with pytest.raises(SystemExit, match="brand_new_knob"):
        list(gen._rows("knexad", NewSection, NewSection(), section="new"))


def test_every_command_of_every_binary_is_in_cli_md() -> None:
    text = gen.render_cli()
    for binary, load in gen.binaries():
        for chain in gen._walk([(binary, load())]):
            title = " ".join(name for name, _ in chain)
            assert f"### `{title}`" in text
    for command in ("knexad doctor", "knexad config show", "knexa-cpm doctor", "knexa-cpm serve"):
        assert f"### `{command}`" in text
    assert "| 5 | not admitted" in text


def test_every_event_metric_is_documented_in_operations_md() -> None:
    from p2p.metrics import metric_names

    ops = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    missing = [n for prefix in ("knexad", "knexa_cpm") for n in metric_names(prefix) if f"`{n}`" not in ops]
    assert not missing, f"add to docs/operations.md §6: {missing}"
