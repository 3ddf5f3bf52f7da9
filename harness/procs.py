"""Process supervisor: real child processes that never outlive the harness.

Every child (CPM node, daemons, one-shot admin CLIs) starts in its **own session and
process group** (``start_new_session=True``), so a terminal Ctrl-C reaches only the
harness, which then shuts the federation down in order, and so that one ``killpg``
also takes any grandchild (the pass@k sandbox ``python -I``) with it.

Cleanup runs on every exit path we can catch:

* ``Supervisor`` is a context manager: ``__exit__`` stops all groups (SIGTERM, a grace
  period, then SIGKILL);
* SIGTERM/SIGHUP to the harness raise ``HarnessInterrupted`` (SIGINT already raises
  ``KeyboardInterrupt``), so the ``finally`` blocks above run;
* an ``atexit`` hook covers ``sys.exit`` from deep inside;
* on Linux each child also gets ``PR_SET_PDEATHSIG=SIGTERM``, which covers the one
  path no Python code sees: the harness itself being SIGKILLed.

``pids.json`` in the output directory lists every child ever started (name, pid, pgid,
argv), so tests and operators can verify afterwards that nothing survived.

``run_pack`` is the other side of ``--per-process K``: the body of one such child that
runs K daemons in its own interpreter.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from p2p.files import atomic_write
from p2p.process import ExitCode

log = structlog.get_logger(__name__)

_PR_SET_PDEATHSIG = 1


class HarnessInterrupted(Exception):
    """The harness received SIGTERM/SIGHUP; unwind and stop the children."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"received {signal.Signals(signum).name}")
        self.signum = signum


class ChildFailed(RuntimeError):
    """A child exited when it should not have (crash, bad config, not ready in time)."""

    def __init__(self, name: str, message: str, returncode: int | None = None, log_tail: str = "") -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.returncode = returncode
        self.log_tail = log_tail


def _set_pdeathsig() -> None:
    """Runs in the child between fork and exec: die with SIGTERM if the harness dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except OSError:
        pass


def tail(path: Path, max_bytes: int = 2000) -> str:
    """Last bytes of a log file, for error messages that say *why* a child failed."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


@dataclass(slots=True)
class Child:
    """One supervised process. ``pgid == pid`` because it leads its own group."""

    name: str
    role: str
    argv: list[str]
    popen: subprocess.Popen
    log_path: Path
    ready_file: Path | None = None
    started_at: float = field(default_factory=time.time)
    crash_reported: bool = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None


class Supervisor:
    """Starts children in their own process groups and guarantees they are stopped.

    ``grace_s`` is how long a child gets between SIGTERM and SIGKILL. ``env`` is merged
    over ``os.environ`` for every child.
    """

    def __init__(self, out_dir: Path, *, grace_s: float = 10.0, env: dict[str, str] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.logs_dir = self.out_dir / "logs"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.pids_path = self.out_dir / "pids.json"
        self.grace_s = grace_s
        self.env = {**os.environ, **(env or {})}
        self.children: list[Child] = []
        self._stopping = False
        self._stopped = False
        self._old_handlers: dict[int, object] = {}
        self._pids_lock = threading.Lock()
        # a log is started afresh by its first process in this run and appended to by a
        # restart of the same name: a failure's tail never shows an earlier run's lines
        self._logs_started: set[Path] = set()
        self._write_pids()

    # -- lifecycle ---------------------------------------------------------------
    def __enter__(self) -> Supervisor:
        atexit.register(self.stop_all)
        self._install_signal_handlers()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop_all()
        finally:
            self._restore_signal_handlers()
            atexit.unregister(self.stop_all)

    def _install_signal_handlers(self) -> None:
        if not _in_main_thread():
            return  # signal handlers can only be set from the main thread

        def _raise(signum: int, _frame: object) -> None:
            raise HarnessInterrupted(signum)

        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, _raise)

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._old_handlers.clear()

    # -- starting ----------------------------------------------------------------
    def _popen(
        self, name: str, argv: Sequence[str], log_path: Path, stdout: int | None = None, *, pdeathsig: bool = False
    ) -> subprocess.Popen:
        """``pdeathsig`` only for children started from the main thread: the kernel ties
        it to the *thread* that forked, and ``preexec_fn`` is unsafe in worker threads."""
        if self._stopping:
            raise HarnessInterrupted(signal.SIGTERM)
        logf = open(log_path, "ab" if log_path in self._logs_started else "wb")
        self._logs_started.add(log_path)
        try:
            logf.write(f"# {time.strftime('%H:%M:%S')} $ {' '.join(argv)}\n".encode())
            logf.flush()
            return subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=stdout if stdout is not None else logf,
                stderr=logf,
                env=self.env,
                start_new_session=True,
                preexec_fn=_set_pdeathsig if pdeathsig else None,
                close_fds=True,
            )
        finally:
            logf.close()  # the child holds its own copy of the descriptor

    def spawn(self, name: str, argv: Sequence[str], *, role: str = "daemon", ready_file: Path | None = None) -> Child:
        """Start a long-lived child; its stdout and stderr go to ``logs/<name>.log``."""
        log_path = self.logs_dir / f"{name}.log"
        if ready_file is not None:
            Path(ready_file).unlink(missing_ok=True)
        popen = self._popen(name, argv, log_path, pdeathsig=_in_main_thread())
        child = Child(name=name, role=role, argv=list(argv), popen=popen, log_path=log_path, ready_file=ready_file)
        self.children.append(child)
        self._write_pids()
        log.info("harness.proc.started", name=name, role=role, pid=popen.pid)
        return child

    def run(self, name: str, argv: Sequence[str], *, timeout_s: float = 60.0, check: bool = True) -> str:
        """Run a one-shot command (``knexa-cpm admit`` …) in its own group; return stdout.

        stderr goes to ``logs/<name>.log``. On timeout the group is killed. With
        ``check`` a non-zero exit raises ``ChildFailed`` carrying the log tail.
        """
        log_path = self.logs_dir / f"{name}.log"
        popen = self._popen(name, argv, log_path, stdout=subprocess.PIPE)
        child = Child(name=name, role="oneshot", argv=list(argv), popen=popen, log_path=log_path)
        self.children.append(child)
        self._write_pids()
        try:
            out, _ = popen.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._kill_group(popen.pid, signal.SIGKILL)
            popen.wait()
            raise ChildFailed(name, f"timed out after {timeout_s:.0f}s", None, tail(log_path)) from None
        except BaseException:
            self._kill_group(popen.pid, signal.SIGKILL)
            popen.wait()
            raise
        text = out.decode("utf-8", "replace")
        if check and popen.returncode != 0:
            raise ChildFailed(name, f"exited {popen.returncode}", popen.returncode, tail(log_path))
        return text

    def wait_ready(self, child: Child, timeout_s: float) -> str:
        """Block until ``child.ready_file`` holds content; fail fast if the child dies."""
        assert child.ready_file is not None, "child has no ready file"
        return self.wait_all_ready([child], timeout_s)[child.name]

    def wait_all_ready(self, children: Sequence[Child], timeout_s: float, on_tick=None) -> dict[str, str]:
        """Wait for many ready files at once (their startup overlaps); name → content."""
        deadline = time.monotonic() + timeout_s
        ready: dict[str, str] = {}
        pending = list(children)
        while pending:
            for child in list(pending):
                assert child.ready_file is not None
                text = _read_complete(child.ready_file)
                if text is not None:
                    ready[child.name] = text
                    pending.remove(child)
                elif not child.alive():
                    raise ChildFailed(
                        child.name, f"exited {child.returncode} before ready", child.returncode, tail(child.log_path)
                    )
            if on_tick is not None:
                on_tick(len(ready), len(children))
            if not pending:
                break
            if time.monotonic() > deadline:
                names = ", ".join(c.name for c in pending[:5])
                raise ChildFailed(names, f"not ready after {timeout_s:.0f}s", None, tail(pending[0].log_path))
            time.sleep(0.1)
        return ready

    # -- watching ----------------------------------------------------------------
    def new_crashes(self) -> list[Child]:
        """Long-lived children that exited on their own since the last call."""
        if self._stopping:
            return []
        out = []
        for child in self.children:
            if child.role != "oneshot" and not child.alive() and not child.crash_reported:
                child.crash_reported = True
                out.append(child)
                log.warning("harness.proc.crashed", name=child.name, pid=child.pid, returncode=child.returncode)
        return out

    # -- stopping ----------------------------------------------------------------
    @staticmethod
    def _kill_group(pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop_all(self) -> None:
        """SIGTERM every group (daemons before the CPM), wait ``grace_s``, then SIGKILL.

        Idempotent and safe to call from ``atexit``. A second Ctrl-C while waiting
        skips the rest of the grace period and goes straight to SIGKILL.
        """
        if self._stopped:
            return
        self._stopping = True
        try:
            order = [("oneshot",), ("daemon", "pack"), ("cpm",)]
            for roles in order:
                group = [c for c in self.children if c.role in roles]
                self._terminate(group)
            for child in self.children:  # sweep stragglers left in the groups (grandchildren)
                self._kill_group(child.pid, signal.SIGKILL)
        finally:
            self._stopped = True
            self._write_pids()

    def _terminate(self, group: list[Child]) -> None:
        live = [c for c in group if c.alive()]
        for child in live:
            self._kill_group(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        try:
            while any(c.alive() for c in live) and time.monotonic() < deadline:
                time.sleep(0.05)
        except (KeyboardInterrupt, HarnessInterrupted):
            pass
        for child in live:
            if child.alive():
                log.warning("harness.proc.killed", name=child.name, pid=child.pid, grace_s=self.grace_s)
                self._kill_group(child.pid, signal.SIGKILL)
        for child in live:
            try:
                child.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.error("harness.proc.unreaped", name=child.name, pid=child.pid)
            else:
                log.info("harness.proc.stopped", name=child.name, pid=child.pid, returncode=child.returncode)

    def _write_pids(self) -> None:
        with self._pids_lock:
            self._write_pids_locked()

    def _write_pids_locked(self) -> None:
        doc = {
            "harness": os.getpid(),
            "stopped": self._stopped,
            "children": [
                {"name": c.name, "role": c.role, "pid": c.pid, "pgid": c.pid, "argv": c.argv, "returncode": c.returncode}
                for c in self.children
            ],
        }
        atomic_write(self.pids_path, json.dumps(doc, indent=1), mode=0o644, durable=False)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _read_complete(path: Path) -> str | None:
    """Ready-file content once written; writers use write-then-rename or a trailing newline."""
    try:
        text = Path(path).read_text()
    except (FileNotFoundError, IsADirectoryError):
        return None
    text = text.strip()
    return text or None


@contextmanager
def supervised(out_dir: Path, **kwargs: object) -> Iterator[Supervisor]:
    """``with supervised(out) as sup:`` — the usual way to hold a Supervisor."""
    sup = Supervisor(out_dir, **kwargs)  # type: ignore[arg-type]
    with sup:
        yield sup


def process_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (used by tests and ``pids.json`` checks)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def executable(script: str, module: str) -> list[str]:
    """The console script next to this interpreter, else ``python -c`` on its main()."""
    candidate = Path(sys.executable).parent / script
    if candidate.exists():
        return [str(candidate)]
    found = shutil.which(script)
    if found:
        return [found]
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


def parse_ready(text: str) -> str:
    """First multiaddr with ``/p2p/`` in a ready file (plain lines or JSON)."""
    candidates: list[str] = []
    try:
        doc = json.loads(text)
    except ValueError:
        candidates = text.split()
    else:
        if isinstance(doc, dict):
            for key in ("addrs", "multiaddrs", "listen_addrs", "addr", "multiaddr"):
                value = doc.get(key)
                if isinstance(value, str):
                    candidates.append(value)
                elif isinstance(value, list):
                    candidates.extend(str(v) for v in value)
        elif isinstance(doc, list):
            candidates = [str(v) for v in doc]
        elif isinstance(doc, str):
            candidates = [doc]
    for cand in candidates:
        if cand.startswith("/") and "/p2p/" in cand:
            return cand
    raise ValueError(f"no /p2p/ multiaddr in ready file: {text[:200]!r}")


# -- K daemons in one process -----------------------------------------------------------


def run_pack(homes: Sequence[Path], ready_file: Path) -> int:
    """Run one ``knexad.daemon.Daemon`` per home inside this process (trio nursery).

    Each daemon keeps everything a separate process would have — its own home, key,
    libp2p host (own TCP port, Noise session, CPM connection), agent and outbox — and
    speaks the real protocol; only the interpreter (and libp2p's ~1 s import, ~60 MB)
    is shared. SIGINT/SIGTERM stop all of them; the exit code is the worst daemon's.
    The ready file lists one ``name multiaddr`` line per daemon once all are listening.
    """
    import signal

    import trio

    from knexad.agents import build_agent
    from knexad.config import KEY_FILE, load_config
    from knexad.daemon import Daemon
    from knexad.identity import load_identity
    from p2p.logs import configure_logging
    from p2p.memory import keep_freed_buffers
    from protocol.errors import ConfigError

    configure_logging("json")
    keep_freed_buffers()  # as `knexad run` does: one process, the same exchange buffers
    daemons: list[Daemon] = []
    try:
        for home in homes:
            cfg = load_config(home)
            daemons.append(Daemon(Path(home), cfg, load_identity(Path(home) / KEY_FILE), build_agent(cfg),
                                  out=open(os.devnull, "w"), handle_signals=False))  # noqa: SIM115
    except ConfigError as exc:
        log.error("harness.pack.config_error", key=exc.key, error=str(exc))
        return ExitCode.CONFIG

    finished = 0

    async def one(daemon: Daemon, name: str) -> None:
        nonlocal finished
        structlog.contextvars.bind_contextvars(node=name)
        try:
            await daemon.run()
        finally:
            finished += 1

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for home, daemon in zip(homes, daemons):
                nursery.start_soon(one, daemon, Path(home).name)

            async def watch_signals() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        log.info("harness.pack.signal", signal=signal.Signals(signum).name)
                        for d in daemons:
                            d.stop(0)
                        return

            async def announce() -> None:
                for d in daemons:
                    await d.ready.wait()
                lines = [f"{Path(h).name} {d.state.state.addrs[0]}" for h, d in zip(homes, daemons)]
                atomic_write(ready_file, "\n".join(lines) + "\n", mode=0o644, durable=False)
                log.info("harness.pack.ready", daemons=len(daemons))

            nursery.start_soon(watch_signals)
            nursery.start_soon(announce)
            # when every daemon has returned (stopped, or a fatal error), end the helpers too
            while finished < len(daemons):
                await trio.sleep(0.2)
            nursery.cancel_scope.cancel()

    trio.run(main)
    codes = [d.exit_code for d in daemons]
    return max(codes) if codes else 0
