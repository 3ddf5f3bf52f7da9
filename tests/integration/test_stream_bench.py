"""benchmarks/stream.py runs end to end on a small payload and reports every figure.

The knexa mode drives the daemon's own ``send_knowledge``/``receive_knowledge`` and
raises if the student's size or SHA-256 check fails, so a finished run is also an
integrity check of the pipelined path over real hosts; the yamux frame override must
not leak out of the run, and the interference mode (bare beside the crypto threads)
must start and stop its threads.
"""

from __future__ import annotations

import threading

from libp2p.stream_muxer.yamux import yamux

from benchmarks import stream


def test_small_run_reports_all_modes_and_restores_yamux() -> None:
    before, threads = yamux.MAX_MESSAGE_SIZE, threading.active_count()
    out = stream.run(mib=2, repeats=1, yamux_frame_kib=128, interference=True)
    assert out["bytes"] == 2 * 1024 * 1024
    assert out["yamux_frame_bytes"] == 128 * 1024
    assert set(out["MB_per_s"]) == {"raw_tcp", "bare", "knexa", "bare_beside_crypto"}
    assert 0 < out["ratio_bare_beside_crypto_vs_bare"]
    assert all(v > 0 for v in out["MB_per_s"].values())
    assert 0 < out["ratio_knexa_vs_bare"] and out["connect_ms_median"] > 0
    assert yamux.MAX_MESSAGE_SIZE == before
    assert threading.active_count() <= threads + 2  # trio's idle thread cache may remain
