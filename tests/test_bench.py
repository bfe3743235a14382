"""`memtool.py bench`: the load generator, run as a program against real servers.

Every test starts its own fresh server(s), so the server's `stats` counters
(cmd_get, cmd_set, get_hits) can be compared with what bench says it did.
Runs are small (a few clients, a few hundred requests) and every bench
subprocess is bounded by BENCH_TIMEOUT and killed, with its children, when
it overruns. The Histogram tests import memtool.py as a library.
"""
import contextlib
import json
import math
import os
import random
import re
import signal
import socketserver
import subprocess
import sys
import threading

import pytest

from support import (MEMCACHED_BIN, MEMTOOL, REPO, MemcachedServer, MemtoolServer,
                     free_port, wait_for)

BENCH_TIMEOUT = 60      # one bench run, start to exit
SERVER_KINDS = ["memtool", "memcached"]

# The JSON contract (issue 4).
FIGURE_KEYS = {"ops", "ops_per_sec", "hits", "misses", "hits_per_sec", "misses_per_sec",
               "kb_per_sec", "latency_ms"}
LATENCY_KEYS = {"avg", "p50", "p90", "p99", "p99.9", "max"}
CONFIG_KEYS = {"clients", "pipeline", "ratio", "data_size", "data_size_range", "key_prefix",
               "key_minimum", "key_maximum", "key_pattern", "multiget", "requests",
               "test_time", "protocol", "seed", "processes", "hash", "distribution",
               "timeout", "prefill", "verify", "vs", "rounds", "json"}
TABLE_COLUMNS = ["Ops/sec", "Hits/sec", "Misses/sec", "Avg. Latency", "p50 Latency",
                 "p99 Latency", "p99.9 Latency", "KB/sec"]


# --------------------------------------------------------------------------- servers

@pytest.fixture
def start_server(tmp_path):
    """start_server('memtool' | 'memcached') -> a fresh, started server; all closed after."""
    made = []

    def start(kind="memtool", extra=()):
        workdir = tmp_path / ("%s%d" % (kind, len(made)))
        if kind == "memcached":
            if not MEMCACHED_BIN:
                pytest.skip("memcached binary not installed (apt-get install memcached)")
            srv = MemcachedServer(workdir, extra=extra)
        else:
            srv = MemtoolServer(workdir, extra=extra)
        made.append(srv)
        return srv.start()

    yield start
    for srv in made:
        srv.close()


@pytest.fixture(params=SERVER_KINDS)
def server_kind(request):
    return request.param


@pytest.fixture
def fresh_server(start_server, server_kind):
    """A server nobody else has touched: its stats count only this test's traffic."""
    return start_server(server_kind)


class FakeServer(socketserver.ThreadingTCPServer):
    """A misbehaving memcached on 127.0.0.1: `mode` says how it answers every command.

    reply modes send a fixed line per command (data blocks of set/ms are skipped);
    "close" hangs up on the first bytes; "silent" reads and never answers.
    """
    daemon_threads = True
    allow_reuse_address = True
    REPLIES = {"server_error": b"SERVER_ERROR out of memory storing object\r\n",
               "client_error": b"CLIENT_ERROR bad command line format\r\n",
               "error": b"ERROR\r\n",
               "parse": b"WHAT IS THIS\r\n"}

    def __init__(self, mode):
        self.mode = mode
        super().__init__(("127.0.0.1", 0), FakeHandler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.shutdown()
        self.server_close()


class FakeHandler(socketserver.BaseRequestHandler):
    def handle(self):
        mode, sock, buf = self.server.mode, self.request, b""
        while True:
            data = sock.recv(65536)
            if not data or mode == "close":
                return
            if mode == "silent":
                continue
            buf += data
            while b"\r\n" in buf:
                line, rest = buf.split(b"\r\n", 1)
                words = line.split()
                size = (int(words[4]) if words[:1] == [b"set"] and len(words) > 4 else
                        int(words[2]) if words[:1] == [b"ms"] and len(words) > 2 else -2)
                if len(rest) < size + 2:
                    break                       # wait for the data block
                buf = rest[size + 2:]
                sock.sendall(FakeServer.REPLIES[mode])


@pytest.fixture
def fake_server():
    made = []

    def start(mode):
        made.append(FakeServer(mode))
        return made[-1]

    yield start
    for srv in made:
        srv.close()


def addr(srv):
    return "127.0.0.1:%d" % srv.port


def counters(srv):
    """The server's stats that bench's figures must agree with, as ints."""
    with srv.session() as s:
        st = s.stats()
    return {name: int(st[name]) for name in ("cmd_get", "cmd_set", "get_hits", "get_misses")}


# --------------------------------------------------------------------------- running bench

def bench_argv(args):
    return [sys.executable, str(MEMTOOL), "bench", *[str(a) for a in args]]


def _kill_group(proc):
    """Kill a bench we started and the worker processes it forked (its own session)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


class BenchResult:
    def __init__(self, returncode, stdout, stderr, report):
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.report = report        # the --json document, or None

    def describe(self):
        return "exit %s\n--- stdout\n%s\n--- stderr\n%s" % (
            self.returncode, self.stdout[-3000:], self.stderr[-3000:])


def _finish(proc, json_path, timeout):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError("bench still running after %ss; killed\n--- stdout\n%s\n--- stderr\n%s"
                             % (timeout, out.decode(errors="replace")[-3000:],
                                err.decode(errors="replace")[-3000:]))
    report = None
    if json_path is not None and os.path.exists(json_path):
        with open(json_path) as f:
            report = json.load(f)
    return BenchResult(proc.returncode, out.decode(errors="replace"),
                       err.decode(errors="replace"), report)


def _popen(args):
    return subprocess.Popen(bench_argv(args), cwd=str(REPO), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def run_bench(*args, json_path=None, timeout=BENCH_TIMEOUT):
    """Run bench to completion; returns a BenchResult whatever the exit code."""
    args = list(args) + (["--json", json_path] if json_path is not None else [])
    proc = _popen(args)
    try:
        return _finish(proc, json_path, timeout)
    finally:
        _kill_group(proc)


def bench_ok(tmp_path, *args, timeout=BENCH_TIMEOUT):
    """Run bench, insist on exit 0 and a JSON report; returns (result, report)."""
    json_path = tmp_path / ("bench-%d.json" % len(list(tmp_path.glob("bench-*.json"))))
    result = run_bench(*args, json_path=str(json_path), timeout=timeout)
    assert result.returncode == 0, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    assert result.report is not None, "no JSON written to %s\n%s" % (json_path, result.describe())
    return result, result.report


@contextlib.contextmanager
def bench_in_background(tmp_path, *args):
    """Start bench and yield (proc, finish); finish() waits and returns the BenchResult."""
    json_path = str(tmp_path / "background.json")
    proc = _popen(list(args) + ["--json", json_path])
    try:
        yield proc, lambda: _finish(proc, json_path, BENCH_TIMEOUT)
    finally:
        _kill_group(proc)


SMALL = ["-c", 4, "--requests", 200, "--key-minimum", 1, "--key-maximum", 500, "--seed", 7]


# --------------------------------------------------------------------------- report checks

def check_figures(name, fig, count_type=int):
    """One of sets/gets/totals (or a/b sides of --vs) has every field, self-consistent.
    Counts are ints for one run; --vs reports medians, which may be halves."""
    assert set(fig) >= FIGURE_KEYS, "%s lacks %s" % (name, FIGURE_KEYS - set(fig))
    assert set(fig["latency_ms"]) >= LATENCY_KEYS, \
        "%s.latency_ms lacks %s" % (name, LATENCY_KEYS - set(fig["latency_ms"]))
    for key in ("ops", "hits", "misses"):
        assert isinstance(fig[key], count_type) and fig[key] >= 0, (name, key, fig[key])
    for key in ("ops_per_sec", "hits_per_sec", "misses_per_sec", "kb_per_sec"):
        assert isinstance(fig[key], (int, float)) and fig[key] >= 0, (name, key, fig[key])
    lat = fig["latency_ms"]
    if fig["ops"]:
        # Histogram percentiles may round up by the histogram's 1% precision.
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"], (name, lat)
        assert lat["p99.9"] <= lat["max"] * 1.02 + 0.001, (name, lat)
        assert 0 < lat["avg"] <= lat["max"] * 1.02 + 0.001, (name, lat)


def check_report(report):
    assert set(report) >= {"config", "seconds", "sets", "gets", "totals", "errors",
                           "prefill", "verify"}, sorted(report)
    config = report["config"]
    assert set(config) >= CONFIG_KEYS, "config lacks %s" % sorted(CONFIG_KEYS - set(config))
    assert "server" in config or "servers" in config, sorted(config)
    assert isinstance(report["seconds"], (int, float)) and report["seconds"] > 0
    for name in ("sets", "gets", "totals"):
        check_figures(name, report[name])
    sets, gets, totals = report["sets"], report["gets"], report["totals"]
    assert totals["ops"] == sets["ops"] + gets["ops"], (sets["ops"], gets["ops"], totals["ops"])
    assert totals["hits"] == gets["hits"] + sets["hits"]
    assert totals["misses"] == gets["misses"] + sets["misses"]
    if totals["ops"]:
        assert totals["ops_per_sec"] == pytest.approx(totals["ops"] / report["seconds"], rel=0.1)
    assert isinstance(report["errors"], dict)
    assert isinstance(report["prefill"], dict) and isinstance(report["prefill"]["sets"], int)


def error_count(report):
    return sum(report["errors"].values())


def check_table(stdout):
    """The memtier-like table: a header with the columns, Sets/Gets/Totals rows, errors."""
    for column in TABLE_COLUMNS:
        assert column in stdout, "no %r column in:\n%s" % (column, stdout)
    for row in ("Sets", "Gets", "Totals"):
        assert re.search(r"(?m)^%s\s" % row, stdout), "no %s row in:\n%s" % (row, stdout)
    assert re.search(r"(?im)^.*\berrors?\b", stdout), "no errors line in:\n%s" % stdout


# --------------------------------------------------------------------------- 1. a short run

@pytest.mark.parametrize("pipeline", [1, 8])
def test_short_run_report_and_server_stats_agree(tmp_path, fresh_server, pipeline):
    result, report = bench_ok(tmp_path, "-s", addr(fresh_server), "--pipeline", pipeline,
                              *SMALL)
    check_table(result.stdout)
    check_report(report)
    assert report["verify"] is None
    assert report["prefill"]["sets"] == 0
    assert error_count(report) == 0, report["errors"]
    sets, gets, totals = report["sets"], report["gets"], report["totals"]
    assert totals["ops"] == 4 * 200                       # --requests is per client
    assert 0 < sets["ops"] < gets["ops"], "ratio 1:10 ignored: %d sets, %d gets" % (
        sets["ops"], gets["ops"])
    assert gets["hits"] + gets["misses"] == gets["ops"]   # --multiget 1: one key per get
    assert totals["kb_per_sec"] > 0
    config = report["config"]
    assert (config["clients"], config["requests"], config["key_minimum"],
            config["key_maximum"], config["seed"], config["pipeline"]) == (4, 200, 1, 500, 7,
                                                                          pipeline)
    st = counters(fresh_server)
    assert st["cmd_set"] == sets["ops"], (st, sets["ops"])
    assert st["cmd_get"] == gets["ops"], (st, gets["ops"])
    assert st["get_hits"] == gets["hits"], (st, gets["hits"])


def test_table_without_json(tmp_path, start_server):
    srv = start_server("memtool")
    result = run_bench("-s", addr(srv), "-c", 2, "--requests", 20)
    assert result.returncode == 0, result.describe()
    check_table(result.stdout)
    assert result.stderr.strip() == "", "stderr is not a terminal: expected quiet\n" + \
        result.describe()


# --------------------------------------------------------------------------- 2. prefill

def test_prefill_then_get_only_hits_everything(tmp_path, fresh_server):
    _, report = bench_ok(tmp_path, "-s", addr(fresh_server), "--prefill", "--ratio", "0:1",
                         *SMALL)
    check_report(report)
    assert error_count(report) == 0, report["errors"]
    assert report["prefill"]["sets"] == 500                 # [1, 500], both ends included
    assert report["sets"]["ops"] == 0
    gets = report["gets"]
    assert gets["ops"] == 4 * 200
    assert (gets["hits"], gets["misses"]) == (gets["ops"], 0)
    st = counters(fresh_server)
    assert st["cmd_set"] == 500 + 0                         # prefill is not counted in sets
    assert st["cmd_get"] == gets["ops"]
    assert (st["get_hits"], st["get_misses"]) == (gets["ops"], 0)


def test_multiget_counts_requests_as_ops_and_keys_as_hits(tmp_path, fresh_server):
    _, report = bench_ok(tmp_path, "-s", addr(fresh_server), "--prefill", "--ratio", "0:1",
                         "--multiget", 4, "--key-pattern", "S", *SMALL)
    check_report(report)
    assert error_count(report) == 0, report["errors"]
    gets = report["gets"]
    assert gets["ops"] == 4 * 200                           # one multiget request = one op
    assert (gets["hits"], gets["misses"]) == (4 * gets["ops"], 0)
    st = counters(fresh_server)
    assert st["get_hits"] == gets["hits"] and st["get_misses"] == 0, st


@pytest.mark.parametrize("size_args, low, high", [
    (["-d", 32], 32, 32),
    (["--data-size-range", "5-9"], 5, 9),
], ids=["data-size", "data-size-range"])
def test_keys_and_values_on_the_server_follow_the_options(tmp_path, start_server,
                                                          size_args, low, high):
    srv = start_server("memtool")
    bench_ok(tmp_path, "-s", addr(srv), "--prefill", "--ratio", "0:1", "--key-prefix", "bt-",
             "--key-minimum", 10, "--key-maximum", 60, "-c", 2, "--requests", 10, *size_args)
    with srv.session() as s:
        items = s.get_items([b"bt-%d" % i for i in range(9, 62)])
    assert sorted(items) == sorted(b"bt-%d" % i for i in range(10, 61)), sorted(items)
    lengths = {len(value) for _, value, _ in items.values()}
    assert low <= min(lengths) and max(lengths) <= high, lengths


@pytest.mark.parametrize("pattern", ["R", "S", "G"])
def test_every_key_pattern_stays_in_the_key_range(tmp_path, start_server, pattern):
    # After prefill, a key outside [min, max] would be a miss.
    srv = start_server("memcached" if MEMCACHED_BIN else "memtool")
    _, report = bench_ok(tmp_path, "-s", addr(srv), "--prefill", "--ratio", "0:1",
                         "--key-pattern", pattern, *SMALL)
    assert report["config"]["key_pattern"] == pattern
    assert error_count(report) == 0, report["errors"]
    assert (report["gets"]["ops"], report["gets"]["hits"], report["gets"]["misses"]) == \
        (800, 800, 0)


def test_same_seed_same_workload(tmp_path, start_server):
    # One client, no pipelining: the request order is fixed, so the seed decides
    # which keys are written and which gets hit.
    outcomes = []
    for _ in range(2):
        srv = start_server("memcached" if MEMCACHED_BIN else "memtool")
        _, report = bench_ok(tmp_path, "-s", addr(srv), "-c", 1, "--requests", 300,
                             "--ratio", "1:1", "--key-minimum", 1, "--key-maximum", 100,
                             "--seed", 42)
        with srv.session() as s:
            stored = sorted(s.get_items([b"memtier-%d" % i for i in range(1, 101)]))
        outcomes.append((report["gets"]["hits"], report["gets"]["misses"], stored))
    assert outcomes[0] == outcomes[1]
    assert 0 < len(outcomes[0][2]) < 100, "expected some keys written, not all"


# Not the default fnv1a_64 + ketama here: twemproxy's fnv1a_64 is a weak 32-bit hash,
# "memtier-1".."memtier-500" land in a few narrow clusters, and for about 1 in 200
# random port pairs every key falls on the same server's arcs of the ring.
@pytest.mark.parametrize("hash_name, distribution", [("md5", "ketama"), ("fnv1a_64", "modula")])
def test_keys_are_spread_over_several_servers(tmp_path, start_server, hash_name, distribution):
    one, two = start_server("memtool"), start_server("memtool")
    _, report = bench_ok(tmp_path, "-s", addr(one), "-s", addr(two), "--prefill",
                         "--ratio", "0:1", "--hash", hash_name, "--distribution", distribution,
                         *SMALL)
    assert (report["config"]["hash"], report["config"]["distribution"]) == \
        (hash_name, distribution)
    assert error_count(report) == 0, report["errors"]
    assert (report["gets"]["hits"], report["gets"]["misses"]) == (800, 0)
    st1, st2 = counters(one), counters(two)
    assert st1["cmd_set"] + st2["cmd_set"] == 500
    assert st1["cmd_get"] + st2["cmd_get"] == 800
    assert st1["get_misses"] + st2["get_misses"] == 0
    keys = [b"memtier-%d" % i for i in range(1, 501)]
    with one.session() as s1, two.session() as s2:
        on_one = set(s1.get_items(keys))
        on_two = set(s2.get_items(keys))
    assert on_one and on_two, "all keys on one server: %d / %d" % (len(on_one), len(on_two))
    assert not on_one & on_two, "keys on both servers: %s" % sorted(on_one & on_two)[:5]
    assert len(on_one) + len(on_two) == 500
    assert (len(on_one), len(on_two)) == (st1["cmd_set"], st2["cmd_set"])


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("mode, kind", [
    ("server_error", "server_error"),
    ("client_error", "client_error"),
    ("error", "error"),
    ("parse", "parse"),             # a reply that is no reply to a get or a set
    ("close", "disconnect"),
    ("silent", "timeout"),
])
def test_failures_are_counted_per_kind(tmp_path, fake_server, mode, kind):
    srv = fake_server(mode)
    json_path = str(tmp_path / "errors.json")
    result = run_bench("-s", addr(srv), "-c", 2, "--requests", 2, "--timeout", 1,
                       "--key-minimum", 1, "--key-maximum", 50, json_path=json_path)
    assert "Traceback" not in result.stderr, result.describe()
    assert result.report is not None, "no report\n" + result.describe()
    errors = result.report["errors"]
    assert errors.get(kind, 0) >= 1, errors
    assert sum(errors.values()) == errors[kind], "other kinds counted too: %s" % errors
    assert result.report["totals"]["ops"] == 0, "a failed request counted as an op"
    assert re.search(r"(?im)^.*errors?\b.*\b%s\b" % kind, result.stdout), result.describe()


# --------------------------------------------------------------------------- 3. verify

@pytest.mark.parametrize("clients, pipeline", [(1, 8), (4, 1)])
def test_verify_finds_nothing_wrong_on_a_healthy_server(tmp_path, fresh_server,
                                                        clients, pipeline):
    # 20 keys and many writers: every key is rewritten several times, often concurrently.
    _, report = bench_ok(tmp_path, "-s", addr(fresh_server), "--prefill", "--verify",
                         "--ratio", "1:1", "--data-size-range", "1-100",
                         "-c", clients, "--pipeline", pipeline, "--requests", 50,
                         "--key-minimum", 1, "--key-maximum", 20)
    check_report(report)
    assert error_count(report) == 0, report["errors"]
    verify = report["verify"]
    assert (verify["checked"], verify["missing"], verify["wrong"]) == (20, 0, 0), verify
    assert report["prefill"]["sets"] == 20
    st = counters(fresh_server)
    assert st["cmd_set"] == 20 + report["sets"]["ops"], st
    assert st["cmd_get"] == report["gets"]["ops"] + verify["checked"], st


def test_verify_finds_a_value_changed_behind_its_back(tmp_path, fresh_server):
    srv = fresh_server
    with bench_in_background(tmp_path, "-s", addr(srv), "--prefill", "--verify",
                             "--ratio", "0:1", "--test-time", 3, "-c", 2, "-d", 32,
                             "--key-minimum", 1, "--key-maximum", 20) as (proc, finish):
        def prefilled():
            assert proc.poll() is None, "bench exited early:\n" + finish().describe()
            return counters(srv)["cmd_set"] >= 20
        wait_for(prefilled, 20, what="bench's prefill to reach the server")
        with srv.session() as s:
            assert s.get(b"memtier-7") is not None, "prefill did not write memtier-7"
            s.set(b"memtier-7", b"J" * 32)              # same length, different bytes
            s.call(b"delete memtier-9\r\n", b"DELETED\r\n")
        assert proc.poll() is None, "bench finished before the change; it would not see it"
        result = finish()
    assert result.returncode == 0, result.describe()
    report = result.report
    check_report(report)
    assert report["sets"]["ops"] == 0
    assert report["verify"]["checked"] == 20, report["verify"]
    assert (report["verify"]["wrong"], report["verify"]["missing"]) == (1, 1), report["verify"]
    assert report["gets"]["ops"] > 0
    assert report["seconds"] == pytest.approx(3, rel=0.3)       # --test-time 3


# --------------------------------------------------------------------------- 4. Histogram

@pytest.fixture(scope="module")
def Histogram():
    sys.path.insert(0, str(REPO))
    try:
        import memtool
    finally:
        sys.path.remove(str(REPO))
    return memtool.Histogram


def histogram_of(Histogram, samples):
    h = Histogram()
    for v in samples:
        h.record(v)
    return h


PERCENTILES = [0, 1, 10, 25, 50, 75, 90, 99, 99.9, 99.99, 100]


def assert_percentiles_close(h, samples, tolerance=0.01):
    """Each percentile within 1% of the exact order statistic (nearest rank, give or take
    one rank for the choice of rank convention)."""
    ordered = sorted(samples)
    n = len(ordered)
    for p in PERCENTILES:
        rank = max(1, math.ceil(p / 100 * n))
        low = ordered[max(0, rank - 2)] * (1 - tolerance)
        high = ordered[min(n - 1, rank)] * (1 + tolerance)
        got = h.percentile(p)
        assert low <= got <= high, "p%s: got %r, exact %r (n=%d)" % (p, got, ordered[rank - 1], n)


def test_importing_memtool_has_no_side_effects():
    r = subprocess.run([sys.executable, "-c", "import memtool; print(memtool.Histogram)"],
                       cwd=str(REPO), capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().count("\n") == 1 and r.stderr == b"", (r.stdout, r.stderr)


def test_histogram_uniform_samples(Histogram):
    samples = list(range(1, 100001))
    random.Random(1).shuffle(samples)
    h = histogram_of(Histogram, samples)
    assert h.count == 100000
    assert h.mean == pytest.approx(50000.5, rel=0.01)
    assert h.max == pytest.approx(100000, rel=0.01)
    assert h.percentile(50) == pytest.approx(50000, rel=0.01)
    assert h.percentile(99) == pytest.approx(99000, rel=0.01)
    assert_percentiles_close(h, samples)


def test_histogram_log_spread_samples(Histogram):
    # 1 µs .. 60 s, evenly spread on a log scale: exercises every magnitude.
    top = math.log10(60e6)
    samples = [int(round(10 ** (top * i / 20000))) for i in range(20001)]
    h = histogram_of(Histogram, samples)
    assert h.count == len(samples)
    assert h.max == pytest.approx(60e6, rel=0.01)
    assert h.mean == pytest.approx(sum(samples) / len(samples), rel=0.01)
    assert_percentiles_close(h, samples)


def test_histogram_merge_equals_one_histogram_of_all(Histogram):
    rng = random.Random(2)
    first = [int(rng.lognormvariate(6, 1.5)) + 1 for _ in range(30000)]
    second = [int(rng.lognormvariate(9, 1)) + 1 for _ in range(20000)]
    merged = histogram_of(Histogram, first)
    merged.merge(histogram_of(Histogram, second))
    whole = histogram_of(Histogram, first + second)
    assert merged.count == whole.count == 50000
    assert merged.max == whole.max
    assert merged.mean == pytest.approx(whole.mean, rel=1e-9)
    for p in PERCENTILES:
        assert merged.percentile(p) == whole.percentile(p), p
    assert_percentiles_close(merged, first + second)


def test_histogram_merge_with_empty(Histogram):
    h = histogram_of(Histogram, [10, 20, 30])
    h.merge(Histogram())
    assert h.count == 3
    assert h.percentile(100) == pytest.approx(30, rel=0.01)


@pytest.mark.parametrize("value", [0, 0.5, 60_000_001, 3600 * 10 ** 6, 10 ** 13],
                         ids=["zero", "half-us", "just-over-60s", "an-hour", "huge"])
def test_histogram_out_of_range_values_do_not_crash(Histogram, value):
    h = histogram_of(Histogram, [100, value])
    assert h.count == 2
    for p in (0, 50, 100):
        assert h.percentile(p) >= 0
    assert h.max >= 100 * 0.99


# --------------------------------------------------------------------------- 5. bad input

def test_unreachable_server_is_a_clear_error():
    result = run_bench("-s", "127.0.0.1:%d" % free_port(), "-c", 2, "--requests", 10,
                       "--timeout", 2)
    assert result.returncode == 1, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("memtool:"), result.describe()


def test_unreachable_vs_server_is_a_clear_error(start_server):
    srv = start_server("memtool")
    result = run_bench("-s", addr(srv), "--vs", "127.0.0.1:%d" % free_port(), "--rounds", 1,
                       "-c", 2, "--requests", 10, "--timeout", 2)
    assert result.returncode == 1, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    assert "memtool:" in result.stderr, result.describe()


@pytest.mark.parametrize("bad", [
    ["--ratio", "0:0"],
    ["--ratio", "1"],
    ["--ratio", "a:b"],
    ["--ratio", "-1:2"],
    ["-d", "-5"],
    ["--data-size", "0"],
    ["--clients", "0"],
    ["-c", "-3"],
    ["--data-size-range", "10-1"],
    ["--key-pattern", "X"],
    ["--protocol", "binary"],
], ids=lambda bad: " ".join(bad))
def test_bad_arguments_are_refused_by_the_parser(bad):
    result = run_bench("-s", "127.0.0.1:%d" % free_port(), *bad, timeout=30)
    assert result.returncode == 2, result.describe()
    assert "usage:" in result.stderr, result.describe()
    assert bad[0] in result.stderr, "the message should name the option\n" + result.describe()
    assert "Traceback" not in result.stderr, result.describe()


def test_no_server_is_refused_by_the_parser():
    result = run_bench("-c", 2, "--requests", 10, timeout=30)
    assert result.returncode == 2, result.describe()
    assert "Traceback" not in result.stderr, result.describe()


# --------------------------------------------------------------------------- 6. --vs

def test_vs_compares_two_servers(tmp_path, start_server):
    a, b = start_server("memtool"), start_server("memcached")
    result, report = bench_ok(tmp_path, "-s", addr(a), "--vs", addr(b), "--rounds", 2,
                              "-c", 4, "--requests", 100, "--key-minimum", 1,
                              "--key-maximum", 500)
    assert set(report) >= {"config", "a", "b", "ratio", "rounds"}, sorted(report)
    for side in ("a", "b"):
        for name in ("sets", "gets", "totals"):
            check_figures("%s.%s" % (side, name), report[side][name], (int, float))
        assert report[side]["totals"]["ops"] == 400, (side, report[side]["totals"])
        assert error_count(report[side]) == 0, (side, report[side]["errors"])
    assert report["ratio"]["ops_per_sec"] == pytest.approx(
        report["a"]["totals"]["ops_per_sec"] / report["b"]["totals"]["ops_per_sec"], rel=0.01)
    assert isinstance(report["rounds"], list) and report["rounds"], report["rounds"]
    # Each side saw its own two rounds' traffic, and only that.
    for srv in (a, b):
        st = counters(srv)
        assert st["cmd_get"] + st["cmd_set"] == 2 * 400, (srv.label, st)
    # Both tables and a ratio line.
    assert len(re.findall(r"(?m)^Totals\s", result.stdout)) >= 2, result.stdout
    assert re.search(r"(?i)ratio", result.stdout), result.stdout


# --------------------------------------------------------------------------- 7. processes

def test_processes_multiply_clients(tmp_path, start_server):
    srv = start_server("memtool")
    _, report = bench_ok(tmp_path, "-s", addr(srv), "--processes", 2, "-c", 2,
                         "--requests", 100, "--key-minimum", 1, "--key-maximum", 500,
                         "--prefill", "--verify")
    check_report(report)
    assert report["config"]["processes"] == 2
    assert error_count(report) == 0, report["errors"]
    assert report["totals"]["ops"] == 2 * 2 * 100           # processes * clients * requests
    # prefill and verify cover the whole key range once, however many processes
    assert report["prefill"]["sets"] == 500
    verify = report["verify"]
    assert (verify["checked"], verify["missing"], verify["wrong"]) == (500, 0, 0), verify
    assert report["gets"]["misses"] == 0
    st = counters(srv)
    assert st["cmd_set"] == 500 + report["sets"]["ops"], st
    assert st["cmd_get"] == report["gets"]["ops"] + 500, st


# --------------------------------------------------------------------------- 8. meta protocol

def test_meta_protocol_against_memcached(tmp_path, start_server):
    srv = start_server("memcached")
    _, report = bench_ok(tmp_path, "-s", addr(srv), "--protocol", "meta", "--prefill",
                         "--verify", *SMALL)
    check_report(report)
    assert report["config"]["protocol"] == "meta"
    assert error_count(report) == 0, report["errors"]
    assert report["totals"]["ops"] == 4 * 200
    gets = report["gets"]
    assert (gets["hits"], gets["misses"]) == (gets["ops"], 0)
    verify = report["verify"]
    assert (verify["checked"], verify["missing"], verify["wrong"]) == (500, 0, 0), verify
    st = counters(srv)
    assert st["cmd_set"] == 500 + report["sets"]["ops"], st
    assert st["cmd_get"] == gets["ops"] + verify["checked"], st


def test_processes_for_longer_than_a_progress_tick(tmp_path, start_server):
    """The parent waits for its workers a second at a time: a run past that works."""
    srv = start_server("memtool")
    _, report = bench_ok(tmp_path, "-s", addr(srv), "--processes", 2, "-c", 2,
                         "--test-time", 2, "--key-minimum", 1, "--key-maximum", 100)
    assert error_count(report) == 0, report["errors"]
    assert report["seconds"] >= 2 and report["totals"]["ops"] > 100
