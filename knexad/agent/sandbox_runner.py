"""The sandbox runner: a stand-alone program that ``knexad.agent.evaluate`` starts as
``python -I <this file>`` (isolated: no environment, no user site, no script directory
on sys.path) and that forks one child per program under the limits of the batch.

Stdlib only and nothing imported from knexad, because it runs isolated. Its line
protocol on stdout, its stdin format and its isolation layers are described in
``knexad.agent.evaluate`` and docs/evaluation.md. ``kill_cgroup`` is also what the
parent uses to clean up after a runner that died (one implementation).
"""
import os, sys, json, signal, select, resource, shutil, time, types, ctypes
for _m in ("math", "re", "collections", "itertools", "functools", "heapq", "bisect",
           "string", "typing", "hashlib", "random", "statistics", "fractions",
           "decimal", "copy", "operator", "dataclasses", "socket"):
    try:
        __import__(_m)
    except ImportError:
        pass
import socket, _socket

LINUX = sys.platform.startswith("linux")
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_exit, _write, _getpid = os._exit, os.write, os.getpid


def emit(line):
    os.write(1, (line + "\n").encode())


def landlock_abi():
    if not LINUX:
        return 0
    try:
        return max(0, int(_libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))))
    except Exception:
        return 0


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_restrict(abi, wdir):
    """Writes only below wdir, no execve, no TCP, no signals/abstract sockets outside."""
    fs = 0x1FF3  # EXECUTE, WRITE_FILE, REMOVE_*, MAKE_* (ABI 1)
    if abi >= 2:
        fs |= 1 << 13  # REFER
    if abi >= 3:
        fs |= 1 << 14  # TRUNCATE
    attr = _RulesetAttr(fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
    size = 24 if abi >= 6 else (16 if abi >= 4 else 8)
    rfd = _libc.syscall(444, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if rfd < 0:
        return False
    pfd = os.open(wdir, os.O_PATH | os.O_CLOEXEC)
    rule = _PathBeneath(fs & ~1, pfd)  # everything but EXECUTE below wdir
    ok = _libc.syscall(445, ctypes.c_int(rfd), ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint32(0)) == 0
    os.close(pfd)
    ok = ok and _libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    ok = ok and _libc.syscall(446, ctypes.c_int(rfd), ctypes.c_uint32(0)) == 0
    os.close(rfd)
    return ok


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def drop_capabilities():
    if not LINUX or not hasattr(_libc, "capset"):
        return
    for cap in range(64):
        if _libc.prctl(24, cap, 0, 0, 0) != 0 and ctypes.get_errno() == 22:  # CAPBSET_DROP
            break
    data = (_CapData * 2)()
    _libc.capset(ctypes.byref(_CapHeader(0x20080522, 0)), data)


def _blocked(*args, **kwargs):
    raise OSError("network access is disabled in the knexa sandbox")


def disable_network():
    for mod in (socket, _socket):
        for name in ("socket", "socketpair", "fromfd", "create_connection", "create_server",
                     "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
            if hasattr(mod, name):
                setattr(mod, name, _blocked)


def cgroup_parent():
    if not LINUX or os.geteuid() != 0:
        return None
    for line in open("/proc/self/cgroup"):
        _, ctrl, path = line.rstrip("\n").split(":", 2)
        base = None
        if "pids" in ctrl.split(","):
            base = "/sys/fs/cgroup/pids" + path
        elif ctrl == "" and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            base = "/sys/fs/cgroup" + path
            try:
                if "pids" not in open(base + "/cgroup.subtree_control").read().split():
                    base = None
            except OSError:
                base = None
        if base and os.access(base, os.W_OK) and os.path.exists(base + "/cgroup.procs"):
            return base
    return None


def kill_cgroup(cg):
    """Kill every process in cgroup ``cg`` and remove it; False if it is still there."""
    for _ in range(50):
        try:
            with open(cg + "/cgroup.procs") as f:
                pids = [int(p) for p in f.read().split()]
        except OSError:
            break
        pids = [p for p in pids if p > 0]
        if not pids:
            break
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.002)
    try:
        os.rmdir(cg)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def rmtree_force(path):
    """Remove a program's dir even if the program chmod-ed parts of it to 000."""
    def fix(fn, p, exc):
        for d in (os.path.dirname(p), p):
            try:
                os.chmod(d, 0o700)
            except OSError:
                pass
    shutil.rmtree(path, onerror=fix)
    shutil.rmtree(path, ignore_errors=True)


def child(src, wdir, wfd, cg, cfg, abi, token):
    try:
        os.setsid()
        if cg:
            with open(cg + "/cgroup.procs", "w") as f:
                f.write("0")
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.dup2(wfd, 3)
        os.closerange(4, max(1 << 16, resource.getrlimit(resource.RLIMIT_NOFILE)[0]))
        os.chdir(wdir)
        cpu = int(cfg["timeout"]) + 1
        mem = cfg["memory_mb"] * 1024 * 1024
        for res, lim in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu),
                         (resource.RLIMIT_NOFILE, cfg["nofile"]),
                         (resource.RLIMIT_FSIZE, cfg["fsize"]), (resource.RLIMIT_CORE, 0),
                         (resource.RLIMIT_NPROC, cfg["nproc"])):
            resource.setrlimit(res, (lim, lim))
        if LINUX:
            _libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        if abi:
            landlock_restrict(abi, wdir)
        drop_capabilities()
        disable_network()
        main = types.ModuleType("__main__")
        sys.modules["__main__"] = main
        sys.argv = ["<program>"]
        exec(compile(src, "<program>", "exec"), main.__dict__)
    except BaseException:
        _exit(1)
    try:
        _write(3, token)
    finally:
        _exit(0)


def main():
    data = sys.stdin.buffer.read()
    nl = data.index(b"\n")
    cfg = json.loads(data[:nl])
    progs, pos = [], nl + 1
    while pos < len(data):
        nl = data.index(b"\n", pos)
        size = int(data[pos:nl])
        progs.append(data[nl + 1:nl + 1 + size].decode("utf-8", "replace"))
        pos = nl + 1 + size
    del data
    soft = (cfg["memory_mb"] + 512) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (soft, soft))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if LINUX and _getpid() != 1:
        _libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come back to us
    abi = landlock_abi()
    cg_parent = cgroup_parent()
    emit("I " + json.dumps({"landlock_abi": abi, "pids_cgroup": cg_parent or "",
                            "pid_namespace": _getpid() == 1, "euid": os.geteuid()}))
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *a: None)
    signal.set_wakeup_fd(wake_w)
    base = os.getcwd()
    pending = list(range(len(progs)))
    pending.reverse()
    active = {}

    def finish(pid, status):
        idx, _, rfd, wdir, cg, token = active.pop(pid)
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
        if cg:
            kill_cgroup(cg)
        try:
            got = os.read(rfd, 64)
        except OSError:
            got = b""
        os.close(rfd)
        ok = status is not None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        emit("R %d %d" % (idx, 1 if ok and got == token else 0))
        rmtree_force(wdir)

    while pending or active:
        while pending and len(active) < cfg["workers"]:
            idx = pending.pop()
            wdir = os.path.join(base, "p%d" % idx)
            os.mkdir(wdir, 0o700)
            cg = None
            if cg_parent:
                cg = "%s/knexa-%s-%d" % (cg_parent, cfg["tag"], idx)
                try:
                    os.mkdir(cg)
                    with open(cg + "/pids.max", "w") as f:
                        f.write(str(cfg["nproc"]))
                except OSError:
                    cg = None
            token = os.urandom(16)
            rfd, wfd = os.pipe()
            emit("S %d" % idx)
            pid = os.fork()
            if pid == 0:
                child(progs[idx], wdir, wfd, cg, cfg, abi, token)
            os.close(wfd)
            os.set_blocking(rfd, False)
            active[pid] = (idx, time.monotonic() + cfg["timeout"], rfd, wdir, cg, token)
        if active:
            wait = max(0.0, min(a[1] for a in active.values()) - time.monotonic())
            select.select([wake_r], [], [], wait)
        try:
            while os.read(wake_r, 512):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in active:
                finish(pid, status)
        now = time.monotonic()
        for pid in [p for p, a in active.items() if a[1] <= now]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            finish(pid, None)


if __name__ == "__main__":
    main()
