"""Key placement agrees with twemproxy 0.5.0 (vectors observed from nutcracker, PLACEMENT.md §2.8)."""
import sys

import pytest

from support import REPO

sys.path.insert(0, str(REPO))
import memtool  # noqa: E402

HASH_VECTORS = {
    b"foo": dict(one_at_a_time=596015325, md5=3675831724, crc32=3187, crc32a=2356372769,
                 fnv1_64=1805727027, fnv1a_64=4275688823, fnv1_32=1083137555,
                 fnv1a_32=2851307223),
    b"hello world": dict(one_at_a_time=1045060183, md5=3141252702, crc32=3402,
                         crc32a=222957957, fnv1_64=2979073647, fnv1a_64=37540583,
                         fnv1_32=1418570095, fnv1a_32=3582672807),
    b"user:1001": dict(one_at_a_time=2745963488, md5=3839126290, crc32=26739,
                       crc32a=3899860853, fnv1_64=3550362912, fnv1a_64=2927313110,
                       fnv1_32=2796551328, fnv1a_32=1333533686),
    "中文".encode(): dict(one_at_a_time=1818558024, md5=599964327, crc32=23049,
                        crc32a=1510599991, fnv1_64=3724949257, fnv1a_64=3686065861,
                        fnv1_32=3173121737, fnv1a_32=1907909189),
    b"a": dict(one_at_a_time=3392050242, md5=3111502092, crc32=26807, crc32a=3904355907,
               fnv1_64=2248259518, fnv1a_64=2248273036, fnv1_32=84696446, fnv1a_32=3826002220),
}

# key -> (pool A server, pool B server)
PLACEMENT = {
    "foo": ("127.0.0.2:11211", "gamma"), "bar": ("127.0.0.4:11212", "gamma"),
    "baz": ("127.0.0.4:11212", "alpha"), "hello": ("127.0.0.3:11211", "alpha"),
    "user:1001": ("127.0.0.2:11211", "alpha"), "user:1002": ("127.0.0.2:11211", "gamma"),
    "session:abc": ("127.0.0.2:11211", "alpha"), "a": ("127.0.0.3:11211", "alpha"),
    "中文": ("127.0.0.3:11211", "alpha"), "key-42": ("127.0.0.3:11211", "gamma"),
}


@pytest.mark.parametrize("key", list(HASH_VECTORS), ids=lambda k: k.decode())
def test_hash_values_match_twemproxy(key):
    got = {name: memtool.HASHES[name](key) for name in HASH_VECTORS[key]}
    assert got == HASH_VECTORS[key]


def test_pool_a_fnv1a_64_ketama_with_the_11211_name_rule():
    servers = [("127.0.0.2", 11211), ("127.0.0.3", 11211), ("127.0.0.4", 11212)]
    ring = memtool.Continuum([(memtool.server_name(h, p), 1) for h, p in servers], "fnv1a_64")
    assert len(ring.points) == 480
    got = {k: "%s:%d" % servers[ring.index(k.encode())] for k in PLACEMENT}
    assert got == {k: a for k, (a, b) in PLACEMENT.items()}


def test_pool_b_md5_ketama_with_names_and_weights():
    names = ["gamma", "alpha", "beta"]      # any order: twemproxy sorts by name
    ring = memtool.Continuum([("gamma", 2), ("alpha", 1), ("beta", 1)], "md5")
    assert len(ring.points) == 480          # 240 + 120 + 120
    got = {k: names[ring.index(k.encode())] for k in PLACEMENT}
    assert got == {k: b for k, (a, b) in PLACEMENT.items()}


def test_ring_point_values_come_from_md5_of_name_dash_index():
    ring = memtool.Continuum([("127.0.0.2", 1), ("127.0.0.3", 1)], "md5")
    for point in (3935527704, 3483846859, 4288166037, 362506072):   # MD5("127.0.0.2-0")
        assert ring.owners[ring.points.index(point)] == 0


def test_modula_uses_weighted_slots_in_name_order():
    ring = memtool.Continuum([("bb", 1), ("a", 2)], "crc32a", "modula")
    assert ring.slots == [1, 1, 0]
    for key in (b"foo", b"bar", b"user:1001"):
        assert ring.index(key) == ring.slots[memtool.hash_crc32a(key) % 3]


def test_single_server_and_unknown_hash():
    assert memtool.Continuum([("only", 1)]).index(b"anything") == 0
    with pytest.raises(memtool.ConfigError):
        memtool.Continuum([("a", 1)], "nope")
