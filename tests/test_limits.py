"""Bounded resources: memory under floods and parked uploads, file descriptors,
one client's share of the loop; and the binary protocol failing fast."""
import resource
import socket
import threading
import time

import pytest

from support import MemtoolServer, Session, wait_for

pytestmark = pytest.mark.memtool_only


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0


@pytest.fixture
def fresh(tmp_path):
    made = []

    def make(*extra, engine="memory"):
        srv = MemtoolServer(tmp_path / ("s%d" % len(made)), engine=engine, extra=extra)
        made.append(srv)
        return srv.start()
    yield make
    for srv in made:
        srv.close()


def test_error_replies_cost_no_lasting_memory(fresh):
    """100,000 error-producing commands: RSS stays within a few MB (each raise of a
    shared exception instance used to keep its traceback and buffers)."""
    srv = fresh()
    flood = (b"incr text 1\r\nset k 0 x 1\r\nget " + b"k" * 251 + b"\r\nbogus\r\n"
             b"mg k Zz\r\nma text\r\n") * 100
    with srv.session(timeout=30) as s:
        s.call(b"set text 0 0 3\r\nabc\r\n", b"STORED\r\n")

        def send_flood():
            s.send(flood + b"mn\r\n")
            replies = s.read_until(b"MN\r\n")
            assert replies.count(b"ERROR") == 600, replies[:300]
        send_flood()
        before = rss_kib(srv.proc.pid)
        for _ in range(170):               # 6 errors x 100 x 170 = 102,000 error replies
            send_flood()
        after = rss_kib(srv.proc.pid)
    assert after - before < 4096, (before, after)


def test_parked_partial_sets_are_bounded_by_m(fresh):
    """Clients that start 1 MB sets and stall hold at most -m between them; the rest
    get memcached's out-of-memory error, their data is swallowed, and they go on."""
    srv = fresh("-m", "16")
    base = rss_kib(srv.proc.pid)
    socks, replies = [], []
    chunk = b"x" * (900 << 10)
    for i in range(60):                    # 60 x 900 KB = 54 MB claimed
        s = Session(srv.port, timeout=10)
        s.send(b"set big%d 0 0 %d\r\n" % (i, 1000 << 10) + chunk)
        socks.append(s)
    for s in socks:
        s.send(b"x" * (100 << 10) + b"\r\nget big0\r\n")
    refused = 0
    for i, s in enumerate(socks):
        line = s.read_line()
        if line == b"SERVER_ERROR out of memory storing object\r\n":
            refused += 1
        else:
            assert line == b"STORED\r\n", line
        replies.append(s.read_until(b"END\r\n"))
    peak = rss_kib(srv.proc.pid)
    for s in socks:
        s.close()
    assert 30 < refused < 60, refused      # -m 16: about 16 of 60 fit at a time
    assert peak - base < 48 * 1024, (base, peak)
    with srv.session() as s:               # the server is fine, and stores big values
        s.set(b"after", b"y" * (1000 << 10))


def test_replay_memory_is_bounded_by_the_read_cache(fresh, tmp_path):
    srv = fresh("-m", "8", engine="sqlite")
    value = b"r" * 1024
    with srv.session(timeout=30) as s:
        for i in range(0, 60000, 500):
            s.call(b"".join(b"set r%d 0 0 1024 noreply\r\n%s\r\n" % (j, value)
                            for j in range(i, i + 500)) + b"mn\r\n", b"MN\r\n")
    srv.kill9()
    for path in srv.data.glob("store.*"):  # rebuild: every record replayed
        path.unlink()
    srv.start()
    with srv.session() as s:
        assert s.get(b"r59999") == value
        assert s.stats()["curr_items"] == "60000"
    with open("/proc/%d/status" % srv.proc.pid) as f:
        peak = int(next(line for line in f if line.startswith("VmHWM:")).split()[1])
    assert peak < 90 * 1024, peak          # 60 MB of items would not fit


def test_fd_limit_too_low_is_refused_at_start(tmp_path):
    srv = MemtoolServer(tmp_path / "w", engine="memory", extra=["-c", "500"])
    import subprocess
    proc = subprocess.run(srv.argv(), capture_output=True, text=True, timeout=30,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE,
                                                                (100, 100)))
    assert proc.returncode == 1
    assert "failed to set rlimit for open files. Try starting as root or requesting " \
           "smaller maxconns value." in proc.stderr


def test_out_of_descriptors_pauses_accepting_without_spinning(fresh):
    """EMFILE on accept: the listener rests, counts it, logs once, and comes back."""
    srv = fresh("-c", "100")
    hard = resource.prlimit(srv.proc.pid, resource.RLIMIT_NOFILE)[1]
    resource.prlimit(srv.proc.pid, resource.RLIMIT_NOFILE, (40, hard))
    held = []
    try:
        for _ in range(60):                # the kernel queues them; accept() fails
            held.append(socket.create_connection(("127.0.0.1", srv.port), timeout=5))
        time.sleep(0.3)
        cpu = cpu_seconds(srv.proc.pid)
        time.sleep(1.0)
        assert cpu_seconds(srv.proc.pid) - cpu < 0.3      # paused, not spinning
        for s in held[:30]:
            s.close()
        del held[:30]
        resource.prlimit(srv.proc.pid, resource.RLIMIT_NOFILE, (4096, hard))
        with Session(srv.port, timeout=10) as s:
            st = s.stats()
            assert int(st["listen_disabled_num"]) > 0 and st["accepting_conns"] == "1"
    finally:
        for s in held:
            s.close()
    assert srv.log_text().count("not accepting") == 1


def test_a_huge_multiget_does_not_stall_other_clients(fresh):
    """One get of 115,000 keys runs in shares: a canary's gets are answered meanwhile."""
    srv = fresh()
    keys = b" ".join(b"m%06d" % i for i in range(115000))       # 920 KB: one line
    with srv.session(timeout=30) as big, srv.session() as canary:
        canary.set(b"c", b"1")
        big.send(b"get " + keys + b"\r\n")
        answered = 0
        done = threading.Event()

        def finish():
            big.read_until(b"END\r\n", timeout=30)
            done.set()
        t = threading.Thread(target=finish)
        t.start()
        deadline = time.monotonic() + 30
        while not done.is_set() and time.monotonic() < deadline:
            canary.call(b"get c\r\n", b"VALUE c 0 1\r\n1\r\nEND\r\n")
            answered += 1
        t.join(30)
        assert done.is_set()
        assert answered >= 5, answered
        assert int(canary.stats()["conn_yields"]) > 0


def test_deep_pipeline_shares_the_loop(fresh):
    """Thousands of pipelined gets from one client come back whole and in order,
    -R requests at a time (conn_yields counts the turns given up)."""
    srv = fresh("-R", "5")
    with srv.session(timeout=30) as s:
        s.call(b"set p 0 0 1\r\nx\r\n", b"STORED\r\n")
        before = int(s.stats()["conn_yields"])
        s.send(b"".join(b"get p\r\nget q%d\r\n" % i for i in range(3000)))
        s.expect(b"VALUE p 0 1\r\nx\r\nEND\r\nEND\r\n" * 3000)
        assert int(s.stats()["conn_yields"]) - before >= 6000 // 5 - 1


def test_binary_protocol_request_is_closed_at_once(fresh):
    srv = fresh()
    with srv.session() as s:
        s.send(b"\x80\x00\x00\x03" + bytes(20) + b"foo")     # a binary get, no newline
        s.expect_closed(timeout=2)
    wait_for(lambda: "binary-protocol" in srv.log_text(), 5, what="the reason logged")


def test_stats_names_and_order_match_memcached(memcached, fresh):
    with memcached.session() as s:
        want = list(s.stats())
    srv = fresh()
    with srv.session() as s:
        got = list(s.stats())
    assert [name for name in got if name in want] == want   # memcached's order
    # what memcached prints by default but not with the test's LRU options
    default = ["lru_crawler_running", "lru_crawler_starts", "lru_maintainer_juggles"]
    assert got.index("slabs_moved") + 1 == got.index(default[0])
    assert got.index(default[-1]) + 1 == got.index("malloc_fails")


def test_replies_before_quit_arrive_whatever_the_pipeline_depth(fresh):
    """Past -R requests the rest runs in later passes; quit still comes after them."""
    srv = fresh()
    with srv.session() as s:
        s.send(b"set k 0 0 1\r\nx\r\n" + b"get k\r\n" * 45 + b"quit\r\n")
        s.expect(b"STORED\r\n" + b"VALUE k 0 1\r\nx\r\nEND\r\n" * 45)
        s.expect_closed()


def test_parked_chunked_uploads_are_bounded_by_m(fresh):
    srv = fresh("-m", "8")
    base = rss_kib(srv.proc.pid)
    socks, refused = [], 0
    for i in range(40):                     # 40 x 900 KB chunked, never finished
        s = Session(srv.port, timeout=10)
        s.send(b"PUT /c%d HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
               % i + (b"%x\r\n" % (900 << 10)) + b"c" * (900 << 10))
        socks.append(s)
    for s in socks:
        s.send(b"\r\n0\r\n\r\n")
        head = s.read_line()
        refused += head == b"HTTP/1.1 507 Insufficient Storage\r\n"
    peak = rss_kib(srv.proc.pid)
    for s in socks:
        s.close()
    assert 20 < refused < 40, refused
    assert peak - base < 40 * 1024, (base, peak)
