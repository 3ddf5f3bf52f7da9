"""benchmarks/stream.py runs end to end on a small payload and reports every figure.

The knexa modes drive the daemon's own ``send_knowledge``/``receive_knowledge`` in
each wire version and raise if the student's size or digest check fails, so a finished run is also an
integrity check of the pipelined path over real hosts; the yamux frame override must
not leak out of the run, and the interference mode (bare beside the crypto threads)
must start and stop its threads.
"""

from __future__ import annotations

import threading

import pytest
from libp2p.stream_muxer.yamux import yamux

from benchmarks import stream


def test_small_run_reports_all_modes_and_restores_yamux() -> None:
    before, threads = yamux.MAX_MESSAGE_SIZE, threading.active_count()
    out = stream.run(mib=2, repeats=2, yamux_frame_kib=128, interference=True)
    assert out["bytes"] == 2 * 1024 * 1024
    assert out["yamux_frame_bytes"] == 128 * 1024
    assert set(out["MB_per_s"]) == {"raw_tcp", "bare", "knexa", "knexa_1.0", "knexa_1.1", "bare_beside_crypto"}
    assert all(len(v) == 2 for v in out["seconds"].values())  # every mode timed in every repeat
    assert 0 < out["ratio_bare_beside_crypto_vs_bare"]
    assert all(v > 0 for v in out["MB_per_s"].values())
    assert out["knexa_wire"] == "1.1" and out["MB_per_s"]["knexa"] == out["MB_per_s"]["knexa_1.1"]
    assert out["ratio_knexa_vs_bare"] == out["ratio_knexa_1.1_vs_bare"] > 0
    assert out["ratio_knexa_1.0_vs_bare"] > 0 and out["ratio_knexa_1.1_vs_1.0"] > 0
    assert out["connect_ms_median"] > 0 and len(out["load_avg"]) == 2
    assert set(out["cpu_ms_per_mib"]) == {"bare", "knexa_1.0", "knexa_1.1"}
    assert all(v > 0 for v in out["cpu_ms_per_mib"].values())
    cpu = out["cpu_ms_per_mib"]
    for wire in ("1.0", "1.1"):  # CPU ratio = bare's CPU per MiB / the wire's (rounded figures: 1 %)
        assert out[f"cpu_ratio_knexa_{wire}_vs_bare"] == pytest.approx(cpu["bare"] / cpu[f"knexa_{wire}"], rel=0.01)
    assert set(out["box_cpu_ms_per_mib"]) == {"seal", "open"} and min(out["box_cpu_ms_per_mib"].values()) > 0
    # every libp2p transfer reports the sender's zero-window count (py-libp2p's stream attribute)
    assert all(len(v) == 2 and all(isinstance(w, int) for w in v) for v in out["zero_window_waits"].values())
    assert yamux.MAX_MESSAGE_SIZE == before
    assert threading.active_count() <= threads + 2  # trio's idle thread cache may remain


def test_one_wire_and_a_bad_wire_name() -> None:
    out = stream.run(mib=1, repeats=1, wires=("1.0",))
    assert set(out["MB_per_s"]) == {"raw_tcp", "bare", "knexa", "knexa_1.0"} and out["knexa_wire"] == "1.0"
    assert "ratio_knexa_1.1_vs_1.0" not in out
    with pytest.raises(ValueError, match="--wire"):
        stream.run(mib=1, repeats=1, wires=("2.0",))


def test_inline_ablation_runs_the_wire_without_worker_threads_and_restores_trio() -> None:
    import trio

    real = trio.to_thread.run_sync
    with stream._inline_threads(True):
        assert trio.to_thread.run_sync is not real
        assert trio.run(trio.to_thread.run_sync, threading.get_ident) == threading.get_ident()  # on this thread
    assert trio.to_thread.run_sync is real
    out = stream.run(mib=1, repeats=1, wires=("1.1",), inline=True)
    assert out["MB_per_s"]["knexa_1.1_inline"] > 0 and out["cpu_ms_per_mib"]["knexa_1.1_inline"] > 0
    assert trio.to_thread.run_sync is real


def test_json_output_parses_with_the_daemons_malloc_setting(capsys) -> None:
    """``--json`` prints one document on stdout, whatever the run logs (logging goes to
    stderr: the malloc line once printed before the document), and says whether the
    daemon's buffer setting was in force."""
    import json

    import structlog

    try:
        assert stream.main(["--mib", "1", "--repeats", "1", "--wire", "1.1", "--json"]) == 0
    finally:
        structlog.reset_defaults()
    doc = json.loads(capsys.readouterr().out)
    assert doc["malloc_tuned"] in (True, False) and doc["ratio_knexa_vs_bare"] > 0
