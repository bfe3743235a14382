"""The memcached 1.6.18 text protocol, exact bytes (PROTOCOL-NOTES.md §1-§5, §8).

Expected replies were confirmed against memcached 1.6.18 by running this module
with MEMTOOL_TEST_TARGET=memcached.
"""
import re
import time

import pytest

from support import (DEFAULT_ITEM_MAX, STOP_TIMEOUT, MemtoolServer, max_value_len,
                     rss_peak_kib, wait_for)

pytestmark = pytest.mark.proxied

BAD_FORMAT = b"CLIENT_ERROR bad command line format\r\n"
BAD_CHUNK = b"CLIENT_ERROR bad data chunk\r\n"
TOO_LARGE = b"SERVER_ERROR object too large for cache\r\n"
BAD_EXPTIME = b"CLIENT_ERROR invalid exptime argument\r\n"
BAD_DELTA = b"CLIENT_ERROR invalid numeric delta argument\r\n"
NON_NUMERIC = b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
DELETE_USAGE = b"CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]\r\n"


def value_reply(key, flags, data):
    return b"VALUE %s %d %d\r\n%s\r\nEND\r\n" % (key, flags, len(data), data)


# --------------------------------------------------------------------------- storage

def test_set_and_get(session, kp):
    k = kp + b"k"
    session.call(b"set %s 5 0 5\r\nhello\r\n" % k, b"STORED\r\n")
    session.call(b"get %s\r\n" % k, value_reply(k, 5, b"hello"))
    session.call(b"set %s 0 0 0\r\n\r\n" % k, b"STORED\r\n")
    session.call(b"get %s\r\n" % k, value_reply(k, 0, b""))
    session.call(b"get %smissing\r\n" % kp, b"END\r\n")


def test_add(session, kp):
    k = kp + b"k"
    session.call(b"add %s 1 0 1\r\na\r\n" % k, b"STORED\r\n")
    session.call(b"add %s 2 0 1\r\nb\r\n" % k, b"NOT_STORED\r\n")
    session.call(b"get %s\r\n" % k, value_reply(k, 1, b"a"))


def test_replace(session, kp):
    k = kp + b"k"
    session.call(b"replace %s 1 0 1\r\na\r\n" % k, b"NOT_STORED\r\n")
    session.call(b"get %s\r\n" % k, b"END\r\n")
    session.set(k, b"a")
    session.call(b"replace %s 7 0 2\r\nbb\r\n" % k, b"STORED\r\n")
    session.call(b"get %s\r\n" % k, value_reply(k, 7, b"bb"))


def test_append_prepend_ignore_flags_and_exptime(session, kp):
    k = kp + b"k"
    session.call(b"append %s 0 0 1\r\nx\r\n" % k, b"NOT_STORED\r\n")
    session.call(b"prepend %s 0 0 1\r\nx\r\n" % k, b"NOT_STORED\r\n")
    session.set(k, b"mid", flags=3)
    session.call(b"append %s 99 -1 4\r\n_end\r\n" % k, b"STORED\r\n")
    session.call(b"prepend %s 98 -1 6\r\nstart_\r\n" % k, b"STORED\r\n")
    session.call(b"get %s\r\n" % k, value_reply(k, 3, b"start_mid_end"))


def test_cas(session, kp):
    k = kp + b"k"
    session.call(b"cas %s 0 0 1 1\r\nx\r\n" % k, b"NOT_FOUND\r\n")
    session.set(k, b"v1")
    cas = session.gets_cas(k)
    session.call(b"cas %s 4 0 2 %d\r\nv2\r\n" % (k, cas), b"STORED\r\n")
    session.call(b"cas %s 0 0 2 %d\r\nv3\r\n" % (k, cas), b"EXISTS\r\n")
    session.call(b"cas %s 0 0 2 0\r\nv3\r\n" % k, b"EXISTS\r\n")
    session.call(b"get %s\r\n" % k, value_reply(k, 4, b"v2"))
    cas2 = session.gets_cas(k)
    session.send(b"cas %s 0 0 2 %d noreply\r\nv4\r\n" % (k, cas2))
    session.call(b"get %s\r\n" % k, value_reply(k, 0, b"v4"))


def test_gets_reply_format_and_stable_cas(session, kp):
    k = kp + b"k"
    session.set(k, b"abc", flags=9)
    session.send(b"gets %s\r\n" % k)
    line = session.read_line()
    m = re.fullmatch(rb"VALUE %s 9 3 (\d+)\r\n" % re.escape(k), line)
    assert m, line
    session.expect(b"abc\r\nEND\r\n")
    cas = int(m.group(1))
    assert 0 < cas < 2 ** 64
    session.call(b"gets %s\r\n" % k, b"VALUE %s 9 3 %d\r\nabc\r\nEND\r\n" % (k, cas))


def test_cas_unique_changes_on_every_write_and_not_on_touch(session, kp):
    k = kp + b"n"
    session.set(k, b"10")
    seen = [session.gets_cas(k)]
    writes = [
        (b"append %s 0 0 1\r\n1\r\n" % k, b"STORED\r\n"),       # 101
        (b"prepend %s 0 0 1\r\n2\r\n" % k, b"STORED\r\n"),      # 2101
        (b"replace %s 0 0 2\r\n20\r\n" % k, b"STORED\r\n"),
        (b"incr %s 5\r\n" % k, b"25\r\n"),
        (b"decr %s 3\r\n" % k, b"22\r\n"),
        (b"set %s 0 0 2\r\n30\r\n" % k, b"STORED\r\n"),
    ]
    for request, reply in writes:
        session.call(request, reply)
        seen.append(session.gets_cas(k))
    cas = seen[-1]
    session.call(b"cas %s 0 0 2 %d\r\n40\r\n" % (k, cas), b"STORED\r\n")
    seen.append(session.gets_cas(k))
    assert seen == sorted(set(seen)), "cas must strictly increase: %r" % seen
    # touch and gat change the TTL, not the cas unique
    session.call(b"touch %s 1000\r\n" % k, b"TOUCHED\r\n")
    session.call(b"gat 1000 %s\r\n" % k, value_reply(k, 0, b"40"))
    session.call(b"gats 0 %s\r\n" % k, b"VALUE %s 0 2 %d\r\n40\r\nEND\r\n" % (k, seen[-1]))
    # a new key continues the same global sequence
    session.set(kp + b"other", b"x")
    assert session.gets_cas(kp + b"other") > seen[-1]


# --------------------------------------------------------------------------- retrieval

def test_multiget_order_repeats_and_misses(session, kp):
    a, b = kp + b"a", kp + b"b"
    session.set(a, b"1", flags=1)
    session.set(b, b"22", flags=2)
    session.call(b"get %s %smiss %s %s\r\n" % (b, kp, a, b),
                 b"VALUE %s 2 2\r\n22\r\nVALUE %s 1 1\r\n1\r\nVALUE %s 2 2\r\n22\r\nEND\r\n"
                 % (b, a, b))
    session.call(b"bget %s\r\n" % a, value_reply(a, 1, b"1"))
    session.call(b"get\r\n", b"ERROR\r\n")
    session.call(b"gets\r\n", b"ERROR\r\n")


def test_get_with_many_keys(session, kp):
    keys = [kp + b"%d" % i for i in range(40)]
    for i, k in enumerate(keys[::2]):
        session.send(b"set %s %d 0 %d noreply\r\n%s\r\n" % (k, i, len(k), k))
    expected = b"".join(b"VALUE %s %d %d\r\n%s\r\n" % (k, i, len(k), k)
                        for i, k in enumerate(keys[::2]))
    session.call(b"get " + b" ".join(keys) + b"\r\n", expected + b"END\r\n")


def test_gat_and_gats(session, kp):
    k = kp + b"k"
    session.set(k, b"val", flags=6)
    session.call(b"gat 100 %s %smiss\r\n" % (k, kp), value_reply(k, 6, b"val"))
    cas = session.gets_cas(k)
    session.call(b"gats 100 %s\r\n" % k, b"VALUE %s 6 3 %d\r\nval\r\nEND\r\n" % (k, cas))
    session.call(b"gat x %s\r\n" % k, BAD_EXPTIME)
    session.call(b"gats 1.5 %s\r\n" % k, BAD_EXPTIME)
    session.call(b"gat 0\r\n", b"END\r\n")
    session.call(b"gat\r\n", b"ERROR\r\n")
    session.call(b"gats\r\n", b"ERROR\r\n")


def test_gat_negative_returns_value_once(session, kp):
    k = kp + b"k"
    session.set(k, b"once")
    session.call(b"gat -1 %s\r\n" % k, value_reply(k, 0, b"once"))
    session.call(b"get %s\r\n" % k, b"END\r\n")


# --------------------------------------------------------------------------- delete / touch

def test_delete(session, kp):
    k = kp + b"k"
    session.call(b"delete %s\r\n" % k, b"NOT_FOUND\r\n")
    session.set(k, b"x")
    session.call(b"delete %s\r\n" % k, b"DELETED\r\n")
    session.call(b"get %s\r\n" % k, b"END\r\n")
    session.set(k, b"x")
    session.call(b"delete %s 0\r\n" % k, b"DELETED\r\n")
    session.set(k, b"x")
    session.call(b"delete %s 5\r\n" % k, DELETE_USAGE)
    session.call(b"delete %s 0 0\r\n" % k, DELETE_USAGE)
    session.call(b"get %s\r\n" % k, value_reply(k, 0, b"x"))
    session.send(b"delete %s 0 noreply\r\n" % k)
    session.call(b"get %s\r\n" % k, b"END\r\n")
    session.call(b"delete\r\n", b"ERROR\r\n")


def test_touch(session, kp):
    k = kp + b"k"
    session.call(b"touch %s 10\r\n" % k, b"NOT_FOUND\r\n")
    session.set(k, b"x")
    session.call(b"touch %s 10\r\n" % k, b"TOUCHED\r\n")
    session.call(b"touch %s x\r\n" % k, BAD_EXPTIME)
    session.call(b"touch %s\r\n" % k, b"ERROR\r\n")
    session.send(b"touch %s 0 noreply\r\n" % k)
    session.call(b"touch %s -1\r\n" % k, b"TOUCHED\r\n")
    session.call(b"get %s\r\n" % k, b"END\r\n")


# --------------------------------------------------------------------------- incr / decr

@pytest.mark.parametrize("stored, op, reply, after", [
    (b"10", b"incr 1", b"11", b"11"),
    (b"100", b"decr 1", b"99", b"99 "),                      # padded in place
    (b"007", b"incr 1", b"8", b"8  "),
    (b"100", b"incr 900", b"1000", b"1000"),                 # grows: exact length
    (b"5", b"decr 10", b"0", b"0"),                          # floor 0
    (b"18446744073709551615", b"incr 1", b"0", b"0" + b" " * 19),   # wraps mod 2^64
    (b"18446744073709551615", b"incr 2", b"1", b"1" + b" " * 19),
    (b"18446744073709551614", b"incr 1", b"18446744073709551615", b"18446744073709551615"),
    (b"  5", b"incr 1", b"6", b"6  "),                       # leading spaces allowed
    (b"1 2", b"incr 1", b"2", b"2  "),                       # parsing stops at a space
    (b"12 ", b"incr 1", b"13", b"13 "),
    (b"0", b"incr +5", b"5", b"5"),
    (b"7", b"decr 0", b"7", b"7"),
    (b"1", b"incr 18446744073709551615", b"0", b"0"),
])
def test_incr_decr_values(session, kp, stored, op, reply, after):
    k = kp + b"n"
    session.set(k, stored, flags=42)
    verb, delta = op.split()
    session.call(b"%s %s %s\r\n" % (verb, k, delta), reply + b"\r\n")
    session.call(b"get %s\r\n" % k, value_reply(k, 42, after))


@pytest.mark.parametrize("stored", [b"-1", b"12a", b"", b"abc", b"18446744073709551616", b"1.5"])
def test_incr_non_numeric_value(session, kp, stored):
    k = kp + b"n"
    session.set(k, stored)
    session.call(b"incr %s 1\r\n" % k, NON_NUMERIC)
    session.call(b"decr %s 1\r\n" % k, NON_NUMERIC)
    session.call(b"get %s\r\n" % k, value_reply(k, 0, stored))


@pytest.mark.parametrize("delta", [b"-1", b"abc", b"1.5", b"0x10", b"18446744073709551616", b"12a"])
def test_incr_bad_delta(session, kp, delta):
    k = kp + b"n"
    session.set(k, b"5")
    session.call(b"incr %s %s\r\n" % (k, delta), BAD_DELTA)
    session.call(b"decr %s %s\r\n" % (k, delta), BAD_DELTA)


def test_incr_misc(session, kp):
    k = kp + b"n"
    session.call(b"incr %s 1\r\n" % k, b"NOT_FOUND\r\n")
    session.call(b"decr %s 1\r\n" % k, b"NOT_FOUND\r\n")
    session.call(b"incr %s\r\n" % k, b"ERROR\r\n")
    session.set(k, b"5")
    session.send(b"incr %s 10 noreply\r\ndecr %s 2 noreply\r\n" % (k, k))
    session.call(b"get %s\r\n" % k, value_reply(k, 0, b"13"))


# --------------------------------------------------------------------------- flush_all

def test_flush_all_immediate(server, kp):
    with server.session() as s:
        s.set(kp + b"a", b"1")
        s.call(b"flush_all\r\n", b"OK\r\n")
        s.call(b"get %sa\r\n" % kp, b"END\r\n")
        s.call(b"add %sa 0 0 1\r\n2\r\n" % kp, b"STORED\r\n")   # stored after: visible
        s.call(b"get %sa\r\n" % kp, value_reply(kp + b"a", 0, b"2"))
        s.send(b"flush_all noreply\r\n")
        s.call(b"get %sa\r\n" % kp, b"END\r\n")
        s.set(kp + b"b", b"1")
        s.call(b"flush_all -1\r\n", b"OK\r\n")
        s.call(b"get %sb\r\n" % kp, b"END\r\n")
        s.call(b"flush_all 0 0\r\n", b"OK\r\n")
        s.call(b"flush_all x\r\n", BAD_EXPTIME)
        s.call(b"flush_all 1 2 3\r\n", b"ERROR\r\n")


def test_flush_all_in_a_pipeline_of_plain_gets_and_sets(session):
    """Plain get and set take a fast path; a flush_all between them in the same
    write must still hide what was stored before it."""
    session.call(b"set fp 0 0 1\r\n1\r\nget fp\r\nflush_all\r\nget fp\r\n"
                 b"set fp 0 0 1\r\n2\r\nget fp\r\nset fp 0 0 1\r\n3\r\n",
                 b"STORED\r\nVALUE fp 0 1\r\n1\r\nEND\r\nOK\r\nEND\r\n"
                 b"STORED\r\nVALUE fp 0 1\r\n2\r\nEND\r\nSTORED\r\n")
    session.call(b"get fp\r\n", b"VALUE fp 0 1\r\n3\r\nEND\r\n")


def test_flush_all_delayed_and_replaced(server_factory):
    """flush_all 3 hits items stored before its deadline; a later flush_all 0 cancels it."""
    delayed, replaced = server_factory(), server_factory()
    with delayed.session() as a, replaced.session() as b:
        a.set(b"a1", b"x")
        b.call(b"flush_all 3\r\nflush_all 0\r\n", b"OK\r\nOK\r\n")
        b.set(b"b1", b"x")
        t0 = time.monotonic()
        a.call(b"flush_all 3\r\n", b"OK\r\n")
        a.set(b"a2", b"y")                       # stored after the command, before the deadline
        a.call(b"get a1 a2\r\n", b"VALUE a1 0 1\r\nx\r\nVALUE a2 0 1\r\ny\r\nEND\r\n")
        wait_for(lambda: a.get_items([b"a1", b"a2"]) == {}, 4.5, what="delayed flush")
        # wall-clock wait: the cancelled deadline must pass before b1 can be checked
        time.sleep(max(0.0, t0 + 4.5 - time.monotonic()))
        b.call(b"get b1\r\n", value_reply(b"b1", 0, b"x"))
        a.set(b"a3", b"z")
        a.call(b"get a3\r\n", value_reply(b"a3", 0, b"z"))


# --------------------------------------------------------------------------- misc commands

def test_version(session):
    for request in (b"version\r\n", b"version extra tokens\r\n"):
        session.send(request)
        line = session.read_line()
        assert re.fullmatch(rb"VERSION 1\.6\.18(-memtool-\S+)?\r\n", line), line


@pytest.mark.memtool_only
def test_version_names_memtool(session):
    session.send(b"version\r\n")
    assert re.fullmatch(rb"VERSION 1\.6\.18-memtool-\S+\r\n", session.read_line())


def test_verbosity(session):
    session.call(b"verbosity 1\r\n", b"OK\r\n")
    session.call(b"verbosity 0 2\r\n", b"OK\r\n")
    session.call(b"verbosity 1 2 3\r\n", b"ERROR\r\n")
    session.call(b"verbosity\r\n", b"ERROR\r\n")
    session.call(b"verbosity x\r\n", BAD_FORMAT)
    session.call(b"verbosity -1\r\n", BAD_FORMAT)
    session.send(b"verbosity noreply\r\nverbosity 0 noreply\r\n")
    session.sync()


def test_quit_closes_and_ignores_the_rest(server, kp):
    with server.session() as s:
        s.send(b"set %sk 0 0 1\r\nx\r\nquit\r\nset %sk 0 0 1\r\ny\r\n" % (kp, kp))
        s.expect(b"STORED\r\n")
        s.expect_closed()
    with server.session() as s:
        s.send(b"quit now\r\n")
        s.expect_closed()
    with server.session() as s:
        s.call(b"get %sk\r\n" % kp, value_reply(kp + b"k", 0, b"x"))


def test_shutdown_not_enabled(server, session):
    session.call(b"shutdown\r\n", b"ERROR: shutdown not enabled\r\n")
    session.call(b"shutdown graceful\r\n", b"ERROR: shutdown not enabled\r\n")
    session.sync()
    assert server.running


@pytest.mark.server_only
def test_shutdown_enabled(server_factory):
    srv = server_factory(enable_shutdown=True)
    with srv.session() as s:
        s.call(b"shutdown bogus\r\n", b"CLIENT_ERROR invalid shutdown mode\r\n")
        s.send(b"shutdown\r\n")
        s.expect_closed()
    assert srv.proc.wait(STOP_TIMEOUT) == 0


def test_unknown_and_malformed_commands(session):
    for line in (b"\r\n", b"x\r\n", b"bogus\r\n", b"GET k\r\n", b"Set k 0 0 1\r\n",
                 b"stats bogus\r\n", b"mx\r\n"):
        session.call(line, b"ERROR\r\n")
    session.call(b"stats detail\r\n", b"CLIENT_ERROR usage: stats detail on|off|dump\r\n")
    session.sync()


def test_cache_memlimit(session):
    session.call(b"cache_memlimit 256\r\n", b"OK\r\n")


# --------------------------------------------------------------------------- framing

def test_tokens_split_on_spaces_only(session, kp):
    k = kp + b"a\tb"
    session.call(b"   set   %s   3  0   2  \r\nhi\r\n" % k, b"STORED\r\n")
    session.call(b"get %s\r\n" % k, value_reply(k, 3, b"hi"))
    session.call(b"get %sa\r\n" % kp, b"END\r\n")
    session.call(b"get %s\x00 zzz\r\n" % k, value_reply(k, 3, b"hi"))   # NUL ends the line


def test_bare_newline_line_ends(session, kp):
    k = kp + b"k"
    session.call(b"set %s 0 0 2\nhi\r\nget %s\n" % (k, k), b"STORED\r\n" + value_reply(k, 0, b"hi"))
    session.call(b"incr %s 1\n" % k, NON_NUMERIC)
    session.call(b"delete %s\n" % k, b"DELETED\r\n")
    session.call(b"\n", b"ERROR\r\n")
    # the data block itself must end in \r\n: x\n plus one byte of the next line is eaten
    session.call(b"set %s 0 0 1\nx\nget %s\n" % (k, k), BAD_CHUNK + b"ERROR\r\n")


def test_pipelined_in_one_write(session, kp):
    a, b = kp + b"a", kp + b"b"
    request = (b"set %s 1 0 3\r\nabc\r\nset %s 0 0 1\r\n5\r\nget %s %s\r\nincr %s 10\r\n"
               b"append %s 0 0 1\r\nd\r\ndelete %s\r\nget %s\r\nbogus\r\nadd %s 0 0 1\r\nx\r\n"
               b"touch %s 0\r\ndecr %s 100\r\n" % (a, b, a, b, b, a, a, a, b, b, b))
    expected = (b"STORED\r\nSTORED\r\nVALUE %s 1 3\r\nabc\r\nVALUE %s 0 1\r\n5\r\nEND\r\n"
                b"15\r\nSTORED\r\nDELETED\r\nEND\r\nERROR\r\nNOT_STORED\r\nTOUCHED\r\n0\r\n"
                % (a, b))
    session.call(request, expected)


def test_command_split_byte_by_byte(session, kp):
    k = kp + b"k"
    request = b"set %s 2 0 5\r\nab\r\nc\r\nget %s\r\ndelete %s\r\n" % (k, k, k)
    session.send_pieces(request)
    session.expect(b"STORED\r\n" + value_reply(k, 2, b"ab\r\nc") + b"DELETED\r\n")


def test_binary_value_with_crlf_and_all_bytes(session, kp):
    k = kp + b"bin"
    value = b"\r\nEND\r\n" + bytes(range(256)) * 4 + b"\r\n\x00\r\n"
    session.call(b"set %s 0 0 %d\r\n%s\r\n" % (k, len(value), value), b"STORED\r\n")
    session.call(b"get %s\r\n" % k, value_reply(k, 0, value))


def test_long_line_without_newline_closes(server):
    with server.session() as s:
        s.send(b"set " + b"k" * 2100)
        s.expect_closed()
    with server.session() as s:
        s.send(b"x" * 3000)
        s.expect_closed()
    with server.session() as s:                  # gat is not exempt, only get/gets
        s.send(b"gat 0 " + b"k" * 2100)
        s.expect_closed()
    with server.session() as s:
        s.sync()


def test_line_length_guard_boundary(server):
    """2048 buffered bytes without a newline are kept; 2049 close the connection."""
    with server.session() as s, server.session() as other:
        s.send(b"x" * 2048)
        other.sync()        # the server has had its chance to read the unterminated part
        s.call(b"\r\n", b"ERROR\r\n")
        s.send(b"x" * 2049)
        s.expect_closed()


@pytest.mark.parametrize("cmd", [b"get", b"gets"])
def test_long_multiget_in_pieces_is_allowed(server, kp, cmd):
    keys = [kp + b"%04d" % i for i in range(400)]
    line = cmd + b" " + b" ".join(keys)
    assert len(line) > 2048
    with server.session() as s, server.session() as other:
        s.set(keys[7], b"seven")
        s.send(line)
        other.sync()        # the server has had its chance to read the unterminated part
        s.send(b"\r\n")
        items = s.read_items()
        assert [(k, v[1]) for k, v in items.items()] == [(keys[7], b"seven")]
        s.sync()


def test_long_line_arriving_whole_is_processed(session):
    session.send(b"version " + b"x " * 1500 + b"\r\n")
    line = session.read_line()
    assert line.startswith(b"VERSION 1.6.18")
    session.call(b"bogus" + b" " * 3000 + b"\r\n", b"ERROR\r\n")


@pytest.mark.memtool_only
def test_http_request_line_switches_to_http(server):
    """memcached drops a client whose line ends in HTTP/x; memtool answers HTTP instead."""
    with server.session() as s:
        s.send(b"foo bar HTTP/1.0\r\n\r\n")
        assert s.read_to_eof().startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    with server.session() as s:
        s.send(b"HTTP/1.1\r\n\r\n")
        assert s.read_to_eof().startswith(b"HTTP/1.1 400 Bad Request\r\n")
    with server.session() as s:
        s.call(b"get HTTP/1.1\r\n", b"END\r\n")      # known command: no special case


# --------------------------------------------------------------------------- keys

def test_key_of_250_bytes_works_everywhere(session, kp):
    k = (kp + b"k" * 250)[:250]
    session.call(b"set %s 0 0 1\r\n1\r\n" % k, b"STORED\r\n")
    session.call(b"get %s\r\n" % k, value_reply(k, 0, b"1"))
    session.call(b"incr %s 1\r\n" % k, b"2\r\n")
    session.call(b"touch %s 0\r\n" % k, b"TOUCHED\r\n")
    session.call(b"gat 0 %s\r\n" % k, value_reply(k, 0, b"2"))
    session.call(b"append %s 0 0 1\r\n3\r\n" % k, b"STORED\r\n")
    session.call(b"delete %s\r\n" % k, b"DELETED\r\n")


def test_key_of_251_bytes_is_refused(session, kp):
    k = (kp + b"k" * 251)[:251]
    session.call(b"set %s 0 0 1\r\n1\r\n" % k, BAD_FORMAT + b"ERROR\r\n")
    session.call(b"add %s 0 0 1\r\n1\r\n" % k, BAD_FORMAT + b"ERROR\r\n")
    session.call(b"cas %s 0 0 1 1\r\n1\r\n" % k, BAD_FORMAT + b"ERROR\r\n")
    for request in (b"get %s\r\n", b"gets %s\r\n", b"gat 0 %s\r\n", b"delete %s\r\n",
                    b"incr %s 1\r\n", b"decr %s 1\r\n", b"touch %s 0\r\n"):
        session.call(request % k, BAD_FORMAT)
    # one long key spoils a whole multiget, hits before it included
    short = kp + b"s"
    session.set(short, b"x")
    session.call(b"get %s %s %s\r\n" % (short, k, short), BAD_FORMAT)
    session.sync()


def test_control_and_non_ascii_bytes_in_keys(session, kp):
    for suffix in (b"\x01", b"\x7f\x0b\x0c", "é€".encode(), b"a\rb", b"\xff"):
        k = kp + suffix
        session.call(b"set %s 0 0 1\r\nv\r\n" % k, b"STORED\r\n")
        session.call(b"get %s\r\n" % k, value_reply(k, 0, b"v"))


# --------------------------------------------------------------------------- numbers

@pytest.mark.parametrize("flags, shown", [
    (b"+5", 5), (b"007", 7), (b"-0", 0), (b"4294967295", 4294967295), (b"4294967296", 0),
    (b"4294967297", 1), (b"18446744073709551615", 4294967295), (b"9223372036854775808", 0),
])
def test_flags_parse_as_uint64_truncated_to_32(session, kp, flags, shown):
    k = kp + b"k"
    session.call(b"set %s %s 0 1\r\nx\r\n" % (k, flags), b"STORED\r\n")
    session.call(b"get %s\r\n" % k, value_reply(k, shown, b"x"))


@pytest.mark.parametrize("field", ["flags", "exptime", "length"])
@pytest.mark.parametrize("bad", [b"0x10", b"1.5", b"1e3", b"12a", b"x", b"18446744073709551616"])
def test_bad_numbers_leave_data_as_a_command(session, kp, field, bad):
    k = kp + b"k"
    fields = {"flags": b"0", "exptime": b"0", "length": b"1"}
    fields[field] = bad
    session.call(b"set %s %s %s %s\r\nx\r\n"
                 % (k, fields["flags"], fields["exptime"], fields["length"]),
                 BAD_FORMAT + b"ERROR\r\n")
    session.call(b"get %s\r\n" % k, b"END\r\n")


@pytest.mark.parametrize("request_", [
    b"set %s -1 0 1\r\nx\r\n",                      # negative flags
    b"set %s 0 9223372036854775808 1\r\nx\r\n",    # exptime beyond int64
    b"set %s 0 0 -1\r\nx\r\n",
    b"set %s 0 0 2147483646\r\nx\r\n",
    b"set %s 0 0 2147483647\r\nx\r\n",
    b"cas %s 0 0 1 -1\r\nx\r\n",
    b"cas %s 0 0 1 abc\r\nx\r\n",
    b"cas %s 0 0 1 18446744073709551616\r\nx\r\n",
])
def test_out_of_range_numbers(session, kp, request_):
    session.call(request_ % (kp + b"k"), BAD_FORMAT + b"ERROR\r\n")


def test_length_truncated_to_32_bits(session, kp):
    k = kp + b"k"
    session.call(b"set %s 0 0 4294967297\r\nx\r\n" % k, b"STORED\r\n")
    session.call(b"get %s\r\n" % k, value_reply(k, 0, b"x"))


def test_token_count(session, kp):
    k = kp + b"k"
    session.call(b"set %s 0 0 1 junk\r\nx\r\n" % k, b"STORED\r\n")     # 6th token ignored
    session.call(b"set %s 0 0 1 junk more\r\ny\r\n" % k, b"ERROR\r\nERROR\r\n")
    session.call(b"set %s 0 0\r\nz\r\n" % k, b"ERROR\r\nERROR\r\n")
    session.call(b"cas %s 0 0 1\r\nz\r\n" % k, b"ERROR\r\nERROR\r\n")
    session.call(b"set " + b"t " * 30 + b"\r\n", b"ERROR\r\n")
    session.call(b"get %s\r\n" % k, value_reply(k, 0, b"x"))


# --------------------------------------------------------------------------- bad data

def test_bad_data_chunk_resyncs_after_length_plus_two(session, kp):
    k = kp + b"k"
    session.set(k, b"old")
    # 3 bytes + 2 are consumed ("abcde"), then "fg\r\n" is read as a command
    session.call(b"set %s 0 0 3\r\nabcdefg\r\n" % k, BAD_CHUNK + b"ERROR\r\n")
    session.call(b"get %s\r\n" % k, value_reply(k, 0, b"old"))
    session.call(b"set %s 0 0 3\r\nab\r\nget %s\r\n" % (k, k), BAD_CHUNK + b"ERROR\r\n")
    session.sync()


# --------------------------------------------------------------------------- noreply

def test_noreply_suppresses_replies(session, kp):
    k, n = kp + b"k", kp + b"n"
    session.send(b"set %s 1 0 1 noreply\r\na\r\n"
                 b"add %s 0 0 1 noreply\r\nb\r\n"           # NOT_STORED, suppressed
                 b"replace %s 2 0 1 noreply\r\nc\r\n"
                 b"append %s 0 0 1 noreply\r\nd\r\n"
                 b"prepend %s 0 0 1 noreply\r\ne\r\n"
                 b"set %s 0 0 1 noreply\r\n5\r\n"
                 b"incr %s 3 noreply\r\ndecr %s 1 noreply\r\n"
                 b"incr %smissing 1 noreply\r\n"
                 b"touch %s 0 noreply\r\nverbosity 0 noreply\r\n" % (k, k, k, k, k, n, n, n, kp, k))
    session.sync()
    session.call(b"get %s %s\r\n" % (k, n),
                 b"VALUE %s 2 3\r\necd\r\nVALUE %s 0 1\r\n7\r\nEND\r\n" % (k, n))


def test_noreply_suppresses_errors_but_not_the_data_line(session, kp):
    k = kp + b"k"
    session.call(b"set %s 0x1 0 1 noreply\r\nx\r\n" % k, b"ERROR\r\n")
    session.call(b"set %s 0 0 1 noreply\r\nxyz\r\n" % k, b"ERROR\r\n")     # bad chunk, "z" left
    session.send(b"set %s 0 0 3 noreply\r\nabcde" % k)                      # bad chunk, exact
    big = max_value_len(len(k)) + 1
    session.send(b"set %s 0 0 %d noreply\r\n%s\r\n" % (k, big, b"v" * big))
    session.send(b"incr %s x noreply\r\ntouch %s x noreply\r\n" % (k, k))
    session.sync()
    session.call(b"get %s noreply\r\n" % k, b"END\r\n")                      # get has no noreply
    session.call(b"set %s 0 0 1 NOREPLY\r\nx\r\n" % k, b"STORED\r\n")


# --------------------------------------------------------------------------- sizes

def test_values_near_the_1mb_limit(session, kp):
    k = kp + b"big"
    limit = max_value_len(len(k))
    value = bytes(range(256)) * (limit // 256) + b"z" * (limit % 256)
    session.call(b"set %s 0 0 %d\r\n%s\r\n" % (k, limit, value), b"STORED\r\n")
    session.call(b"get %s\r\n" % k, value_reply(k, 0, value))
    # one byte more is refused, the data is swallowed and the stream stays in sync;
    # a refused set also drops the old value
    session.call(b"set %s 0 0 %d\r\n%s\r\nget %s\r\n" % (k, limit + 1, b"v" * (limit + 1), k),
                 TOO_LARGE + b"END\r\n")
    session.call(b"set %s 1 0 %d\r\n%s\r\n" % (k, limit - 4, b"f" * (limit - 4)), b"STORED\r\n")
    session.call(b"set %s 1 0 %d\r\n%s\r\n" % (k, limit - 3, b"f" * (limit - 3)), TOO_LARGE)
    over = DEFAULT_ITEM_MAX + 1                  # more than 1 MiB of value never fits
    session.call(b"set %s 0 0 %d\r\n%s\r\n" % (k, over, b"v" * over), TOO_LARGE)
    session.sync()


def test_too_large_add_and_replace_keep_the_old_value(session, kp):
    k = kp + b"k"
    session.set(k, b"old")
    big = max_value_len(len(k)) + 1
    for cmd in (b"add", b"replace", b"append", b"prepend"):
        session.call(b"%s %s 0 0 %d\r\n%s\r\n" % (cmd, k, big, b"v" * big), TOO_LARGE)
    session.call(b"get %s\r\n" % k, value_reply(k, 0, b"old"))


def test_append_beyond_the_limit_is_not_stored(session, kp):
    k = kp + b"k"
    limit = max_value_len(len(k))
    session.set(k, b"a" * (limit - 10))
    session.call(b"append %s 0 0 11\r\n%s\r\n" % (k, b"b" * 11), b"NOT_STORED\r\n")
    session.call(b"prepend %s 0 0 11\r\n%s\r\n" % (k, b"b" * 11), b"NOT_STORED\r\n")
    session.call(b"append %s 0 0 10\r\n%s\r\n" % (k, b"b" * 10), b"STORED\r\n")
    session.call(b"get %s\r\n" % k, value_reply(k, 0, b"a" * (limit - 10) + b"b" * 10))


def test_250_byte_key_size_limit(session, kp):
    k = (kp + b"k" * 250)[:250]
    limit = max_value_len(250)
    session.call(b"set %s 0 0 %d\r\n%s\r\n" % (k, limit, b"v" * limit), b"STORED\r\n")
    session.call(b"set %s 0 0 %d\r\n%s\r\n" % (k, limit + 1, b"v" * (limit + 1)), TOO_LARGE)


def test_item_size_option(server_factory):
    srv = server_factory(max_item_size="2k")
    limit = max_value_len(1, item_max=2048)
    with srv.session() as s:
        s.call(b"set k 0 0 %d\r\n%s\r\n" % (limit, b"v" * limit), b"STORED\r\n")
        s.call(b"set k 0 0 %d\r\n%s\r\nget k\r\n" % (limit + 1, b"v" * (limit + 1)),
               TOO_LARGE + b"END\r\n")


def test_huge_claimed_length_is_swallowed_not_allocated(server_factory):
    srv = server_factory(max_item_size="64k")
    claim = 2147483645
    before = rss_peak_kib(srv.proc.pid)
    with srv.session(timeout=60) as s, srv.session() as other:
        s.set(b"k", b"old")
        s.send(b"set k 0 0 %d\r\n" % claim)
        chunk = b"\0" * (1 << 20)
        left = claim
        while left:
            piece = chunk if left >= len(chunk) else chunk[:left]
            s.send(piece)
            left -= len(piece)
        other.sync()                                   # others are served meanwhile
        s.send(b"\r\nget k\r\n")
        s.expect(TOO_LARGE + b"END\r\n")
        s.set(b"k", b"new")
        s.call(b"get k\r\n", value_reply(b"k", 0, b"new"))
    grown_mib = (rss_peak_kib(srv.proc.pid) - before) / 1024
    assert grown_mib < 100, "server grew by %.0f MiB for a refused value" % grown_mib


@pytest.mark.memtool_only
@pytest.mark.parametrize("protocol", ["text", "meta", "multiget", "multigets"])
def test_unread_replies_neither_grow_memory_nor_stall_others(tmp_path, protocol):
    """A client pipelines 400 MB of replies in a few KB and does not read them: the
    server's memory stays flat, other clients are served, and every byte still
    arrives once the client reads. (Output handling is engine-independent.)"""
    value = b"v" * 1000000
    count = 400
    with MemtoolServer(tmp_path, engine="memory") as srv:
        srv.start()
        with srv.session(timeout=30) as s, srv.session() as other:
            s.set(b"big", value)
            cas = s.gets_cas(b"big")
            request, block = {
                "text": (b"get big\n" * count, b"VALUE big 0 1000000\r\n%s\r\nEND\r\n" % value),
                "meta": (b"mg big v\r\n" * count, b"VA 1000000\r\n%s\r\n" % value),
                "multiget": (b"get" + b" big" * count + b"\r\n",
                             b"VALUE big 0 1000000\r\n%s\r\n" % value),
                "multigets": (b"gets" + b" big" * count + b"\r\n",
                              b"VALUE big 0 1000000 %d\r\n%s\r\n" % (cas, value)),
            }[protocol]
            before = rss_peak_kib(srv.proc.pid)
            s.send(request)
            other.sync()
            other.sync()
            grown_mib = (rss_peak_kib(srv.proc.pid) - before) / 1024
            assert grown_mib < 64, "server grew by %.0f MiB for unread replies" % grown_mib
            for _ in range(count):
                s.expect(block)
            if protocol.startswith("multiget"):
                s.expect(b"END\r\n")
            s.sync()


# --------------------------------------------------------------------------- expiry

def test_exptime_forms_that_need_no_waiting(session, kp):
    now = int(time.time())
    cases = [
        (b"neg", b"-1", False), (b"past_abs", b"%d" % (now - 10), False),
        (b"1970", b"2592001", False), (b"int32neg", b"2147483648", False),
        (b"zero", b"0", True), (b"int32zero", b"4294967296", True),
        (b"month", b"2592000", True), (b"future_abs", b"%d" % (now + 1000), True),
    ]
    for name, exptime, _ in cases:
        session.call(b"set %s%s 0 %s 1\r\nx\r\n" % (kp, name, exptime), b"STORED\r\n")
    for name, _, alive in cases:
        k = kp + name
        session.call(b"get %s\r\n" % k, value_reply(k, 0, b"x") if alive else b"END\r\n")


def test_expiry_over_time(session, kp):
    """TTL 2 lives 1..3 s (the clock ticks once a second); every form is checked at once."""
    def k(name):
        return kp + name
    t0 = time.time()
    session.set(k(b"rel"), b"x", exptime=2)
    session.set(k(b"abs"), b"x", exptime=int(t0) + 3)
    for name in (b"touch", b"gat", b"gats", b"keep"):
        session.set(k(name), b"x")
    for name in (b"keep_gat0", b"keep_touch"):
        session.set(k(name), b"x", exptime=2)
    session.call(b"touch %s 2\r\n" % k(b"touch"), b"TOUCHED\r\n")
    session.call(b"gat 2 %s\r\n" % k(b"gat"), value_reply(k(b"gat"), 0, b"x"))
    assert list(session.get_items([k(b"gats")], b"gats 2")) == [k(b"gats")]
    session.call(b"gat 0 %s\r\n" % k(b"keep_gat0"), value_reply(k(b"keep_gat0"), 0, b"x"))
    session.call(b"touch %s 100\r\n" % k(b"keep_touch"), b"TOUCHED\r\n")
    expiring = [k(n) for n in (b"rel", b"abs", b"touch", b"gat", b"gats")]
    kept = [k(n) for n in (b"keep", b"keep_gat0", b"keep_touch")]
    assert sorted(session.get_items(expiring + kept)) == sorted(expiring + kept)

    gone_at = {}
    while len(gone_at) < len(expiring) and time.time() < t0 + 6:
        present = session.get_items(expiring)
        assert not set(present) & set(gone_at), "expired item came back"
        for key in expiring:
            if key not in present and key not in gone_at:
                gone_at[key] = time.time() - t0
        time.sleep(0.05)
    assert sorted(gone_at) == sorted(expiring), "still alive after 6 s"
    for key, t in gone_at.items():
        assert 0.9 <= t <= 4.3, "%r expired after %.2f s" % (key, t)
    assert sorted(session.get_items(kept)) == sorted(kept)
    # an expired item is invisible to every command
    session.call(b"delete %s\r\n" % k(b"abs"), b"NOT_FOUND\r\n")
    session.call(b"replace %s 0 0 1\r\ny\r\n" % k(b"abs"), b"NOT_STORED\r\n")
    session.call(b"append %s 0 0 1\r\ny\r\n" % k(b"touch"), b"NOT_STORED\r\n")
    session.call(b"incr %s 1\r\n" % k(b"gat"), b"NOT_FOUND\r\n")
    session.call(b"touch %s 0\r\n" % k(b"gats"), b"NOT_FOUND\r\n")
    session.call(b"add %s 0 0 1\r\ny\r\n" % k(b"rel"), b"STORED\r\n")
    session.call(b"get %s\r\n" % k(b"rel"), value_reply(k(b"rel"), 0, b"y"))


# --------------------------------------------------------------------------- connections

@pytest.mark.server_only
def test_max_conns(server_factory):
    srv = server_factory(max_conns=3)
    first = srv.session()
    # the start-up probe connection must be gone before the slots are counted
    wait_for(lambda: first.stats()["curr_connections"] == "1", 5, what="probe connection to close")
    sessions = [first] + [srv.session() for _ in range(2)]
    for s in sessions:
        s.sync()
    with srv.session() as refused:
        refused.expect(b"ERROR Too many open connections\r\n")
        refused.expect_closed()
    for s in sessions:
        s.sync()

    def connect():
        s = srv.session()
        try:
            s.send(b"version\r\n")
            line = s.read_line()
        except (AssertionError, OSError):     # refused and reset before we read
            s.close()
            return None
        if line.startswith(b"VERSION 1.6.18"):
            return s
        assert line == b"ERROR Too many open connections\r\n"
        s.close()
        return None

    sessions.pop().close()
    sessions.append(wait_for(connect, 5, what="a freed connection slot"))
    for s in sessions:
        s.close()


# --------------------------------------------------------------------------- stats

REQUIRED_STATS = ("pid uptime time version curr_connections total_connections cmd_get cmd_set "
                  "cmd_flush cmd_touch get_hits get_misses get_expired delete_hits delete_misses "
                  "incr_hits incr_misses decr_hits decr_misses cas_hits cas_misses cas_badval "
                  "touch_hits touch_misses bytes_read bytes_written curr_items total_items bytes "
                  "limit_maxbytes threads").split()


@pytest.mark.server_only
def test_stats_fields(server, session):
    st = session.stats()
    assert [f for f in REQUIRED_STATS if f not in st] == []
    assert int(st["pid"]) == server.proc.pid
    assert st["version"].startswith("1.6.18")
    assert abs(int(st["time"]) - time.time()) <= 2
    for name in REQUIRED_STATS:
        if name != "version":
            assert re.fullmatch(r"\d+", st[name]), (name, st[name])
    assert session.stats(b"settings")          # well formed STAT lines, then END
    session.call(b"stats reset\r\n", b"RESET\r\n")


@pytest.mark.server_only
def test_stats_counters_move(server_factory):
    srv = server_factory()
    s = srv.session()
    base = s.stats()

    def check(**expected):
        now = s.stats()
        got = {name: int(now[name]) - int(base[name]) for name in expected}
        assert got == expected

    s.call(b"set a 0 0 1\r\n1\r\nset b 0 0 1\r\n2\r\n", b"STORED\r\nSTORED\r\n")
    check(cmd_set=2, total_items=2, curr_items=2)
    s.call(b"get a b c\r\n", b"VALUE a 0 1\r\n1\r\nVALUE b 0 1\r\n2\r\nEND\r\n")
    check(cmd_get=3, get_hits=2, get_misses=1)
    s.call(b"add a 0 0 1\r\n1\r\n", b"NOT_STORED\r\n")
    s.call(b"set c 0 0 1\r\nxyz\r\n", BAD_CHUNK + b"ERROR\r\n")           # data read: counts
    s.call(b"set c 0 x 1\r\n1\r\n", BAD_FORMAT + b"ERROR\r\n")            # never counted
    s.call(b"set c 0 0 %d\r\n%s\r\n" % (DEFAULT_ITEM_MAX, b"v" * DEFAULT_ITEM_MAX), TOO_LARGE)
    check(cmd_set=4, total_items=2, curr_items=2)
    s.call(b"delete a\r\ndelete zz\r\n", b"DELETED\r\nNOT_FOUND\r\n")
    check(delete_hits=1, delete_misses=1, curr_items=1)
    s.call(b"set n 0 0 1\r\n5\r\nincr n 1\r\nincr zz 1\r\ndecr n 1\r\ndecr zz 1\r\ndecr zz 1\r\n",
           b"STORED\r\n6\r\nNOT_FOUND\r\n5\r\nNOT_FOUND\r\nNOT_FOUND\r\n")
    check(incr_hits=1, incr_misses=1, decr_hits=1, decr_misses=2, curr_items=2)
    s.call(b"touch b 0\r\ntouch zz 0\r\ngat 0 b zz\r\n",
           b"TOUCHED\r\nNOT_FOUND\r\nVALUE b 0 1\r\n2\r\nEND\r\n")
    check(cmd_touch=4, touch_hits=2, touch_misses=2, cmd_get=3, get_hits=2, get_misses=1)
    cas = s.gets_cas(b"b")
    s.call(b"cas b 0 0 1 %d\r\n3\r\ncas b 0 0 1 %d\r\n4\r\ncas zz 0 0 1 1\r\n5\r\n" % (cas, cas),
           b"STORED\r\nEXISTS\r\nNOT_FOUND\r\n")
    check(cas_hits=1, cas_badval=1, cas_misses=1, cmd_set=8, cmd_get=4, get_hits=3)
    s.call(b"set e 0 -1 1\r\nx\r\nget e\r\n", b"STORED\r\nEND\r\n")
    check(get_expired=1, get_misses=2, curr_items=2)
    s.call(b"flush_all\r\n", b"OK\r\n")
    check(cmd_flush=1)

    before = s.stats()
    s.set(b"blob", b"b" * 10000)
    s.call(b"get blob\r\n", value_reply(b"blob", 0, b"b" * 10000))
    after = s.stats()
    assert int(after["bytes_read"]) - int(before["bytes_read"]) >= 10000
    assert int(after["bytes_written"]) - int(before["bytes_written"]) >= 10000

    with srv.session() as other:
        st = other.stats()
        assert int(st["curr_connections"]) == int(after["curr_connections"]) + 1
        assert int(st["total_connections"]) == int(after["total_connections"]) + 1
    wait_for(lambda: s.stats()["curr_connections"] == after["curr_connections"], 5,
             what="curr_connections to drop after a close")

    items = s.stats()["curr_items"]
    s.call(b"stats reset\r\n", b"RESET\r\n")
    st = s.stats()
    assert [st[n] for n in ("cmd_get", "get_hits", "cmd_set", "total_items", "delete_hits")] \
        == ["0"] * 5
    assert st["curr_items"] == items
    s.close()
