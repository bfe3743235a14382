"""Real clients against the server: pymemcache and libmemcached's memccp/memccat."""
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.proxied

pymemcache = pytest.importorskip("pymemcache.client.base",
                                 reason="pymemcache not installed (pip install pymemcache)")


@pytest.fixture
def client(server):
    c = pymemcache.Client(("127.0.0.1", server.port), connect_timeout=5, timeout=10,
                          default_noreply=False)
    yield c
    c.close()


def test_pymemcache_set_get_many(client, kp):
    p = kp.decode()
    data = {p + "a": b"1", p + "b": b"two", p + "c": b"\r\nbinary\x00\xff"}
    assert client.set_many(data) == []
    assert client.get_many(list(data) + [p + "missing"]) == data
    assert client.get(p + "missing") is None
    assert client.set(p + "big", b"x" * 500000)
    assert client.get(p + "big") == b"x" * 500000


def test_pymemcache_add_replace_append_prepend(client, kp):
    k = kp.decode() + "k"
    assert client.replace(k, b"no") is False
    assert client.add(k, b"mid") is True
    assert client.add(k, b"again") is False
    assert client.append(k, b">") is True
    assert client.prepend(k, b"<") is True
    assert client.get(k) == b"<mid>"
    assert client.replace(k, b"new") is True
    assert client.get(k) == b"new"


def test_pymemcache_gets_cas(client, kp):
    k = kp.decode() + "k"
    assert client.cas(k, b"v", 1) is None               # NOT_FOUND
    client.set(k, b"v1")
    value, cas = client.gets(k)
    assert value == b"v1"
    assert client.cas(k, b"v2", cas) is True
    assert client.cas(k, b"v3", cas) is False           # EXISTS
    value2, cas2 = client.gets(k)
    assert (value2, int(cas2) > int(cas)) == (b"v2", True)
    assert client.gets_many([k]) == {k: (b"v2", cas2)}


def test_pymemcache_incr_decr(client, kp):
    k = kp.decode() + "n"
    assert client.incr(k, 1) is None
    client.set(k, b"10")
    assert client.incr(k, 5) == 15
    assert client.decr(k, 6) == 9
    assert client.get(k) == b"9 "                       # memcached pads in place
    assert client.decr(k, 100) == 0
    client.set(k, b"18446744073709551615")
    assert client.incr(k, 1) == 0


def test_pymemcache_touch_delete_flags_expire(client, kp):
    k = kp.decode() + "k"
    assert client.touch(k, 100) is False
    client.set(k, b"v", expire=100, flags=12)
    assert client.touch(k, 200) is True
    assert client.get(k) == b"v"
    assert client.delete(k) is True
    assert client.delete(k) is False
    client.set(k, b"v", expire=-1)
    assert client.get(k) is None


@pytest.mark.server_only
def test_pymemcache_flush_stats_version(server, client, kp):
    k = kp.decode() + "k"
    client.set(k, b"v")
    assert client.flush_all() is True
    assert client.get(k) is None
    stats = client.stats()
    assert stats[b"pid"] == server.proc.pid
    assert stats[b"version"].startswith(b"1.6.18")
    for name in (b"curr_items", b"total_items", b"cmd_get", b"cmd_set", b"get_hits",
                 b"get_misses", b"curr_connections", b"limit_maxbytes", b"uptime"):
        assert isinstance(stats[name], int), name
    assert client.version().startswith(b"1.6.18")


# --------------------------------------------------------------------------- libmemcached

MEMCCP, MEMCCAT = shutil.which("memccp"), shutil.which("memccat")
needs_libmemcached = pytest.mark.skipif(not (MEMCCP and MEMCCAT),
                                        reason="memccp/memccat not installed "
                                               "(apt-get install libmemcached-tools)")


def run_tool(*argv):
    return subprocess.run(argv, capture_output=True, timeout=30)


@needs_libmemcached
def test_memccp_memccat_round_trip(server, tmp_path, kp):
    path = tmp_path / (kp.decode() + "blob.bin")
    content = bytes(range(256)) * 200 + b"\r\nEND\r\n"
    path.write_bytes(content)
    servers = "--servers=127.0.0.1:%d" % server.port
    r = run_tool(MEMCCP, servers, "--flags=77", str(path))
    assert r.returncode == 0, r.stderr
    with server.session() as s:                          # stored under the basename
        assert s.get_items([path.name.encode()]) == {path.name.encode(): (77, content, None)}
    r = run_tool(MEMCCAT, servers, path.name)
    assert (r.returncode, r.stdout) == (0, content + b"\n")
    out = tmp_path / "out.bin"
    r = run_tool(MEMCCAT, servers, "--file=%s" % out, path.name)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == content
    r = run_tool(MEMCCAT, servers, "--flags", path.name)
    assert r.stdout == b"77\n" + content + b"\n"


@needs_libmemcached
def test_memccat_missing_key_fails(server, kp):
    r = run_tool(MEMCCAT, "--servers=127.0.0.1:%d" % server.port, kp.decode() + "nope")
    assert (r.returncode, r.stdout) == (1, b"")
