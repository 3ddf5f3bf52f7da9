"""A throwaway PostgreSQL server for tests and benchmarks, from the server binaries.

Why our own server instead of a configured one: the PostgreSQL store backend must be
tested (and measured) in CI and on a developer's machine without anyone running a
database for it. The PostgreSQL 15 server binaries (``initdb``, ``pg_ctl``) are on this
machine image; elsewhere Debian's ``postgresql`` package has them (``.ci/run`` installs
it). The server lives in a temp directory (data and Unix socket), listens on
127.0.0.1 only, trusts local connections as ``postgres``, and is stopped
(``pg_ctl -m immediate``) and deleted by ``stop()`` — also via ``atexit`` if the owner
never got to it, and by a watchdog process if the owner was killed (SIGTERM, SIGKILL:
no ``finally`` runs then): the watchdog holds the read end of a pipe whose write end
only the owner has, and stops the server when it reads end-of-file. As root, every server command runs as the ``postgres`` user (initdb
refuses root). The server keeps PostgreSQL's durable defaults (``fsync``,
``synchronous_commit``): the store's contract tests check them and the benchmark
measures them; only ``initdb`` itself skips its fsyncs.

Used by tests/pg.py (a session fixture) and ``python -m benchmarks.ingest --store
postgresql``. Databases are made with the server's ``createdb`` binary, so this module
needs no database driver.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

SERVER_BINARIES = ("initdb", "pg_ctl", "postgres", "createdb")
SEARCHED = "PATH and /usr/lib/postgresql/*/bin"


# run by the watchdog: wait until the owner's end of the pipe closes, then stop and delete
_WATCHDOG = """
import os, shutil, subprocess, sys
sys.stdin.buffer.read()
pg_ctl, data, root, *runas = sys.argv[1:]
if os.path.exists(os.path.join(data, "postmaster.pid")):
    subprocess.run([*runas, pg_ctl, "-D", data, "-m", "immediate", "-w", "-t", "30", "stop"], capture_output=True)
shutil.rmtree(root, ignore_errors=True)
"""


class PgServerUnavailable(RuntimeError):
    """No server can be started here; the message names what is missing."""


def find_bindir() -> Path | None:
    """The directory holding initdb, pg_ctl, postgres and createdb: from PATH, else the
    newest /usr/lib/postgresql/<version>/bin (Debian keeps them off PATH)."""
    initdb = shutil.which("initdb")
    candidates = [Path(os.path.realpath(initdb)).parent] if initdb else []
    versions = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")]
    candidates += sorted(versions, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1, reverse=True)
    for bindir in candidates:
        if all((bindir / name).is_file() and os.access(bindir / name, os.X_OK) for name in SERVER_BINARIES):
            return bindir
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """One throwaway server. ``start()`` → ``url(db)`` / ``create_database()`` → ``stop()``."""

    def __init__(self, bindir: Path | None = None) -> None:
        found = bindir or find_bindir()
        if found is None:
            raise PgServerUnavailable(f"PostgreSQL server binaries ({', '.join(SERVER_BINARIES)}) not found on "
                                      f"{SEARCHED}: install Debian's `postgresql` package (.ci/run does)")
        self.bindir = found
        self.user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            try:
                self.user = pwd.getpwnam("postgres")
            except KeyError:
                raise PgServerUnavailable("running as root and there is no `postgres` user to run the server "
                                          "as (Debian's postgresql package creates it)") from None
        self.dir: Path | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.pid: int | None = None
        self._databases = 0

    # ---- lifecycle ----------------------------------------------------------------
    def start(self, timeout_s: float = 120.0) -> PgServer:
        self.dir = Path(tempfile.mkdtemp(prefix="knexa-pg-"))
        atexit.register(self.stop)
        if self.user is not None:
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        data = self.dir / "data"
        self._run(["initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync",
                   "--locale=C"], timeout_s)
        last = ""
        for _attempt in range(3):  # the free port may be taken between probe and bind
            self.port = free_port()
            opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
            res = self._run(["pg_ctl", "-D", str(data), "-o", opts, "-l", str(self.dir / "server.log"), "-w",
                             "-t", str(int(timeout_s)), "start"], timeout_s + 10, check=False)
            if res.returncode == 0:
                self.pid = int((data / "postmaster.pid").read_text().split()[0])
                runas = ["runuser", "-u", "postgres", "--"] if self.user is not None else []
                self._watchdog = subprocess.Popen(  # its own session: a Ctrl-C to our group must not stop it early
                    [sys.executable, "-c", _WATCHDOG, str(self.bindir / "pg_ctl"), str(data), str(self.dir), *runas],
                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    start_new_session=True)
                return self
            last = self.log_tail() or res.stderr
        self.stop()
        raise PgServerUnavailable(f"pg_ctl start failed: {last[-500:]}")

    def stop(self) -> None:
        """Stop at once (the data is thrown away) and delete everything. Idempotent."""
        if self.dir is None:
            return
        data = self.dir / "data"
        if (data / "postmaster.pid").exists():
            res = self._run(["pg_ctl", "-D", str(data), "-m", "immediate", "-w", "-t", "30", "stop"], 40,
                            check=False)
            if res.returncode != 0 and self.pid is not None:  # pg_ctl could not: SIGQUIT = immediate shutdown
                try:
                    os.kill(self.pid, signal.SIGQUIT)
                except ProcessLookupError:
                    pass
        shutil.rmtree(self.dir, ignore_errors=True)
        if self._watchdog is not None:  # nothing left for it to do: let it exit
            self._watchdog.stdin.close()  # type: ignore[union-attr]
            self._watchdog.wait(timeout=60)
            self._watchdog = None
        self.dir, self.pid = None, None

    def __enter__(self) -> PgServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- use --------------------------------------------------------------------------
    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, prefix: str = "knexa") -> str:
        """A new, empty database; returns its URL."""
        self._databases += 1
        name = f"{prefix}_{os.getpid()}_{self._databases}"
        self._run(["createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name], 60)
        return self.url(name)

    def log_tail(self, n: int = 2000) -> str:
        try:
            return (self.dir / "server.log").read_text(errors="replace")[-n:] if self.dir else ""
        except OSError:
            return ""

    def cpu_s(self) -> float:
        """CPU seconds of the server's processes so far — what the database costs, next
        to the client's own CPU. Linux /proc: the postmaster's own and that of its
        children it already reaped (cutime + cstime: a backend that exited meanwhile
        still counts), plus its live children (backends, WAL writer, checkpointer)."""
        if self.pid is None:
            return 0.0
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for stat in glob.glob("/proc/[0-9]*/stat"):
            try:
                fields = Path(stat).read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid = int(stat.split("/")[2])
            if pid == self.pid:
                total += sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
            elif int(fields[1]) == self.pid:  # fields[1]: ppid
                total += int(fields[11]) + int(fields[12])
        return total / tick

    def _run(self, argv: list[str], timeout_s: float, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / argv[0]), *argv[1:]]
        if self.user is not None:
            cmd = ["runuser", "-u", "postgres", "--", *cmd] if shutil.which("runuser") else \
                ["su", "postgres", "-s", "/bin/sh", "-c", shlex.join(cmd)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=self.dir or "/",
                             check=False)
        if check and res.returncode != 0:
            raise PgServerUnavailable(f"{argv[0]} failed (rc {res.returncode}): {(res.stderr or res.stdout)[-500:]}")
        return res

