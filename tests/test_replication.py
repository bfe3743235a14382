"""Replication: the stamp rule (socket-free), then real servers that --peer each
other, `replicate --to` an agent, and `replicate --check`."""
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

import memtool
from support import (MEMCACHED_BIN, MEMTOOL, REPO, FakeServer, MemcachedServer, MemtoolServer,
                     Session, free_ports, wait_for)

pytestmark = pytest.mark.memtool_only

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CONVERGE_TIMEOUT = 20.0


def run_memtool(*args, timeout=60):
    return subprocess.run([sys.executable, str(MEMTOOL), *map(str, args)], cwd=str(REPO),
                          capture_output=True, text=True, timeout=timeout)


def check(a, b, *extra):
    """`replicate --check` of two servers: (exit code, output)."""
    r = run_memtool("replicate", "--check", "127.0.0.1:%d" % a.port, "127.0.0.1:%d" % b.port,
                    *extra)
    return r.returncode, r.stdout + r.stderr


def link_stats(srv, peer):
    with srv.session() as s:
        stats = s.stats(b"repl")
    prefix = "repl:127.0.0.1:%d:" % peer.port
    return {name[len(prefix):]: value for name, value in stats.items()
            if name.startswith(prefix)} | {"role": stats["repl_role"]}


def caught_up(srv, peer):
    """srv's link from peer streams and has nothing left to read."""
    st = link_stats(srv, peer)
    return st.get("state") == "streaming" and st.get("bytes_behind") == "0"


def converged(a, b, timeout=CONVERGE_TIMEOUT):
    """Wait until --check finds a and b identical; return its output."""
    out = []

    def same():
        code, text = check(a, b)
        out[:] = [text]
        return code == 0
    try:
        wait_for(same, timeout, interval=0.3, what="identical servers")
    except AssertionError:
        raise AssertionError("servers differ:\n" + out[0][-3000:]) from None
    return out[0]


@pytest.fixture
def servers(tmp_path):
    made = []

    def make(name, *extra, engine="sqlite", port=None):
        srv = MemtoolServer(tmp_path / name, engine=engine, extra=[str(e) for e in extra],
                            port=port)
        made.append(srv)
        return srv
    yield make
    for srv in made:
        srv.close()


def pair(servers, engine="sqlite", *extra):
    """Two servers, each the other's peer (the Tokyo Tyrant dual master)."""
    pa, pb = free_ports(2)
    a = servers("a", "--sid", 1, "--peer", "127.0.0.1:%d" % pb, *extra, engine=engine, port=pa)
    b = servers("b", "--sid", 2, "--peer", "127.0.0.1:%d" % pa, *extra, engine=engine, port=pb)
    return a.start(), b.start()


# --------------------------------------------------------------------------- socket-free

def rec(stamp_us, sid, op, key=b"", value=b"", flags=0, exptime=0):
    return memtool.Record(stamp_us << 32 | sid, op, key, flags, exptime, 0, value)


def live_items(store):
    found = {}
    for key, item in list(store.cache.items()):
        item = store.get(key, False)
        if item is not None:
            found[key] = (item.flags, item.exptime, item.value)
    return found


def test_apply_is_idempotent_and_order_independent():
    """Any order, any duplicates: the same items (sets, deletes, flush_all, state bits)."""
    rng = random.Random(7)
    base = int(time.time() * 1e6)
    records = []
    for n in range(400):
        stamp, sid, key = base + rng.randrange(10 ** 6), rng.choice([1, 2, 3]), b"k%d" % rng.randrange(30)
        roll = rng.random()
        if roll < 0.6:
            records.append(rec(stamp, sid, memtool.OP_SET | (rng.choice([0, 2]) << 4), key,
                               b"v%d" % n, rng.randrange(5), rng.choice([0, 2 ** 31 - 1])))
        elif roll < 0.95:
            records.append(rec(stamp, sid, memtool.OP_DELETE, key))
        else:
            records.append(rec(stamp, sid, memtool.OP_FLUSH))
    results = []
    for trial in range(6):
        order = records + rng.sample(records, 50)        # some twice
        rng.shuffle(order)
        store = memtool.Store(sid=9)
        applied = sum(store.apply_remote(r) for r in order)
        assert applied < len(order)                      # duplicates and losers change nothing
        results.append(live_items(store))
    assert results[0] and all(r == results[0] for r in results)
    newest = {}
    flush = max(r.stamp for r in records if r.op == memtool.OP_FLUSH)
    for r in sorted(records, key=lambda r: r.stamp):
        if r.op & 0x0F != memtool.OP_FLUSH:
            newest[r.key] = r
    expected = {k: (r.flags, r.exptime, r.value) for k, r in newest.items()
                if r.op & 0x0F == memtool.OP_SET and r.stamp >= flush}
    assert results[0] == expected


def test_a_delete_outlives_an_older_write_on_disk(tmp_path):
    """A tombstone is a row: after a reopen an older write still loses to it."""
    engine = memtool.open_engine("sqlite", str(tmp_path))
    store = memtool.Store(engine, sid=3)
    base = int(time.time() * 1e6)
    assert store.apply_remote(rec(base + 10, 1, memtool.OP_SET, b"k", b"new"))
    assert store.apply_remote(rec(base + 20, 2, memtool.OP_DELETE, b"k"))
    assert store.get(b"k") is None and store.curr_items == 0
    assert store.close()
    store = memtool.Store(memtool.open_engine("sqlite", str(tmp_path)), sid=3)
    assert not store.apply_remote(rec(base + 15, 1, memtool.OP_SET, b"k", b"old"))
    assert store.get(b"k") is None and store.curr_items == 0
    assert store.apply_remote(rec(base + 25, 1, memtool.OP_SET, b"k", b"newer"))
    assert store.get(b"k").value == b"newer" and store.curr_items == 1
    assert store.stamp_now() >> 32 > base + 25                 # the clock moved past it
    store.close()


@pytest.mark.parametrize("kind", ["sqlite", "dumb"])
def test_a_scan_reads_a_bounded_part_per_chunk(tmp_path, kind):
    """Past a long run of flushed rows, and over big values, each chunk reads at
    most `limit` rows or about max_bytes; the scan still finds every live key,
    also when a row ahead of it goes away (the sweep)."""
    store = memtool.Store(memtool.open_engine(kind, str(tmp_path)), sid=3)
    base = int(time.time() * 1e6)
    for i in range(1200):
        store.apply_remote(rec(base + i, 1, memtool.OP_SET, b"a%04d" % i, b"x"))
    store.apply_remote(rec(base + 2000, 1, memtool.OP_FLUSH))
    for i in range(20):
        store.apply_remote(rec(base + 3000 + i, 1, memtool.OP_SET, b"z%02d" % i, b"v" * 50000))
    store.checkpoint()
    scan = memtool.StoreScan(store)
    chunks = [[key for key, _ in scan.chunk(100, 200000)]]
    store.engine.write((), [b"a%04d" % i for i in range(150, 160)])     # ahead of the scan
    while not scan.ended:
        chunks.append([key for key, _ in scan.chunk(100, 200000)])
    assert [key for chunk in chunks for key in chunk] == [b"z%02d" % i for i in range(20)]
    assert chunks[0] == [] and max(map(len, chunks)) <= 5, chunks
    store.close()


def test_torn_tail_at_every_offset(tmp_path):
    """A crash may cut the newest ulog file anywhere: every whole record before the
    cut is replayed, the rest is cut off, and the stream reader tells "need more"
    from damage at each of those offsets."""
    ulog = memtool.UpdateLog(str(tmp_path / "src"))
    ulog.open()
    base = int(time.time() * 1e6)
    for n in range(8):
        ulog.append(*rec(base + n, 1, memtool.OP_SET, b"key%d" % n, b"x" * (n * 7)))
    ulog.append(*rec(base + 9, 1, memtool.OP_DELETE, b"key3"))
    assert ulog.flush()
    name = ulog.name
    ulog.close()
    data = (tmp_path / "src" / name).read_bytes()
    ends, pos = [], 0
    while pos < len(data):
        pos = memtool.read_record(data, pos)[1]
        ends.append(pos)
    for cut in range(len(data) + 1):
        whole = sum(1 for end in ends if end <= cut)
        assert whole_frames(data[:cut]) == whole
        directory = tmp_path / ("cut%d" % cut) / "ulog"
        directory.mkdir(parents=True)
        (directory / name).write_bytes(data[:cut])
        log = memtool.UpdateLog(str(directory))
        store = memtool.Store()
        assert memtool.recover(store, log, str(directory.parent)) == whole
        log.close()
        assert (directory / name).stat().st_size == (ends[whole - 1] if whole else 0)
    damaged = bytearray(data)
    damaged[ends[2] + 20] ^= 0xFF
    with pytest.raises(memtool.LogCorrupt):
        memtool.read_frame(bytes(damaged), ends[2], 1 << 20)


def whole_frames(buf):
    """How many whole frames the stream reader finds in buf before it needs more."""
    count, pos = 0, 0
    while True:
        found = memtool.read_frame(buf, pos, 1 << 20)
        if found is None:
            return count
        count, pos = count + 1, found[2]


def test_release1_data_opens(tmp_path):
    """A data directory of the release before stamps (killed with SIGKILL, so part of
    it is only in the log) opens with every item, flag, exptime and cas unique."""
    with tarfile.open(FIXTURES / "release1-data.tar.gz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(tmp_path / "w", filter="data")
        else:
            tar.extractall(tmp_path / "w")
    srv = MemtoolServer(tmp_path / "w")
    srv.start()
    try:
        with srv.session() as s:
            keys = [b"gone", b"del", b"ttl", b"later", b"n"] + [b"ck%d" % i for i in range(50)] \
                + [b"lg%d" % i for i in range(50)]
            items = s.get_items(keys, b"gets")
            assert items[b"later"] == (7, b"later", 52)
            assert items[b"n"] == (0, b"115", 108)
            assert items[b"ck0"] == (0, b"v00+", 107)
            assert items[b"ck2"] == (2, b"v02", 4) and items[b"ck49"] == (49, b"v49", 51)
            assert items[b"lg0"] == (0, b"w00", 57) and items[b"lg49"] == (49, b"w49", 106)
            assert set(items) == set(keys) - {b"gone", b"del", b"ttl", b"ck1"}
            s.send(b"mg later t\r\n")
            ttl = int(s.read_line()[4:])
            assert abs(ttl - (2000000001 - time.time())) < 2
            s.set(b"new", b"after the upgrade")
        srv.restart()
        with srv.session() as s:
            assert s.get(b"new") == b"after the upgrade"
            assert s.get_items([b"ck2"], b"gets")[b"ck2"] == (2, b"v02", 4)
    finally:
        srv.close()


# --------------------------------------------------------------------------- servers

def test_write_on_a_read_on_b_and_lag_is_visible(servers):
    a, b = pair(servers)
    with a.session() as s:
        s.set(b"hello", b"world", flags=5)
    with b.session() as s:
        wait_for(lambda: s.get(b"hello") == b"world", 1.0, what="the write on B")
    r = run_memtool("bench", "-s", "127.0.0.1:%d" % a.port, "--verify-on",
                    "127.0.0.1:%d" % b.port, "-c", 10, "-n", 1000, "--ratio", "1:1",
                    "--key-maximum", 5000, "--timeout", 10)
    assert r.returncode == 0 and ", 0 missing, 0 wrong" in r.stdout, r.stdout + r.stderr
    wait_for(lambda: caught_up(b, a), 10, what="B caught up")
    st = link_stats(b, a)
    assert st["role"] == "source+replica" and st["lag_records"] == "0"
    assert int(st["applied"]) >= 5001
    with urllib.request.urlopen("http://127.0.0.1:%d/" % b.port, timeout=5) as response:
        doc = json.load(response)
    assert doc["repl:127.0.0.1:%d:state" % a.port] == "streaming"
    assert doc["repl_role"] == "source+replica"
    converged(a, b)


def incr_stream(srv, key, stop, counts):
    """Send `incr key 1` to srv until stop is set, through restarts; counts[0]:
    acknowledged, counts[1]: sent but unanswered (the server died)."""
    s = None
    while not stop.is_set():
        try:
            if s is None:
                s = Session(srv.port, timeout=2)
            s.send(b"incr %s 1\r\n" % key)
            line = s.read_line()
            assert line[:-2].isdigit(), line
            counts[0] += 1
        except (OSError, AssertionError):
            counts[1] += 1
            if s is not None:
                s.close()
            s = None
            time.sleep(0.05)
    if s is not None:
        s.close()


@pytest.mark.parametrize("victim", ["replica", "source"])
def test_kill9_in_an_incr_stream_skips_and_repeats_nothing(servers, victim):
    pa, pb = free_ports(2)
    a = servers("a", "--sid", 1, "--sync", "always", port=pa).start()
    b = servers("b", "--sid", 2, "--sync", "always", "--peer", "127.0.0.1:%d" % pa,
                port=pb).start()
    with a.session() as s:
        s.set(b"c", b"0")
    stop, counts = threading.Event(), [0, 0]
    writer = threading.Thread(target=incr_stream, args=(a, b"c", stop, counts))
    writer.start()
    try:
        wait_for(lambda: counts[0] > 300, 20, what="incrs")
        dead = b if victim == "replica" else a
        dead.kill9()
        time.sleep(0.3)
        dead.start()
        wait_for(lambda: counts[0] > 900, 20, what="more incrs")
    finally:
        stop.set()
        writer.join(10)
    with a.session() as s:
        value = int(s.get(b"c"))
    assert counts[0] <= value <= counts[0] + counts[1]     # an unanswered incr may have landed
    if victim == "replica":
        assert value == counts[0]
    with b.session() as s:
        wait_for(lambda: s.get(b"c") == b"%d" % value, 10, what="B's counter = A's")


def load(srv, n, value_size=20):
    """n items k0..k(n-1), their values the number in value_size digits; pipelined."""
    with srv.session(timeout=30) as s:
        for start in range(0, n, 5000):
            s.send(b"".join(b"set k%d 0 0 %d noreply\r\n%s\r\n" % (
                i, value_size, b"%0*d" % (value_size, i)) for i in range(start, min(n, start + 5000))))
        s.sync()


def bench(srv, *args):
    return subprocess.Popen([sys.executable, str(MEMTOOL), "bench", "-s",
                             "127.0.0.1:%d" % srv.port, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_new_replica_gets_a_full_copy_while_writes_go_on(servers):
    a = servers("a", "--sid", 1).start()
    load(a, 100000)
    writes = bench(a, "-c", 5, "--test-time", 3, "--ratio", "1:0", "--key-prefix", "w",
                   "--key-maximum", 20000)
    time.sleep(0.5)
    b = servers("b", "--sid", 2, "--peer", "127.0.0.1:%d" % a.port).start()
    out = writes.communicate(timeout=30)[0]
    assert writes.returncode == 0, out
    wait_for(lambda: caught_up(b, a), CONVERGE_TIMEOUT, what="B caught up")
    converged(a, b)
    with b.session() as s:
        assert int(s.stats()["curr_items"]) >= 100000


def test_a_replica_past_the_retained_log_gets_a_full_copy(servers):
    a = servers("a", "--sid", 1, "--ulog-limit", "64k", "--ulog-keep", 0, "--ulog-retain",
                "64k").start()
    b = servers("b", "--sid", 2, "--peer", "127.0.0.1:%d" % a.port, "-v").start()
    load(a, 100)
    wait_for(lambda: caught_up(b, a), 10, what="B caught up")
    assert b.stop() == 0
    for _ in range(4):
        load(a, 5000, 100)                 # ~0.6 MB: many files rotate out
    with a.session() as s:
        s.call(b"delete k7\r\n", b"DELETED\r\n")
    wait_for(lambda: (a.data / "ulog" / "PRUNED").exists(), 10, what="old files pruned")
    b.start()
    wait_for(lambda: caught_up(b, a), CONVERGE_TIMEOUT, what="B caught up")
    converged(a, b)
    log = b.log_text()          # the first copy is routine, the second one is news
    assert "INFO replication from 127.0.0.1:%d: a full copy begins" % a.port in log \
        and "WARNING replication from 127.0.0.1:%d: a full copy begins" % a.port in log, \
        b.log_tail()
    with b.session() as s:
        assert s.get(b"k7") is None and s.get(b"k4999") == b"%0100d" % 4999


def write_fixed(srv, prefix):
    """100 sets of the same size: their records too."""
    with srv.session() as s:
        s.send(b"".join(b"set %s%04d 0 0 8 noreply\r\n%08d\r\n" % (prefix, i, i)
                        for i in range(100)))
        s.sync()


def back_up(srv):
    """Stop srv and copy its data directory aside; returns the copy."""
    assert srv.stop() == 0
    copy = srv.data.parent / "backup"
    shutil.copytree(srv.data, copy)
    return copy


def restore(srv, copy):
    shutil.rmtree(srv.data)
    shutil.copytree(copy, srv.data)


def test_a_source_restored_from_a_backup_gives_its_replica_a_full_copy(servers):
    """Tokyo Tyrant's flaw: a master whose log went back in time and wrote other
    records of the same sizes: the replica's offset lands on a record boundary."""
    a = servers("a", "--sid", 1).start()
    b = servers("b", "--sid", 2, "--peer", "127.0.0.1:%d" % a.port).start()
    write_fixed(a, b"r")
    wait_for(lambda: caught_up(b, a), 10, what="B caught up")
    copy = back_up(a)
    a.start()
    write_fixed(a, b"s")                    # the writes the backup will not have
    wait_for(lambda: caught_up(b, a), 10, what="B caught up")
    assert b.stop() == 0 and a.stop() == 0
    restore(a, copy)
    a.start()
    write_fixed(a, b"t")                    # as many bytes as the "s" writes
    b.start()
    wait_for(lambda: caught_up(b, a), CONVERGE_TIMEOUT, what="B caught up")
    with b.session() as s:
        assert [s.get(b"t%04d" % i) for i in (0, 99)] == [b"00000000", b"00000099"]
    assert "follows other records than it applied" in a.log_text(), a.log_tail()


def test_a_position_from_a_full_copy_is_checked_too(servers):
    """The replica's only position came with a full copy: it names the record
    before it as well, and the restored source's new records are not skipped."""
    a = servers("a", "--sid", 1).start()
    write_fixed(a, b"r")
    copy = back_up(a)
    a.start()
    write_fixed(a, b"s")
    a.kill9()                     # the record before the copy's position is found again,
    a.start()                     # by the replay
    assert a.stop() == 0          # ... and from the store's meta row
    a.start()
    b = servers("b", "--sid", 2, "--peer", "127.0.0.1:%d" % a.port).start()
    wait_for(lambda: caught_up(b, a), 10, what="B's full copy")
    assert b.stop() == 0 and a.stop() == 0
    restore(a, copy)
    a.start()
    write_fixed(a, b"t")                       # where the "s" records were
    b.start()
    wait_for(lambda: caught_up(b, a), CONVERGE_TIMEOUT, what="B caught up")
    with b.session() as s:
        assert [s.get(b"t%04d" % i) for i in (0, 99)] == [b"00000000", b"00000099"]


@pytest.mark.parametrize("peer_down", [False, True])
def test_a_master_restored_from_a_backup_gets_its_lost_writes_back(servers, peer_down):
    """What B wrote after its backup lives on at A only: B's lost window brings
    it back and the pair converges; also when B, restored while A is down,
    restarts again before A is back (the window is kept)."""
    a, b = pair(servers)
    write_fixed(b, b"r")
    wait_for(lambda: caught_up(a, b), 10, what="A caught up")
    copy = back_up(b)
    b.start()
    write_fixed(b, b"s")                              # lost by B's restore below
    wait_for(lambda: caught_up(a, b), 10, what="A caught up")
    assert b.stop() == 0
    if peer_down:
        assert a.stop() == 0
    restore(b, copy)
    b.start()
    if peer_down:
        with b.session() as s:
            s.set(b"meanwhile", b"on b")
        assert b.stop() == 0
        a.start()
        b.start()
    with b.session() as s:
        wait_for(lambda: s.get(b"s0099") == b"00000099", CONVERGE_TIMEOUT,
                 what="B's lost writes back from A")
    converged(a, b)


def mixed_writes(srv, seed, stop, keys=40):
    """Sets, deletes, touches, appends, incrs and a flush_all on a shared key space."""
    rng = random.Random(seed)
    flushed = False
    with srv.session() as s:
        while not stop.is_set():
            key = b"d%d" % rng.randrange(keys)
            roll = rng.random()
            if roll < 0.45:
                value = b"%d-%d" % (seed, rng.randrange(10 ** 6))
                s.send(b"set %s %d %d %d noreply\r\n%s\r\n" % (
                    key, rng.randrange(8), rng.choice([0, 3600, 7200]), len(value), value))
            elif roll < 0.6:
                s.send(b"delete %s noreply\r\n" % key)
            elif roll < 0.7:
                s.send(b"touch %s %d noreply\r\n" % (key, rng.choice([1800, 5400])))
            elif roll < 0.8:
                s.send(b"append %s 0 0 1 noreply\r\n%d\r\n" % (key, seed))
            elif roll < 0.97:
                s.send(b"incr n%d 1 noreply\r\nadd n%d 0 0 1 noreply\r\n0\r\n" % (
                    rng.randrange(5), rng.randrange(5)))
            elif not flushed and rng.random() < 0.05:
                s.send(b"flush_all noreply\r\n")
                flushed = True
            if rng.random() < 0.05:
                s.sync()


def all_items(srv, keys):
    with srv.session() as s:
        return s.get_items(keys)


def test_dual_master_converges(servers):
    a, b = pair(servers)
    stop = threading.Event()
    threads = [threading.Thread(target=mixed_writes, args=(srv, n, stop))
               for n, srv in enumerate((a, b, a, b))]
    for t in threads:
        t.start()
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join(10)
    wait_for(lambda: caught_up(a, b) and caught_up(b, a), CONVERGE_TIMEOUT, what="caught up")
    text = converged(a, b)
    assert "identical" in text
    keys = [b"d%d" % i for i in range(40)] + [b"n%d" % i for i in range(5)]
    items_a = {k: v[:2] for k, v in all_items(a, keys).items()}
    assert items_a and items_a == {k: v[:2] for k, v in all_items(b, keys).items()}


class Relay(FakeServer):
    """A TCP relay in the test process: its port forwards to target_port; cut()
    drops every connection and refuses new ones until heal()."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.open = True
        self.socks = []
        super().__init__()

    def handle(self, conn):
        if not self.open:
            conn.close()
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            conn.close()
            return
        self.socks += [conn, upstream]
        for src, dst in ((conn, upstream), (upstream, conn)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        self.open = False
        for sock in self.socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.socks = []

    def heal(self):
        self.open = True

    def close(self):
        self.cut()
        super().close()


def test_a_partition_heals_by_the_stamp_rule(servers):
    pa, pb = free_ports(2)
    to_a, to_b = Relay(pa), Relay(pb)
    try:
        a = servers("a", "--sid", 1, "--peer", "127.0.0.1:%d" % to_b.port, port=pa).start()
        b = servers("b", "--sid", 2, "--peer", "127.0.0.1:%d" % to_a.port, port=pb).start()
        with a.session() as s:
            for i in range(20):
                s.set(b"p%d" % i, b"before")
        wait_for(lambda: caught_up(b, to_a), 10, what="B caught up")
        to_a.cut()
        to_b.cut()
        with a.session() as sa, b.session() as sb:
            for i in range(20):           # each key written on both sides, B's later
                first, second = (sa, sb) if i % 2 else (sb, sa)
                first.set(b"p%d" % i, b"first")
                time.sleep(0.002)
                second.set(b"p%d" % i, b"second")
            sa.call(b"delete p0\r\n", b"DELETED\r\n")
            sb.set(b"only-b", b"x")
            assert sa.get(b"only-b") is None
        wait_for(lambda: link_stats(a, to_b)["state"] != "streaming", 10, what="A's link down")
        to_a.heal()
        to_b.heal()
        wait_for(lambda: caught_up(a, to_b) and caught_up(b, to_a), CONVERGE_TIMEOUT,
                 what="both caught up")
        converged(a, b)
        with a.session() as s:
            got = s.get_items([b"p%d" % i for i in range(20)] + [b"only-b"])
        assert b"p0" not in got and got[b"only-b"][1] == b"x"
        assert all(got[b"p%d" % i][1] == b"second" for i in range(1, 20))
    finally:
        to_a.close()
        to_b.close()


def test_sigstop_shows_the_link_down_and_lag(servers):
    a, b = pair(servers)
    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        with b.session() as s:
            s.set(b"while-stopped", b"1")
        wait_for(lambda: link_stats(b, a)["state"] in ("down", "connecting"), 15,
                 what="B sees A stopped")
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    wait_for(lambda: caught_up(a, b) and caught_up(b, a), CONVERGE_TIMEOUT, what="caught up")
    with a.session() as s:
        assert s.get(b"while-stopped") == b"1"


def test_a_ring_of_three_applies_each_write_once(servers):
    ports = free_ports(3)
    names = "abc"
    ring = [servers(names[i], "--sid", i + 1, "--peer", "127.0.0.1:%d" % ports[i - 1],
                    port=ports[i]) for i in range(3)]
    for srv in ring:
        srv.start()
    per_server = 30
    for i, srv in enumerate(ring):
        with srv.session() as s:
            for n in range(per_server):
                s.set(b"r%s%d" % (names[i].encode(), n), names[i].encode())
    keys = [b"r%s%d" % (x.encode(), n) for x in names for n in range(per_server)]
    for i, srv in enumerate(ring):
        wait_for(lambda srv=srv: len(all_items(srv, keys)) == len(keys), 10,
                 what="every key on %s" % names[i])
    for i, srv in enumerate(ring):
        upstream = ring[i - 1]
        wait_for(lambda: caught_up(srv, upstream), 10, what="caught up")
        assert link_stats(srv, upstream)["applied"] == str(2 * per_server)


@pytest.mark.skipif(MEMCACHED_BIN is None, reason="needs the memcached binary")
def test_replicate_to_memcached_resumes_from_its_rts(servers, tmp_path):
    a = servers("a", "--sid", 1).start()
    mc = MemcachedServer(tmp_path / "mc").start()
    rts = tmp_path / "rts"
    agent_log = open(tmp_path / "agent.log", "w")
    argv = [sys.executable, str(MEMTOOL), "replicate", "-v", "--from", "127.0.0.1:%d" % a.port,
            "--to", "127.0.0.1:%d" % mc.port, "--rts", str(rts)]
    agent = subprocess.Popen(argv, stdout=agent_log, stderr=agent_log)
    try:
        with a.session() as s:
            s.set(b"ttl", b"t", exptime=3600)
            s.set(b"gone", b"g")
            s.call(b"delete gone\r\n", b"DELETED\r\n")
        r = run_memtool("bench", "-s", "127.0.0.1:%d" % a.port, "--verify-on",
                        "127.0.0.1:%d" % mc.port, "-c", 10, "-n", 500, "--ratio", "1:0",
                        "--key-maximum", 3000, "--timeout", 10)
        assert r.returncode == 0 and ", 0 missing, 0 wrong" in r.stdout, r.stdout + r.stderr
        with mc.session() as s:
            assert s.get(b"gone") is None
            s.send(b"mg ttl t v\r\n")
            # the remaining TTL went across, less the seconds the bench took
            line = s.read_line()
            assert line.startswith(b"VA 1 t") and 3500 < int(line[6:]) <= 3600, line
            s.expect(b"t\r\n")
        wait_for(lambda: rts.exists(), 10, what="the rts file")
        agent.kill()
        agent.wait(10)
        with a.session() as s:
            s.set(b"later", b"after the agent died")
        agent = subprocess.Popen(argv, stdout=agent_log, stderr=agent_log)
        with mc.session() as s:
            wait_for(lambda: s.get(b"later") == b"after the agent died", 10, what="resumed")
        text = (tmp_path / "agent.log").read_text()
        assert text.count("a full copy begins") == 1, text
    finally:
        agent.kill()
        agent.wait(10)
        agent_log.close()
        mc.close()


def test_replicate_to_a_memtool_keeps_the_stamps(servers):
    a = servers("a", "--sid", 1).start()
    b = servers("b", "--sid", 2).start()
    with b.session() as s:
        s.set(b"k", b"written on b first")
    time.sleep(0.01)
    with a.session() as s:
        s.set(b"k", b"written on a later")
        s.set(b"other", b"o")
    agent = subprocess.Popen([sys.executable, str(MEMTOOL), "replicate", "--from",
                              "127.0.0.1:%d" % a.port, "--to", "127.0.0.1:%d" % b.port],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        converged(a, b)
        with b.session() as s:
            s.set(b"k", b"newest, on b")           # later than a's: a newer stamp
        with a.session() as s:
            s.set(b"more", b"m")
        with b.session() as s:
            wait_for(lambda: s.get(b"more") == b"m", 10, what="the agent goes on")
            assert s.get(b"k") == b"newest, on b"
    finally:
        agent.kill()
        agent.wait(10)


def test_memory_engine_pair_and_a_restart_copy(servers):
    a, b = pair(servers, "memory")
    with a.session() as s:
        s.set(b"from-a", b"1")
    with b.session() as s:
        s.set(b"from-b", b"2")
        wait_for(lambda: s.get(b"from-a") == b"1", 5, what="A's write on B")
    with a.session() as s:
        wait_for(lambda: s.get(b"from-b") == b"2", 5, what="B's write on A")
    b.kill9()
    b.start()
    with b.session() as s:
        wait_for(lambda: s.get(b"from-a") == b"1" and s.get(b"from-b") == b"2", 10,
                 what="the full copy")
    converged(a, b)


def test_the_same_sid_is_refused_on_both_sides(servers):
    pa, pb = free_ports(2)
    a = servers("a", "--sid", 5, "--peer", "127.0.0.1:%d" % pb, port=pa).start()
    b = servers("b", "--sid", 5, "--peer", "127.0.0.1:%d" % pa, port=pb).start()
    for srv in (a, b):
        wait_for(lambda srv=srv: "same sid" in srv.log_text() and "own sid" in srv.log_text(),
                 10, what="both sides say why")
    assert link_stats(a, b)["state"] != "streaming"
    with a.session() as s:
        s.set(b"still", b"serving")


def test_replicate_refuses_an_rts_file_it_cannot_read(tmp_path):
    rts = tmp_path / "rts"
    rts.write_text("1 00000000000000000001.ulog\n")
    r = run_memtool("replicate", "--from", "127.0.0.1:1", "--to", "127.0.0.1:2", "--rts", rts,
                    timeout=20)
    assert r.returncode == 1 and r.stderr.startswith("memtool: %s: not an rts" % rts) \
        and "full copy" in r.stderr and "Traceback" not in r.stderr, r.stderr


class FakeSource(FakeServer):
    """A source that answers `repl` with what a test gives it, and counts the tries."""

    def __init__(self, reply):
        self.reply = reply
        self.tries = 0
        self.requests = b""
        super().__init__()

    def handle(self, conn):
        self.tries += 1
        try:
            self.requests += conn.recv(4096)
            conn.sendall(self.reply)
            time.sleep(0.2)
        except OSError:
            pass
        conn.close()


def good_frames():
    base = int(time.time() * 1e6)
    frame = b"".join(memtool.record_frame(*rec(base, 7, memtool.OP_SET, b"fk", b"fine")))
    return frame, memtool.control_frame(memtool.REPL_POSITION, b"00000000000000000001.ulog 1")


@pytest.mark.parametrize("damage", ["bad crc", "cut mid-record", "not memtool", "bad position",
                                    "short heartbeat"])
def test_a_bad_stream_is_dropped_and_retried(servers, damage):
    frame, position = good_frames()
    bad = bytearray(frame)
    bad[-1] ^= 0x01
    reply = {"bad crc": b"REPL 7\r\n" + frame + position + bytes(bad),
             "cut mid-record": b"REPL 7\r\n" + frame + position + frame[:len(frame) // 2],
             "not memtool": b"VERSION 1.6.18\r\n",
             "bad position": b"REPL 7\r\n" + frame + position + frame +
             memtool.control_frame(memtool.REPL_POSITION, b"oops"),
             "short heartbeat": b"REPL 7\r\n" + frame + position +
             memtool.control_frame(memtool.REPL_HEARTBEAT_KIND, b"\0" * 8)}[damage]
    fake = FakeSource(reply)
    b = servers("b", "--sid", 2, "--peer", "127.0.0.1:%d" % fake.port).start()
    with b.session() as s:
        s.set(b"mine", b"kept")
        wait_for(lambda: fake.tries >= 3, 15, what="retries")
        assert s.get(b"mine") == b"kept"
        if damage != "not memtool":
            assert s.get(b"fk") == b"fine"      # what came whole before the damage
    b.restart()
    with b.session() as s:
        assert s.get(b"mine") == b"kept"
    fake.close()
    assert "retrying" in b.log_text() and "Traceback" not in b.log_text(), b.log_tail()
    assert b"oops" not in fake.requests             # a bad position is never asked for


def test_hostile_replication_requests_are_refused_and_bounded(servers):
    a = servers("a", "--sid", 1).start()
    load(a, 50)
    with a.session() as s:
        s.call(b"repl 2 0 0 1 00000000000000000001.ulog -1\r\n",
               b"CLIENT_ERROR usage: repl <replica sid> <lost after> <lost before> <source sid> "
               b"<file> <offset> [<stamp> <length>]\r\n")
        s.call(b"rdigest 16 " + b" ".join(b"1:%d" % (i % 2) for i in range(509)) + b"\r\n",
               b"CLIENT_ERROR usage: rdigest <bits>|keys <length>:<value>... (at most 32768 "
               b"entries)\r\n")                          # deduplicated: 2 << 16 entries
        s.call(b"rfetch " + b" ".join(b"k%d" % i for i in range(101)) + b"\r\n",
               b"CLIENT_ERROR at most 100 keys per rfetch\r\n")
        s.send(b"rfetch k1 k1 nothing\r\n")
        assert s.read_line().startswith(b"VALUE k1 0 ")
        s.read_line()
        s.expect(b"END\r\n")
        far = rec(2 ** 64 - 1, 9, memtool.OP_SET, b"far", b"future")
        s.call(b"rapply\r\n" + b"".join(memtool.record_frame(*far)) +
               memtool.control_frame(memtool.REPL_POSITION, b"x 1"),
               b"RAPPLY 1\r\nOK x 1\r\n")               # in one write: the frames too
    a.kill9()                             # before a checkpoint: the start replays it
    a.start()
    with a.session() as s:
        s.set(b"after", b"still writable")               # the clock did not follow it
    assert a.stop() == 0
    a.start()
    with a.session() as s:
        s.set(b"after", b"and after a restart")
        assert s.get(b"far") == b"future"
    assert "ahead of our clock" in a.log_text()


def test_check_lists_differences_and_repairs_them(servers):
    a = servers("a", "--sid", 1).start()
    b = servers("b", "--sid", 2).start()
    load(a, 3000)
    load(b, 3000)
    with a.session() as s:
        s.set(b"k5", b"changed on a")
        s.call(b"delete k6\r\n", b"DELETED\r\n")
    time.sleep(0.01)
    with b.session() as s:
        s.set(b"k7", b"changed on b")
        s.set(b"only-b", b"x")
    code, out = check(a, b)
    assert code == 1 and "4 key(s) differ" in out, out
    assert "k6" in out and "deleted" in out and "only-b" in out
    code, out = check(a, b, "--repair")
    assert code == 0, out
    with b.session() as s:
        assert s.get(b"k5") == b"changed on a" and s.get(b"k6") is None
    with a.session() as s:
        assert s.get(b"k7") == b"changed on b" and s.get(b"only-b") == b"x"
