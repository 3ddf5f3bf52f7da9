"""p2p.files: atomic replacement, exact modes, no temp left behind, stale-temp cleanup."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from p2p import files


def test_atomic_write_replaces_content_and_sets_exact_mode(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")
    old_umask = os.umask(0o077)
    try:
        files.atomic_write(target, "new ✓", mode=0o644)
    finally:
        os.umask(old_umask)
    assert target.read_text(encoding="utf-8") == "new ✓"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_failed_write_keeps_old_content_and_removes_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "cfg.toml"
    target.write_bytes(b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(files.os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        files.atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.toml"]


def test_remove_stale_temps_only_touches_our_temps(tmp_path: Path) -> None:
    keep = tmp_path / "a.fb"
    (tmp_path / "keep.toml").write_bytes(b"y")
    keep.write_bytes(b"x")
    stale = files.temp_path(tmp_path / "b.fb")
    stale.write_bytes(b"half")
    assert stale.name.startswith(".") and stale.name.endswith(files.TEMP_SUFFIX)
    assert files.remove_stale_temps(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.fb", "keep.toml"]
