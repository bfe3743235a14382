"""Faults are states to serve through: a full disk, damaged files, another engine.

Disk-full tests mount a small tmpfs (CI runs as root; elsewhere they skip
with the reason). Every test checks, after a restart, that each write the
server acknowledged is still there.
"""
import os
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from support import MEMTOOL, MemtoolServer, Session, wait_for

pytestmark = pytest.mark.memtool_only

VALUE = b"v" * 20000


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a directory on a fresh tmpfs of that size; grow(size) resizes it."""
    mounts = []

    def mount(size):
        path = tmp_path / ("disk%d" % len(mounts))
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s" % size, "tmpfs",
                               str(path)], capture_output=True, text=True)
        if done.returncode:
            pytest.skip("cannot mount a tmpfs (needs root): %s" % done.stderr.strip())
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def grow(path, size):
    subprocess.run(["mount", "-o", "remount,size=%s" % size, str(path)], check=True)


def run_memtool(*args, timeout=30):
    return subprocess.run([sys.executable, str(MEMTOOL), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def start_fails(srv):
    """Start srv expecting it to exit 1 before it serves; its output."""
    proc = subprocess.run(srv.argv(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    return proc.stderr


def set_until_refused(port, prefix, acked, stop):
    """Set keys one at a time, recording the acknowledged ones, until stop is set."""
    i = 0
    while not stop.is_set():
        try:
            with Session(port, timeout=10) as s:
                while not stop.is_set():
                    key = b"%s.%d" % (prefix, i)
                    i += 1
                    s.send(b"set %s 0 0 %d\r\n%s\r\n" % (key, len(VALUE), VALUE))
                    line = s.read_line()
                    if line == b"STORED\r\n":
                        acked.append(key)
                    else:
                        assert line == b"SERVER_ERROR out of space\r\n", line
                        time.sleep(0.01)
        except AssertionError as err:
            if "closed" not in str(err):      # a refused batch closes the connection
                raise


def missing(port, keys):
    """The keys of `keys` that a get does not return."""
    with Session(port, timeout=10) as s:
        found = set()
        for i in range(0, len(keys), 50):
            found |= set(s.get_items(keys[i:i + 50]))
    return [k for k in keys if k not in found]


def test_full_disk_refuses_writes_serves_reads_and_loses_nothing_acknowledged(
        tmp_path, small_disk):
    srv = MemtoolServer(tmp_path / "w", extra=["--sync", "always"])
    disk = small_disk("8m")
    srv.data = disk / "data"
    srv.start()
    acked = [[] for _ in range(4)]
    stop = threading.Event()
    writers = [threading.Thread(target=set_until_refused, args=(srv.port, b"w%d" % n,
                                                                acked[n], stop), daemon=True)
               for n in range(4)]
    for t in writers:
        t.start()
    wait_for(lambda: "No space left" in srv.log_text(), 60, what="the disk to fill")
    time.sleep(1.5)                      # writers keep hitting the full disk, retries fail
    assert srv.running
    with srv.session() as s:             # reads go on while writes are refused
        first = acked[0][0]
        assert s.get(first) == VALUE
        s.call(b"set more 0 0 2\r\nno\r\n", b"SERVER_ERROR out of space\r\n")
        s.call(b"ms more 2\r\nno\r\n", b"SERVER_ERROR out of space\r\n")
        s.call(b"delete %s\r\n" % first, b"SERVER_ERROR out of space\r\n")
        assert s.get(first) == VALUE
    grow(disk, "512m")
    with srv.session() as s:             # space is back: writes are taken again

        def stored():
            s.send(b"set again 0 0 2\r\nok\r\n")
            return s.read_line() == b"STORED\r\n" or time.sleep(0.1)
        wait_for(stored, 10, what="writes to be accepted again")
    stop.set()
    for t in writers:
        t.join(20)
    assert srv.stop() == 0
    text = srv.log_text()
    assert text.count("refusing writes") == 1, text[-3000:]
    assert text.count("writable again") == 1, text[-3000:]
    keys = [k for a in acked for k in a] + [b"again"]
    assert len(keys) > 50
    srv.start()
    assert missing(srv.port, keys) == []
    srv.stop()


def test_checkpoint_on_a_full_disk_keeps_the_log_position(tmp_path, small_disk):
    """The store fills its disk while the log has room: writes stay acknowledged
    and nothing is lost across restarts while the checkpoint keeps failing."""
    disk = small_disk("2m")
    srv = MemtoolServer(tmp_path / "w", extra=["--sync", "always"])
    srv.data = disk / "data"
    srv.data.mkdir()
    (tmp_path / "ulog").mkdir()
    os.symlink(tmp_path / "ulog", srv.data / "ulog")   # the log lives on the big disk
    srv.start()
    keys = []
    with srv.session() as s:
        s.set(b"before", b"1")
        for i in range(400):                          # 8 MB: far more than the store's disk
            keys.append(b"key%d" % i)
            s.set(keys[-1], VALUE)
        wait_for(lambda: "checkpoint failed" in srv.log_text(), 10, what="a failed checkpoint")
        s.set(b"after", b"2")
    assert srv.stop() == 0
    assert srv.log_text().count("checkpoint failed") == 1
    srv.start()                                       # the store still cannot take it all
    assert missing(srv.port, [b"before", b"after"] + keys) == []
    srv.kill9()
    grow(disk, "64m")
    srv.start()
    assert missing(srv.port, [b"before", b"after"] + keys) == []
    assert srv.stop() == 0


def write_keys(srv, n, size=200):
    keys = [b"k%05d" % i for i in range(n)]
    with srv.session() as s:
        for i in range(0, n, 100):
            s.call(b"".join(b"set %s 0 0 %d\r\n%s\r\n" % (k, size, k * (size // len(k)) +
                                                             k[:size % len(k)])
                            for k in keys[i:i + 100]), b"STORED\r\n" * len(keys[i:i + 100]))
    return keys


def flip(path, offset, length=16):
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(length)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def test_damage_inside_a_log_file_stops_the_start_until_check_fix(tmp_path, persistent_engine):
    srv = MemtoolServer(tmp_path / "w", engine=persistent_engine,
                        extra=["--sync", "always", "--ulog-limit", "64k"])
    srv.start()
    keys = write_keys(srv, 1500)
    assert srv.stop() == 0
    logs = sorted((srv.data / "ulog").glob("*.ulog"))
    assert len(logs) >= 3
    for path in srv.data.glob("store.*"):             # the store is rebuilt from every file
        path.unlink()
    flip(logs[1], logs[1].stat().st_size // 2)         # an older file
    flip(logs[-1], logs[-1].stat().st_size // 2)       # the newest
    sizes = [p.stat().st_size for p in logs]
    err = start_fails(srv)
    assert "damaged at offset" in err and logs[1].name in err
    assert "memtool.py check --data %s --fix" % srv.data in err
    assert [p.stat().st_size for p in logs] == sizes   # nothing was cut

    check = run_memtool("check", "--data", srv.data)
    assert check.returncode == 1
    assert "ulog/%s: damaged bytes" % logs[1].name in check.stdout
    assert "ulog/%s: damaged bytes" % logs[-1].name in check.stdout
    fixed = run_memtool("check", "--data", srv.data, "--fix")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert len(list((srv.data / "aside").iterdir())) == 2      # moved aside, not deleted
    again = run_memtool("check", "--data", srv.data)
    assert again.returncode == 0 and "all is well" in again.stdout, again.stdout

    srv.start()
    lost = missing(srv.port, keys)
    assert 0 < len(lost) <= 4, lost                   # only the records the flips hit
    srv.stop()


def test_flipped_last_record_is_damage_not_a_torn_tail(tmp_path):
    srv = MemtoolServer(tmp_path / "w", extra=["--sync", "always"])
    srv.start()
    keys = write_keys(srv, 50)
    srv.kill9()
    log = sorted((srv.data / "ulog").glob("*.ulog"))[-1]
    size = log.stat().st_size
    flip(log, size - 1, 1)
    assert "damaged at offset" in start_fails(srv)
    assert log.stat().st_size == size
    assert run_memtool("check", "--data", srv.data, "--fix").returncode == 0
    srv.start()
    assert missing(srv.port, keys) == [keys[-1]]
    srv.stop()


def test_damaged_store_row_is_a_miss_not_a_crash(tmp_path):
    srv = MemtoolServer(tmp_path / "w")
    srv.start()
    keys = write_keys(srv, 20)
    assert srv.stop() == 0
    db = sqlite3.connect(str(srv.data / "store.sqlite3"))
    db.execute("UPDATE Dict SET value = x'0102' WHERE key = CAST(? AS BLOB)", (keys[3],))
    db.commit()
    db.close()
    srv.start()
    with srv.session() as s:
        assert s.get(keys[3]) is None               # a miss, and the connection stays
        assert s.get(keys[4]) is not None
    wait_for(lambda: srv.log_text().count("does not decode") >= 1, 5, what="the damage logged")
    time.sleep(2.5)                                 # the expiry sweep passes the row twice
    assert srv.running
    with srv.session() as s:
        assert s.get(keys[3]) is None
    assert srv.log_text().count("does not decode") == 1
    assert srv.stop() == 0
    check = run_memtool("check", "--data", srv.data)
    assert check.returncode == 1 and repr(keys[3]) in check.stdout, check.stdout
    assert run_memtool("check", "--data", srv.data, "--fix").returncode == 0
    srv.start()
    assert missing(srv.port, keys) == []            # the log still had the key's record
    srv.stop()


def test_unreadable_store_says_what_to_run(tmp_path):
    srv = MemtoolServer(tmp_path / "w", extra=["--sync", "always"])
    srv.start()
    keys = write_keys(srv, 30)
    assert srv.stop() == 0
    store = srv.data / "store.sqlite3"
    with open(store, "r+b") as f:
        f.truncate(100)
    err = start_fails(srv)
    assert err.count("\n") == 1, err                 # one line, no traceback
    assert str(store.name) in err or "sqlite store" in err
    assert "memtool.py check --data %s --fix" % srv.data in err
    fixed = run_memtool("check", "--data", srv.data, "--fix")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "rebuilt from" in fixed.stdout
    srv.start()
    assert missing(srv.port, keys) == []
    srv.stop()


def test_read_only_store_and_a_file_as_data_dir(tmp_path):
    srv = MemtoolServer(tmp_path / "w")
    srv.start()
    write_keys(srv, 5)
    assert srv.stop() == 0
    store = srv.data / "store.sqlite3"
    if subprocess.run(["chattr", "+i", str(store)], capture_output=True).returncode:
        pytest.skip("chattr +i is not supported here")
    try:
        err = start_fails(srv)
        assert err.count("\n") == 1 and "read-only" in err, err
    finally:
        subprocess.run(["chattr", "-i", str(store)])
    afile = tmp_path / "afile"
    afile.write_text("x")
    srv.data = afile
    assert "not a directory" in start_fails(srv)


def test_another_engine_is_refused_until_converted(tmp_path):
    srv = MemtoolServer(tmp_path / "w")
    srv.start()
    keys = write_keys(srv, 40)
    with srv.session() as s:
        s.call(b"delete %s\r\n" % keys[0], b"DELETED\r\n")
    assert srv.stop() == 0
    dumb = MemtoolServer(tmp_path / "w", engine="dumb", port=srv.port)
    err = start_fails(dumb)
    assert "holds a sqlite store, not dumb" in err and "--convert dumb" in err
    conv = run_memtool("check", "--data", srv.data, "--convert", "dumb")
    assert conv.returncode == 0, conv.stdout + conv.stderr
    assert "sqlite" in start_fails(srv)              # and now sqlite is the stranger
    dumb.start()
    assert missing(dumb.port, keys) == [keys[0]]
    dumb.stop()
    mem = MemtoolServer(tmp_path / "w", engine="memory", port=srv.port)
    mem.start()
    wait_for(lambda: "nothing in" in mem.log_text(), 5, what="the memory-engine warning")
    mem.stop()


def test_a_text_row_is_damage_too(tmp_path):
    srv = MemtoolServer(tmp_path / "w")
    srv.start()
    keys = write_keys(srv, 5)
    assert srv.stop() == 0
    db = sqlite3.connect(str(srv.data / "store.sqlite3"))
    db.execute("UPDATE Dict SET value = CAST(value AS TEXT) WHERE key = CAST(? AS BLOB)",
               (keys[1],))
    db.commit()
    db.close()
    srv.start()
    with srv.session() as s:
        assert s.get(keys[1]) is None
        assert s.get(keys[2]) is not None
    srv.stop()
    check = run_memtool("check", "--data", srv.data)
    assert check.returncode == 1 and repr(keys[1]) in check.stdout, check.stdout


def test_a_delayed_flush_replays_as_it_happened(tmp_path):
    """Replaying the whole log over a newer store (check --fix) repeats a delayed
    flush_all with the threshold it took, not with the newest cas unique."""
    srv = MemtoolServer(tmp_path / "w", extra=["--sync", "always"])
    srv.start()
    with srv.session() as s:
        s.set(b"a", b"1")
        s.call(b"flush_all 2\r\n", b"OK\r\n")
        wait_for(lambda: s.get(b"a") is None, 5, what="the delayed flush")
        s.set(b"b", b"2")
        s.set(b"c", b"3")
        s.set(b"z", b"4")
    assert srv.stop() == 0
    db = sqlite3.connect(str(srv.data / "store.sqlite3"))
    db.execute("UPDATE Dict SET value = x'01' WHERE key = CAST('z' AS BLOB)")
    db.commit()
    db.close()
    assert run_memtool("check", "--data", srv.data, "--fix").returncode == 0
    srv.start()
    assert missing(srv.port, [b"b", b"c", b"z"]) == []
    with srv.session() as s:
        assert s.get(b"a") is None
    srv.stop()
