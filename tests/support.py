"""Shared helpers for the memtool test suite: ports, server processes, raw sessions.

MEMTOOL_TEST_TARGET=memcached runs the server-facing tests against the real
memcached binary instead of memtool.py, to confirm the expected bytes; tests
marked ``memtool_only`` are skipped then.
"""
import importlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MEMTOOL = REPO / "memtool.py"
MEMCACHED_BIN = shutil.which("memcached")
TARGET = os.environ.get("MEMTOOL_TEST_TARGET", "memtool")
if TARGET not in ("memtool", "memcached"):
    raise RuntimeError("MEMTOOL_TEST_TARGET must be 'memtool' or 'memcached', not %r" % TARGET)

IO_TIMEOUT = 5.0        # any single expected reply
READY_TIMEOUT = 10.0    # server start until its port accepts
STOP_TIMEOUT = 15.0     # SIGTERM until exit (includes flush + fsync)

DEFAULT_ITEM_MAX = 1024 * 1024
ITEM_OVERHEAD = 59      # memcached: value + key + 59 (+4 with flags) <= -I


def max_value_len(key_len, flags=0, item_max=DEFAULT_ITEM_MAX):
    """Largest storable value for a key, by memcached's item size formula."""
    return item_max - ITEM_OVERHEAD - key_len - (4 if flags else 0)


def parse_size(text):
    """'1m' -> 1048576, '64k' -> 65536, '2048' -> 2048 (the -I syntax)."""
    m = re.fullmatch(r"(\d+)([kKmM]?)", str(text))
    if not m:
        raise ValueError(text)
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n):
    """n distinct free ports (each socket stays bound until all are picked)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _engine_exists(module):
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


def available_engines():
    """Engines whose backing module imports on this Python, memtool's order."""
    engines = ["sqlite"]
    engines += [name for name, mod in (("gnu", "dbm.gnu"), ("ndbm", "dbm.ndbm"))
                if _engine_exists(mod)]
    return engines + ["dumb", "memory"]


def missing_engines():
    return [name for name, mod in (("gnu", "dbm.gnu"), ("ndbm", "dbm.ndbm"))
            if not _engine_exists(mod)]


if TARGET == "memcached":
    ENGINES = ["memcached"]
    PERSISTENT_ENGINES = []
else:
    ENGINES = available_engines()
    PERSISTENT_ENGINES = [e for e in ENGINES if e != "memory"]


def rss_peak_kib(pid):
    """VmHWM (peak resident set) of a process in KiB."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM for pid %d" % pid)


def wait_for(predicate, timeout, interval=0.05, what="condition"):
    """Poll predicate() until it returns a truthy value; return it or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


# --------------------------------------------------------------------------- servers

class FakeServer:
    """A listener on a free 127.0.0.1 port whose thread hands each connection
    to handle(conn); close() stops it. Set what handle() needs before
    calling this __init__."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.handle(conn)

    def handle(self, conn):
        raise NotImplementedError

    def close(self):
        self.listener.close()


class Served:
    """What tests use of anything serving on self.port: sessions, the tail of
    log_text(), `with` (close() at the end)."""

    def log_tail(self, n=3000):
        return self.log_text()[-n:]

    def session(self, timeout=IO_TIMEOUT):
        return Session(self.port, timeout=timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ServerProcess(Served):
    """A server subprocess on 127.0.0.1:port, restartable on the same port."""

    label = "server"

    def __init__(self, workdir, port=None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc = None
        self.log_path = self.workdir / ("%s.log" % self.label)
        self._log = None

    def argv(self):
        raise NotImplementedError

    def start(self):
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv(), cwd=str(REPO), stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited with %s before listening:\n%s"
                                   % (self.label, self.proc.returncode, self.log_tail()))
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.kill9()
                    raise RuntimeError("%s not listening on %d after %.0fs:\n%s"
                                       % (self.label, self.port, READY_TIMEOUT, self.log_tail()))
                time.sleep(0.02)

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
                raise AssertionError("%s ignored SIGTERM for %.0fs" % (self.label, STOP_TIMEOUT))
        self._close_log()
        return self.proc.returncode

    def kill9(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)
        self._close_log()

    def restart(self):
        rc = self.stop()
        assert rc == 0, "exit code %r after SIGTERM:\n%s" % (rc, self.log_tail())
        return self.start()

    def close(self):
        """Teardown: never leave a process behind."""
        self.kill9()

    def _close_log(self):
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self):
        try:
            return self.log_path.read_bytes().decode("utf-8", "replace")
        except OSError:
            return ""



class MemtoolServer(ServerProcess):
    label = "memtool"

    def __init__(self, workdir, engine="sqlite", extra=(), port=None):
        super().__init__(workdir, port)
        self.engine = engine
        self.data = self.workdir / "data"
        self.extra = [str(a) for a in extra]

    def argv(self):
        return [sys.executable, str(MEMTOOL), "serve", "-p", str(self.port),
                "-l", "127.0.0.1", "--data", str(self.data), "--engine", self.engine,
                *self.extra]


class MemcachedServer(ServerProcess):
    label = "memcached"

    def __init__(self, workdir, extra=(), lru_options=(), port=None):
        super().__init__(workdir, port)
        self.extra = [str(a) for a in extra]
        self.lru_options = list(lru_options)
        self.engine = "memcached"

    def argv(self):
        user = ["-u", "root"] if os.geteuid() == 0 else []
        opts = ",".join(["no_lru_crawler", "no_lru_maintainer"] + self.lru_options)
        return [MEMCACHED_BIN, *user, "-l", "127.0.0.1", "-p", str(self.port),
                "-U", "0", "-m", "256", "-o", opts, *self.extra]


class ProxiedServer(Served):
    """A memtool proxy on its own port in front of one backend server (memtool's
    memory engine, or real memcached): the suites that check a server's bytes
    run through it unchanged. Start/stop/restart act on both."""

    label = "proxy"

    def __init__(self, workdir, backend, extra=()):
        self.workdir = Path(workdir)
        self.backend = backend
        self.proxy = ProxyProcess(self.workdir / "proxy", ["-s", "127.0.0.1:%d" % backend.port,
                                                           *extra])
        self.port = self.proxy.port
        self.engine = "proxy-" + backend.engine

    @property
    def proc(self):
        return self.proxy.proc

    @property
    def running(self):
        return self.proxy.running and self.backend.running

    def start(self):
        self.backend.start()
        self.proxy.start()
        return self

    def stop(self):
        rc = self.proxy.stop()
        self.backend.stop()
        return rc

    def restart(self):
        self.stop()
        return self.start()

    def kill9(self):
        self.proxy.kill9()
        self.backend.kill9()

    def close(self):
        self.proxy.close()
        self.backend.close()

    def log_text(self):
        return self.proxy.log_text() + self.backend.log_text()



class ProxyProcess(ServerProcess):
    """`memtool.py proxy` with flags (-l is the port; the rest as given)."""

    label = "proxy"

    def __init__(self, workdir, args, port=None):
        super().__init__(workdir, port)
        self.args = [str(a) for a in args]

    def argv(self):
        return [sys.executable, str(MEMTOOL), "proxy", "-l", "127.0.0.1:%d" % self.port,
                *self.args]


PROXY_ENGINES = ["proxy-memory"] + (["proxy-memcached"] if MEMCACHED_BIN else [])


def make_server(workdir, engine, max_item_size=None, max_conns=None,
                enable_shutdown=False, extra=()):
    """An unstarted server for the current target with memtool-style options.

    engine "proxy-memory" / "proxy-memcached": a ProxiedServer in front of a
    memtool memory-engine server / real memcached with those options.
    """
    if engine.startswith("proxy-"):
        backend = make_server(Path(workdir) / "backend", engine[len("proxy-"):], max_item_size,
                              max_conns, enable_shutdown, extra) \
            if engine == "proxy-memory" else MemcachedServer(
                Path(workdir) / "backend",
                extra=["-I", str(parse_size(max_item_size))] if max_item_size else [],
                lru_options=["slab_chunk_max=%d" % min(parse_size(max_item_size) // 2,
                                                       512 * 1024)] if max_item_size else [])
        proxy_args = ["-I", str(max_item_size)] if max_item_size else []
        return ProxiedServer(workdir, backend, proxy_args)
    if TARGET == "memcached":
        args, lru = [], []
        if max_item_size is not None:
            size = parse_size(max_item_size)
            args += ["-I", str(size)]
            lru.append("slab_chunk_max=%d" % min(size // 2, 512 * 1024))
        if max_conns is not None:
            # memcached reserves ~24 descriptors for itself (measured: -c 27 -> 3 clients)
            args += ["-c", str(max_conns + 24)]
        if enable_shutdown:
            args.append("-A")
        return MemcachedServer(workdir, extra=args, lru_options=lru)
    args = []
    if max_item_size is not None:
        args += ["-I", str(max_item_size)]
    if max_conns is not None:
        args += ["-c", str(max_conns)]
    if enable_shutdown:
        args.append("--enable-shutdown")
    return MemtoolServer(workdir, engine=engine, extra=args + list(extra))


# --------------------------------------------------------------------------- sessions

def _show(data, limit=300):
    data = bytes(data)
    if len(data) <= limit:
        return repr(data)
    return "%r...(%d bytes)...%r" % (data[:limit // 2], len(data), data[-limit // 2:])


def describe_mismatch(got, expected):
    n = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b),
             min(len(got), len(expected)))
    lo = max(0, n - 60)
    return ("reply differs at byte %d (got %d bytes, expected %d)\n  got:      %r\n  expected: %r"
            % (n, len(got), len(expected), bytes(got[lo:n + 80]), bytes(expected[lo:n + 80])))


class Session:
    """A raw text-protocol connection with exact-byte expectations."""

    def __init__(self, port, timeout=IO_TIMEOUT):
        self.timeout = timeout
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.eof = False

    # -- low level
    def send(self, data):
        self.sock.settimeout(self.timeout)      # reads leave a shorter timeout behind
        self.sock.sendall(data)

    def send_pieces(self, data, size=1, pause=0.002):
        """Send data in many small writes; the pause stops the kernel merging them."""
        for i in range(0, len(data), size):
            self.send(data[i:i + size])
            time.sleep(pause)

    def _recv_more(self, deadline):
        """Append what arrives to buf; False on EOF or timeout."""
        if self.eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return False
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _take(self, n):
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    # -- reading
    def recv_exact(self, n, timeout=None):
        deadline = time.monotonic() + (timeout or self.timeout)
        while len(self.buf) < n:
            if not self._recv_more(deadline):
                raise AssertionError("wanted %d bytes, got %s (%s)"
                                     % (n, _show(self.buf), "closed" if self.eof else "timeout"))
        return self._take(n)

    def read_until(self, terminator, timeout=None):
        """Bytes up to and including the first terminator."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            i = self.buf.find(terminator)
            if i >= 0:
                return self._take(i + len(terminator))
            if not self._recv_more(deadline):
                raise AssertionError("no %r in %s (%s)" % (terminator, _show(self.buf),
                                                           "closed" if self.eof else "timeout"))

    def read_line(self, timeout=None):
        return self.read_until(b"\r\n", timeout)

    def expect(self, expected, timeout=None):
        """Assert the next bytes on the wire are exactly `expected`."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while len(self.buf) < len(expected) and expected.startswith(bytes(self.buf)):
            if not self._recv_more(deadline):
                break
        got = self._take(len(expected))
        if got != expected:
            raise AssertionError(describe_mismatch(got + bytes(self.buf), expected))

    def call(self, request, expected):
        self.send(request)
        self.expect(expected)

    def read_to_eof(self, timeout=None):
        """Everything until the server closes; fails if it stays open."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while self._recv_more(deadline):
            pass
        if not self.eof:
            raise AssertionError("connection still open; received %s" % _show(self.buf))
        return self._take(len(self.buf))

    def expect_closed(self, timeout=None):
        """The server closes the connection without sending anything more."""
        rest = self.read_to_eof(timeout)
        assert rest == b"", "expected silent close, got %s" % _show(rest)

    def sync(self):
        """Assert nothing unexpected is pending: a version round trip comes back first."""
        self.send(b"version\r\n")
        line = self.read_line()
        assert line.startswith(b"VERSION 1.6.18"), "stray bytes before VERSION: %s" % _show(line)

    # -- conveniences
    def get_items(self, keys, cmd=b"get"):
        """{key: (flags, value, cas-or-None)} for one retrieval command."""
        if isinstance(keys, bytes):
            keys = [keys]
        self.send(cmd + b" " + b" ".join(keys) + b"\r\n")
        return self.read_items()

    def read_items(self):
        """Parse one VALUE... END reply into {key: (flags, value, cas-or-None)}."""
        found = {}
        while True:
            line = self.read_line()
            if line == b"END\r\n":
                return found
            parts = line.split()
            assert parts[0] == b"VALUE" and len(parts) in (4, 5), "bad reply line %r" % line
            data = self.recv_exact(int(parts[3]) + 2)
            assert data.endswith(b"\r\n"), "value not followed by CRLF: %s" % _show(data)
            cas = int(parts[4]) if len(parts) == 5 else None
            found[parts[1]] = (int(parts[2]), data[:-2], cas)

    def get(self, key):
        """The value of key or None."""
        item = self.get_items([key]).get(key)
        return None if item is None else item[1]

    def gets_cas(self, key):
        item = self.get_items([key], b"gets")[key]
        return item[2]

    def set(self, key, value, flags=0, exptime=0, cmd=b"set"):
        self.call(b"%s %s %d %d %d\r\n%s\r\n" % (cmd, key, flags, exptime, len(value), value),
                  b"STORED\r\n")

    def stats(self, arg=b""):
        self.send(b"stats" + (b" " + arg if arg else b"") + b"\r\n")
        out = {}
        while True:
            line = self.read_line()
            if line == b"END\r\n":
                return out
            m = re.fullmatch(rb"STAT (\S+) ([^\r\n]*)\r\n", line)
            assert m, "bad stats line %r" % line
            out[m.group(1).decode()] = m.group(2).decode()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
