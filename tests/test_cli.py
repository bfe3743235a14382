"""`memtool.py serve` as a program: options, signals, engines, files."""
import signal
import subprocess
import sys

import pytest

from support import (MEMTOOL, REPO, STOP_TIMEOUT, MemtoolServer, free_port, missing_engines,
                     wait_for)

pytestmark = pytest.mark.memtool_only


def run_memtool(*args, timeout=30):
    return subprocess.run([sys.executable, str(MEMTOOL), *args], cwd=str(REPO),
                          capture_output=True, timeout=timeout)


def test_serve_help_lists_the_options():
    r = run_memtool("serve", "--help")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    for option in ("--port", "--listen", "--data", "--engine", "--max-item-size", "--max-conns",
                   "--memory-limit", "--sync", "--ulog-limit", "--sid", "--pid",
                   "--enable-shutdown"):
        assert option in out, option


@pytest.mark.skipif(not missing_engines(), reason="every dbm engine imports on this Python")
def test_missing_engine_is_refused_naming_the_alternatives(tmp_path):
    r = run_memtool("serve", "-p", str(free_port()), "-l", "127.0.0.1", "--data",
                    str(tmp_path / "d"), "--engine", missing_engines()[0])
    assert r.returncode != 0
    err = r.stderr.decode()
    for alternative in ("sqlite", "dumb", "memory"):
        assert alternative in err, err


def test_unknown_engine_is_refused(tmp_path):
    r = run_memtool("serve", "-p", str(free_port()), "--data", str(tmp_path / "d"),
                    "--engine", "bogus")
    assert r.returncode != 0
    assert b"sqlite" in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly(tmp_path, sig):
    with MemtoolServer(tmp_path) as srv:
        srv.start()
        with srv.session() as idle, srv.session() as s:
            s.set(b"k", b"v")
            srv.proc.send_signal(sig)
            assert srv.proc.wait(STOP_TIMEOUT) == 0
            idle.expect_closed()


def test_sigterm_during_recovery_stops_cleanly_once_the_store_is_whole(tmp_path):
    """The port listens before the log is replayed: a SIGTERM then is obeyed
    when the replay is done (exit 0), not by dying half way (-15)."""
    with MemtoolServer(tmp_path) as srv:
        srv.start()
        with srv.session(timeout=60) as s:
            s.send(b"".join(b"set k%d 0 0 100 noreply\r\n%0100d\r\n" % (i, i)
                            for i in range(100000)))
            s.sync()
        srv.kill9()                                   # a long log to replay
        srv.start()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(STOP_TIMEOUT) == 0, srv.log_tail()
        srv.start()
        with srv.session() as s:
            assert s.get(b"k99999") == b"%0100d" % 99999


def test_pid_file_and_data_layout(tmp_path, engine):
    pid_file = tmp_path / "memtool.pid"
    with MemtoolServer(tmp_path, engine=engine, extra=["--pid", str(pid_file)]) as srv:
        srv.start()
        assert int(pid_file.read_text().strip()) == srv.proc.pid
        with srv.session() as s:
            s.set(b"k", b"v")
        assert srv.stop() == 0
        if engine != "memory":                  # memory keeps no files at all
            assert list(srv.data.glob("store.*")), sorted(srv.data.iterdir())
            assert list((srv.data / "ulog").glob("*.ulog")), sorted(srv.data.rglob("*"))


@pytest.mark.parametrize("use", ["get", "replace"])
def test_memory_engine_evicts_least_recently_used(tmp_path, use):
    """A key kept in use outlives keys stored once around it: by reads, or by
    rewrites never read (a replaced item keeps its place in the cache, but a
    set counts as a use for the evictor)."""
    with MemtoolServer(tmp_path, engine="memory", extra=["-m", "1"]) as srv:
        srv.start()
        with srv.session() as s:
            value = b"v" * 10000
            keys = [b"lru%03d" % i for i in range(300)]      # 3 MB into a 1 MB cache
            for i, k in enumerate(keys):
                s.set(k, value)
                if i % 10 == 0 and use == "get":
                    assert s.get(keys[0]) == value          # keep the first key hot
                elif i % 10 == 0:                           # NOT_STORED once evicted
                    s.call(b"replace %s 0 0 %d\r\n%s\r\n" % (keys[0], len(value), value),
                           b"STORED\r\n")
            assert s.get(keys[0]) == value
            assert s.get(keys[1]) is None
            assert s.get(keys[-1]) == value
            st = s.stats()
            assert int(st["evictions"]) > 0
            assert int(st["limit_maxbytes"]) == 1024 * 1024
            assert 0 < int(st["bytes"]) <= 1024 * 1024
            assert 0 < int(st["curr_items"]) < 105


def test_a_second_server_on_the_same_data_dir_is_refused(tmp_path):
    with MemtoolServer(tmp_path) as first:
        first.start()
        second = subprocess.run([sys.executable, str(MEMTOOL), "serve", "-p", str(free_port()),
                                 "--data", str(first.data)],
                                capture_output=True, text=True, timeout=30)
        assert second.returncode == 1
        assert "in use by another memtool (pid %d)" % first.proc.pid in second.stderr
        assert "Traceback" not in second.stderr
        with first.session() as s:              # the first one is unharmed
            s.set(b"still", b"here")
            assert s.get(b"still") == b"here"


def test_ready_line_names_address_data_engine_and_recovery(tmp_path):
    srv = MemtoolServer(tmp_path, extra=["--sync", "always"])
    srv.start()
    with srv.session() as s:
        s.set(b"k", b"v")
    srv.kill9()
    srv.start()                                   # the port is bound before recovery
    wait_for(lambda: srv.log_text().count("serving on") == 2, 10, what="the ready line")
    line = [x for x in srv.log_text().splitlines() if "serving on" in x][-1]
    assert line.startswith("memtool ") and "serving on 127.0.0.1:%d" % srv.port in line, line
    assert str(srv.data) in line and "(sqlite engine), 1 items" in line, line
    assert "log records replayed in" in line
    srv.stop()


def test_taken_port_is_reported_before_anything_else(tmp_path):
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = run_memtool("serve", "-p", str(taken.getsockname()[1]), "--data",
                        str(tmp_path / "d"))
    assert r.returncode == 1 and b"Address already in use" in r.stderr, r.stderr
    assert not (tmp_path / "d").exists()          # nothing was opened before the bind


def test_option_errors_say_what_is_allowed(tmp_path):
    r = run_memtool("serve", "--ulog-limit", "0")
    assert r.returncode == 2 and b"at least 64k" in r.stderr, r.stderr
    r = run_memtool("bench", "-s", "127.0.0.1:%d" % free_port(), "--json",
                    str(tmp_path / "no" / "such" / "dir.json"))
    assert r.returncode == 1 and b"No such file or directory" in r.stderr, r.stderr
    r = run_memtool("proxy", "-l", "127.0.0.1:0", "-s", "127.0.0.1:1")
    assert r.returncode == 1 and r.stderr == b"memtool: -l: not host:port: '127.0.0.1:0'\n", \
        r.stderr
    out = run_memtool("bench", "--help").stdout.decode()
    options = [line.split()[0] for line in out.splitlines() if line.startswith("  -")]
    assert len(options) > 20
    for option in options:                        # every option says what it does
        block = out.split(option, 1)[1].split("\n  -", 1)[0]
        assert len(block.split()) > 2, option
