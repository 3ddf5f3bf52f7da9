"""p2p.memory: a daemon keeps freed megabyte buffers (glibc mallopt), and says when it
does not. The effect is measured, not asserted on time: a sealed chunk's minor page
faults (docs/performance.md, "What the stream's CPU is spent on")."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from structlog.testing import capture_logs

from p2p import memory

_FAULTS = """
import os, resource, sys
from p2p.memory import keep_freed_buffers
from protocol import E2EBox, Identity
from protocol.boxes import seal_box_frame
from protocol.ids import MAX_FRAME_EXCHANGE
if sys.argv[1] == "tuned":
    assert keep_freed_buffers()
box = E2EBox(Identity.generate(), Identity.generate().peer_id)
piece = memoryview(os.urandom(1 << 20))
for i in range(4):
    seal_box_frame(box, "d", i, piece, MAX_FRAME_EXCHANGE)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(20):
    seal_box_frame(box, "d", i, piece, MAX_FRAME_EXCHANGE)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def _faults_per_chunk(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in memory.GLIBC_ENV}
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True,
                         timeout=120, env=env)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(memory._mallopt() is None, reason="needs glibc's mallopt (Linux with glibc)")
def test_sealed_chunks_stop_faulting_in_new_pages() -> None:
    """glibc's defaults: hundreds of minor faults per sealed MiB (fresh pages every chunk);
    tuned: the same warm pages chunk after chunk."""
    default, tuned = _faults_per_chunk("default"), _faults_per_chunk("tuned")
    assert default > 100, default
    assert tuned < default / 10, (tuned, default)


def test_operator_variables_win_and_the_reason_is_logged(monkeypatch) -> None:
    monkeypatch.setattr(memory, "_mallopt", lambda: pytest.fail("must not touch malloc"))
    with capture_logs() as logs:
        assert memory.keep_freed_buffers({"MALLOC_TRIM_THRESHOLD_": "1"}) is False
    assert logs[0]["event"] == "memory.malloc.unchanged" and logs[0]["reason"] == "set_by_environment"


def test_without_glibc_nothing_changes(monkeypatch) -> None:
    monkeypatch.setattr(memory, "_mallopt", lambda: None)
    with capture_logs() as logs:
        assert memory.keep_freed_buffers({}) is False
    assert logs[0]["reason"] == "no_glibc_mallopt"


def test_a_refused_setting_is_a_warning(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(memory, "_mallopt", lambda: lambda opt, value: calls.append((opt, value)) or 0)
    with capture_logs() as logs:
        assert memory.keep_freed_buffers({}) is False
    assert calls[0] == (memory.M_MMAP_THRESHOLD, memory.MMAP_THRESHOLD)
    assert logs[0]["log_level"] == "warning" and logs[0]["reason"] == "mallopt_refused"

