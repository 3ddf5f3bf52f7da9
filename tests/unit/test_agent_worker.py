"""AgentWorker says which agent call holds the thread — also after its caller gave up —
so a daemon stopping mid-training can log what it waits for (``daemon.stopping``)."""

from __future__ import annotations

import threading

import pytest
import trio

from knexad.agents import AgentTimeout, AgentWorker


async def test_running_names_the_call_until_its_thread_returns() -> None:
    release, started = threading.Event(), threading.Event()

    def learn() -> str:
        started.set()
        release.wait(10)
        return "done"

    worker = AgentWorker(object())
    assert worker.running is None
    with pytest.raises(AgentTimeout):  # the caller gives up; the thread cannot be interrupted
        await worker.call(learn, timeout_s=0.05, what="learn")
    assert started.wait(10)
    assert worker.running == "learn"
    release.set()
    with trio.fail_after(10):
        while worker.running is not None:
            await trio.sleep(0.01)
    assert await worker.call(lambda: "saved", timeout_s=10, what="save") == "saved"
    assert worker.running is None
