"""docs/operations.md, replayed: the trial federations a new operator types in, command by
command, from the page itself.

Why: an onboarding page that drifted from the binaries is the first thing a new member
meets. The test does not restate the commands — it parses the ``sh`` blocks between
``<!-- replay: NAME … -->`` and ``<!-- /replay -->`` and runs them in order in one temp
directory, so a changed page is a changed test. The page's own conventions are the
protocol:

* a command whose comment says ``# terminal N`` stays in the foreground for a reader: it
  runs in the background here, and the replay waits for its first line on stdout (both
  ``knexa-cpm serve`` and ``knexad run`` print their address once listening);
* ``<!-- replay-wait: CMD -->`` is where a reader waits ("a few seconds"): CMD is retried
  until it exits 0, while the background processes must stay alive;
* every other command must exit 0; shell state (``cd``, ``CPM_ADDR=…``) carries over;
* the only substitution is the page's fixed ports (``/tcp/4001`` …), replaced by free
  loopback ports.

Then the test checks what the page promises: the CPM recorded a student's feedback for a
round, and ``kill`` stops every process with exit 0. The synthetic trial (§2) runs in the
default suite; the ML one (tiny models, minutes on this CPU) is ``slow``.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import BIN_DIR, ManagedProcess, ProcessManager, e2e_env, run_cli
from tests.e2e.test_daemon_round import free_port

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
BLOCK = re.compile(r"^```sh\n(.*?)^```[ \t]*$|<!--\s*replay-wait:\s*(.*?)\s*-->", re.S | re.M)
TERMINAL = re.compile(r"#\s*terminal\s+\d")
PORT = re.compile(r"(?<=/tcp/)(\d{4,5})\b")


@dataclass(frozen=True, slots=True)
class Step:
    kind: str  # run | background | wait
    command: str


def shell_commands(block: str) -> list[str]:
    """The commands of one ``sh`` block: continuation lines joined, comment-only and
    blank lines dropped (a trailing comment stays: it is how ``# terminal`` is marked)."""
    out, pending = [], ""
    for line in block.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((pending + line).strip())
        pending = ""
    assert not pending, f"dangling continuation in: {block!r}"
    return out


def doc_steps(name: str, text: str | None = None) -> list[Step]:
    """The replay section ``name`` of docs/operations.md as steps, in page order."""
    text = DOC.read_text(encoding="utf-8") if text is None else text
    start = re.search(rf"<!--\s*replay:\s*{re.escape(name)}\b.*?-->", text, re.S)
    assert start is not None, f"docs/operations.md has no <!-- replay: {name} --> section"
    end = text.index("<!-- /replay -->", start.end())
    steps = []
    for m in BLOCK.finditer(text[start.end():end]):
        if m.group(2) is not None:
            steps.append(Step("wait", m.group(2)))
            continue
        steps += [Step("background" if TERMINAL.search(c) else "run", c) for c in shell_commands(m.group(1))]
    return steps


class Replay:
    """One reader's shell: a working directory and exported variables that carry over
    from command to command, plus the processes left running in other "terminals"."""

    def __init__(self, root: Path, procs: ProcessManager, **env: str) -> None:
        self.cwd = root
        self.env = e2e_env(PATH=f"{BIN_DIR}:{e2e_env()['PATH']}", **env)
        self.procs = procs
        self.state = root / ".replay-state"
        self.state.mkdir()
        self.ports: dict[str, str] = {}
        self.background: list[ManagedProcess] = []
        self.log: list[str] = []

    def substitute(self, command: str) -> str:
        return PORT.sub(lambda m: self.ports.setdefault(m.group(1), str(free_port())), command)

    def _bash(self, command: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return run_cli(["bash", "-c", command], env=self.env, timeout=timeout, cwd=self.cwd)

    def run(self, command: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run one command in the reader's shell; it must exit 0. ``set -a`` exports its
        assignments, so the next command sees them like the reader's shell would."""
        cwd_file, env_file = self.state / "cwd", self.state / "env"
        script = (f"set -a -e -o pipefail\n{command}\nset +a\npwd > {cwd_file}\nenv -0 > {env_file}\n")
        done = self._bash(script, timeout)
        self.log.append(f"$ {command}\n{done.stdout}{done.stderr}")
        assert done.returncode == 0, f"{command!r} exited {done.returncode}:\n{done.stdout}\n{done.stderr}\n{self.tails()}"
        self.cwd = Path(cwd_file.read_text().strip())
        self.env = dict(kv.split("=", 1) for kv in env_file.read_text().split("\0") if "=" in kv)
        return done

    def start(self, command: str, timeout: float) -> ManagedProcess:
        """A ``# terminal N`` command: in the background, up once it printed a line."""
        p = self.procs.start(["bash", "-c", f"exec {command}"], name=f"terminal-{len(self.background) + 1}",
                             env=self.env, cwd=self.cwd)
        self.background.append(p)
        deadline = time.monotonic() + timeout
        while not p.stdout().strip():
            assert p.alive, f"{command!r} exited {p.returncode} before printing its address:\n{p.stderr()[-3000:]}"
            assert time.monotonic() < deadline, f"{command!r} printed nothing within {timeout} s:\n{p.stderr()[-3000:]}"
            time.sleep(0.2)
        return p

    def wait(self, command: str, timeout: float) -> None:
        """A reader's pause: retry ``command`` until it exits 0; the servers must live."""
        deadline = time.monotonic() + timeout
        while self._bash(command, 60).returncode != 0:
            dead = [p.name for p in self.background if not p.alive]
            assert not dead, f"{dead} died while waiting for {command!r}:\n{self.tails()}"
            assert time.monotonic() < deadline, f"{command!r} never succeeded within {timeout} s:\n{self.tails()}"
            time.sleep(0.5)

    def play(self, steps: list[Step], *, start_timeout: float, wait_timeout: float) -> None:
        for step in steps:
            command = self.substitute(step.command)
            if step.kind == "background":
                self.start(command, start_timeout)
            elif step.kind == "wait":
                self.wait(command, wait_timeout)
            else:
                self.run(command)

    def stop_all(self) -> list[int]:
        """``kill`` each background process (SIGTERM), last started first."""
        return [p.send_signal(signal.SIGTERM, timeout=120) for p in reversed(self.background)]

    def tails(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.stderr()[-2000:]}" for p in self.background)


def _feedback_recorded(replay: Replay) -> list[dict[str, Any]]:
    """The CPM's pairs with a student's feedback, read as the page's reader would."""
    pairs = json.loads(replay.run("knexa-cpm pairs --home cpm --json").stdout)
    return [p for p in pairs if p.get("ok") is not None]


def _replay_and_check(name: str, tmp_path: Path, procs: ProcessManager, *, start_timeout: float,
                      wait_timeout: float, **env: str) -> Replay:
    steps = doc_steps(name)
    assert [s.kind for s in steps].count("background") >= 3 and any(s.kind == "wait" for s in steps)
    replay = Replay(tmp_path, procs, **env)
    replay.play(steps, start_timeout=start_timeout, wait_timeout=wait_timeout)
    done = _feedback_recorded(replay)
    assert done and done[0]["round"] >= 1 and done[0]["ok"] is True, done
    assert {done[0]["teacher"], done[0]["student"]} == {replay.run(f"knexad peer-id --home {h}").stdout.strip()
                                                        for h in ("org-a", "org-b")}
    assert sorted(replay.ports) == ["4001", "4002", "4003"]  # the page's ports, all replaced
    report = replay.cwd / "report" / "report.json"
    if report.exists():  # the page asks for the report after the round: it shows that round's feedback
        rows = json.loads(report.read_text())["rounds"]
        assert any(r["feedback"] >= 1 for r in rows) and (replay.cwd / "report" / "rounds.png").is_file()
    assert replay.stop_all() == [0] * len(replay.background), replay.tails()  # `kill` → exit 0
    return replay


def test_doc_steps_follow_the_page_conventions() -> None:
    """The parser: continuations joined, comments dropped, terminals and waits found."""
    page = """intro
<!-- replay: t — notes -->
```sh
a --x 1 \\
    --y 2          # first
# only a comment

b --home h         # terminal 1; prints its address
```
<!-- replay-wait: c | grep -q x -->
```sh
d
```
<!-- /replay -->
```sh
not-this
```
"""
    assert doc_steps("t", page) == [Step("run", "a --x 1      --y 2          # first"),
                                    Step("background", "b --home h         # terminal 1; prints its address"),
                                    Step("wait", "c | grep -q x"), Step("run", "d")]


def test_synthetic_trial_of_the_operations_page(tmp_path: Path, procs: ProcessManager) -> None:
    """§2: CPM + two synthetic members on one machine, exactly as the page says."""
    replay = _replay_and_check("synthetic-trial", tmp_path, procs, start_timeout=120, wait_timeout=180)
    assert (replay.cwd / "report" / "report.json").is_file()


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_ml_trial_of_the_operations_page(tmp_path: Path, procs: ProcessManager) -> None:
    """§2's ML variant: two members with tiny models (bases from ``~/.cache/knexa``, built
    on first use), the CPM set to their transfer-set hash, one round with feedback."""
    _replay_and_check("ml-trial", tmp_path, procs, start_timeout=1800, wait_timeout=1800)
