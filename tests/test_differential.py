"""The same command scripts to real memcached and to the server under test.

Replies are compared per step after normalising cas uniques (to their order of
first appearance, so equal/unequal cas stays visible) and the version string.
"""
import re

import pytest

from support import max_value_len

pytestmark = pytest.mark.proxied

VERSION_RE = re.compile(rb"VERSION 1\.6\.18[^\r\n]*\r\n")
CAS_RE = re.compile(rb"(VALUE [^ \r\n]+ \d+ \d+ )(\d+)\r\n")


class Close(bytes):
    """A step after which the server must close the connection."""


class Partial(bytes):
    """Bytes sent without a line end; the server gets a chance to read them alone."""


def normalise(reply, cas_names):
    def rename(m):
        name = cas_names.setdefault(m.group(2), b"<cas%d>" % (len(cas_names) + 1))
        return m.group(1) + name + b"\r\n"
    return CAS_RE.sub(rename, VERSION_RE.sub(b"VERSION 1.6.18\r\n", reply))


def run_script(server, steps):
    """Per-step replies; each step is followed by a sentinel whose reply marks its end."""
    replies, cas_names, last_cas = [], {}, None
    with server.session() as s, server.session() as aux:
        s.call(b"flush_all\r\n", b"OK\r\n")        # a clean slate; also cancels delayed flushes
        for i, step in enumerate(steps):
            if b"{cas}" in step:
                step = type(step)(step.replace(b"{cas}", last_cas))
            if isinstance(step, Partial):
                s.send(step)
                aux.sync()
                continue
            if isinstance(step, Close):
                try:
                    s.send(step)
                except OSError:
                    pass
                replies.append(normalise(s.read_to_eof(), cas_names) + b"<closed>")
                break
            sentinel = b"__sentinel%d" % i
            s.send(step + b"set %s 0 0 1\r\n!\r\nget %s\r\n" % (sentinel, sentinel))
            tail = b"STORED\r\nVALUE %s 0 1\r\n!\r\nEND\r\n" % sentinel
            reply = s.read_until(tail)[:-len(tail)]
            found = CAS_RE.findall(reply)
            if found:
                last_cas = found[-1][1]
            replies.append(normalise(reply, cas_names))
    return replies


K250 = b"k" * 250
K251 = b"k" * 251
BIG = max_value_len(3)            # largest value for a 3-byte key at -I 1m
LONG_KEYS = b" ".join(b"key%04d" % i for i in range(400))
DIGITS = b"7" * 5000             # past Python's int() limit of 4300 digits
ZEROS = b"0" * 4999 + b"9"        # the same length, but only one significant digit

SCRIPTS = {
    "storage_commands": [
        b"set a 1 0 1\r\nx\r\n", b"get a\r\n", b"add a 0 0 1\r\ny\r\n", b"add b 2 0 1\r\ny\r\n",
        b"replace c 0 0 1\r\nz\r\n", b"replace a 3 0 2\r\nzz\r\n", b"get a b c\r\n",
        b"append a 9 9 1\r\n!\r\n", b"prepend b 9 -1 1\r\n^\r\n", b"append c 0 0 1\r\nq\r\n",
        b"prepend c 0 0 1\r\nq\r\n", b"get a b c\r\n", b"set e 0 0 0\r\n\r\n", b"get e\r\n",
        b"set crlf 0 0 4\r\n\r\n\r\n\r\n", b"get crlf\r\n",
    ],
    "cas_flow": [
        b"set a 0 0 1\r\nx\r\n", b"gets a\r\n", b"cas a 5 0 1 {cas}\r\ny\r\n",
        b"cas a 0 0 1 {cas}\r\nz\r\n", b"gets a a\r\n", b"cas a 0 0 1 0\r\nq\r\n",
        b"cas nope 0 0 1 1\r\nq\r\n", b"touch a 100\r\n", b"gats 0 a\r\n", b"gets a\r\n",
        b"cas a 0 0 1 {cas} noreply\r\nn\r\n", b"gets a\r\n",
        b"cas a 0 0 1 {cas} junk\r\nj\r\n", b"gets a\r\n",
    ],
    "cas_changes_on_every_write": [
        b"set n 0 0 2\r\n10\r\n", b"gets n\r\n", b"incr n 1\r\n", b"gets n\r\n", b"decr n 1\r\n",
        b"gets n\r\n", b"append n 0 0 1\r\n0\r\n", b"gets n\r\n", b"prepend n 0 0 1\r\n1\r\n",
        b"gets n\r\n", b"replace n 0 0 1\r\n7\r\n", b"gets n\r\n", b"touch n 0\r\n", b"gets n\r\n",
        b"gat 0 n\r\n", b"gets n\r\n",
    ],
    "cas_bad_lines": [
        b"cas k 0 0 6 \r\nfoobar\r\n", b"cas a 0 0 1 -1\r\nx\r\n", b"cas a 0 0 1 1x\r\nx\r\n",
        b"cas a 0 0 1 18446744073709551616\r\nx\r\n", b"cas a 0 0 1 18446744073709551615\r\nx\r\n",
        b"cas a 0 0 1 1 noreply extra\r\nx\r\n",
    ],
    "incr_decr": [
        b"set n 0 0 3\r\n100\r\n", b"decr n 1\r\n", b"get n\r\n", b"incr n 1\r\n", b"get n\r\n",
        b"decr n 91\r\n", b"get n\r\n", b"append n 0 0 1\r\nx\r\n", b"incr n 1\r\n", b"get n\r\n",
        b"set m 0 0 20\r\n18446744073709551615\r\n", b"incr m 2\r\n", b"get m\r\n",
        b"decr m 5\r\n", b"get m\r\n", b"set z 0 0 3\r\n007\r\n", b"incr z +3\r\n", b"get z\r\n",
        b"set w 0 0 2\r\n99\r\n", b"incr w 1\r\n", b"get w\r\n",
        b"incr n 18446744073709551615\r\n", b"incr n 18446744073709551616\r\n",
        b"incr n -1\r\n", b"decr n abc\r\n", b"incr n\r\n", b"incr n 1 2\r\n",
        b"incr nope 1\r\n", b"decr nope 1\r\n", b"incr n 5 noreply\r\n", b"get n\r\n",
    ],
    "incr_non_numeric": [
        b"set a 0 0 2\r\n-1\r\n", b"incr a 1\r\n", b"set a 0 0 3\r\n12a\r\n", b"incr a 1\r\n",
        b"set a 0 0 0\r\n\r\n", b"decr a 1\r\n", b"set a 0 0 20\r\n18446744073709551616\r\n",
        b"incr a 1\r\n", b"set a 0 0 3\r\n  7\r\n", b"incr a 1\r\n", b"get a\r\n",
        b"set a 0 0 3\r\n7 x\r\n", b"incr a 1\r\n", b"get a\r\n", b"set a 0 0 2\r\n\t7\r\n",
        b"incr a 1\r\n",
    ],
    "delete_forms": [
        b"set a 0 0 1\r\nx\r\n", b"delete a 0\r\n", b"delete a\r\n", b"set a 0 0 1\r\nx\r\n",
        b"delete a 1\r\n", b"delete a 0 0\r\n", b"delete a x\r\n", b"delete a noreply\r\n",
        b"get a\r\n", b"set a 0 0 1\r\nx\r\n", b"delete a 0 noreply\r\n", b"get a\r\n",
        b"delete\r\n", b"delete a b c d\r\n", b"delete a 0 noreply x\r\n",
    ],
    "touch_and_gat_forms": [
        b"set a 3 0 1\r\nx\r\n", b"touch a 10\r\n", b"touch b 10\r\n", b"touch a\r\n",
        b"touch a abc\r\n", b"touch a 10 noreply\r\n", b"touch a 1 2 3\r\n", b"gat 100 a\r\n",
        b"gats 100 a b a\r\n", b"gat abc a\r\n", b"gat 0\r\n", b"gat\r\n", b"gats\r\n",
        b"gat 10 " + K251 + b"\r\n", b"gat 0 a\r\n", b"gat -1 a\r\n", b"get a\r\n",
        b"set b 0 0 1\r\ny\r\n", b"touch b -1\r\n", b"get b\r\n",
    ],
    "flush_all_forms": [
        b"set a 0 0 1\r\nx\r\n", b"flush_all 0 0\r\n", b"get a\r\n", b"set a 0 0 1\r\nx\r\n",
        b"flush_all noreply\r\n", b"get a\r\n", b"flush_all x\r\n", b"flush_all 1 2 3\r\n",
        b"set a 0 0 1\r\nx\r\n", b"flush_all -5\r\n", b"get a\r\n", b"set a 0 0 1\r\nx\r\n",
        b"flush_all 100\r\n", b"get a\r\n", b"flush_all x noreply\r\n", b"flush_all 0 noreply\r\n",
        b"add a 0 0 1\r\ny\r\n", b"get a\r\n",
    ],
    "misc_commands": [
        b"version\r\n", b"version 1 2 3 4\r\n", b"verbosity 1\r\n", b"verbosity 1 2\r\n",
        b"verbosity 1 2 3\r\n", b"verbosity\r\n", b"verbosity x\r\n", b"verbosity -1\r\n",
        b"verbosity noreply\r\n", b"verbosity 5 noreply\r\n", b"stats bogus\r\n",
        b"stats detail\r\n", b"stats reset\r\n", b"shutdown\r\n", b"shutdown graceful\r\n",
        b"shutdown now please\r\n", b"cache_memlimit 256\r\n", b"cache_memlimit\r\n",
        b"bget\r\n",
    ],
    "unknown_and_case": [
        b"\r\n", b"\n", b"x\r\n", b" \r\n", b"\r\r\n", b"GET a\r\n", b"Set a 0 0 1\r\nx\r\n",
        b"DELETE a\r\n", b"gett a\r\n", b"mx\r\n", b"set a 0 0 1\r\nx\r\n", b"get A\r\n",
        b"bget a\r\n",
    ],
    "tokenizing": [
        b"   set   a   1   0   1   \r\nx\r\n", b"get    a   \r\n", b"set a\tb 0 0 1\r\ny\r\n",
        b"get a\tb\r\n", b"get a\x00 zzz\r\n", b"set n\x00ul 0 0 1\r\nz\r\n", b"get n\r\n",
        b"set c 0 0 1\x00 junk\r\nq\r\n", b"get c\r\n", b"set r\rs 0 0 1\r\nr\r\n", b"get r\rs\r\n",
        b"set \x01\x7f\xc3\xa9 0 0 1\r\nu\r\n", b"get \x01\x7f\xc3\xa9\r\n",
    ],
    "token_counts": [
        b"set a 0 0 1 x\r\ny\r\n", b"set a 0 0 1 x y\r\nz\r\n", b"set a 0 0\r\nz\r\n",
        b"set a\r\n", b"get a\r\n", b"set " + b"t " * 30 + b"\r\n",
        b"get " + b"a " * 40 + b"\r\n", b"add a 0 0\r\n", b"append a 0 0 1 2 3\r\n",
    ],
    "keys_250_251": [
        b"set " + K250 + b" 0 0 1\r\n1\r\n", b"get " + K250 + b"\r\n",
        b"incr " + K250 + b" 4\r\n", b"set " + K251 + b" 0 0 1\r\n1\r\n",
        b"add " + K251 + b" 0 0 1\r\n1\r\n", b"get " + K251 + b"\r\n",
        b"gets a " + K251 + b" " + K250 + b"\r\n", b"get " + K250 + b" " + K251 + b"\r\n",
        b"delete " + K251 + b"\r\n", b"incr " + K251 + b" 1\r\n", b"touch " + K251 + b" 1\r\n",
        b"delete " + K251 + b" noreply\r\n", b"set " + K251 + b" 0 0 1 noreply\r\n1\r\n",
        b"delete " + K250 + b"\r\n",
    ],
    "flags_parsing": [
        b"set a +5 0 1\r\nx\r\n", b"get a\r\n", b"set a 007 0 1\r\nx\r\n", b"get a\r\n",
        b"set a -0 0 1\r\nx\r\n", b"get a\r\n", b"set a 4294967296 0 1\r\nx\r\n", b"get a\r\n",
        b"set a 18446744073709551615 0 1\r\nx\r\n", b"get a\r\n",
        b"set a 9223372036854775808 0 1\r\nx\r\n", b"get a\r\n",
        b"set a 18446744073709551616 0 1\r\nx\r\n", b"set a -1 0 1\r\nx\r\n",
        b"set a 0x10 0 1\r\nx\r\n", b"set a 1e3 0 1\r\nx\r\n", b"set a 1.5 0 1\r\nx\r\n",
        b"set a  0 1\r\nx\r\n", b"get a\r\n",
    ],
    "exptime_parsing": [
        b"set a 0 -1 1\r\nx\r\n", b"get a\r\n", b"set a 0 2592001 1\r\nx\r\n", b"get a\r\n",
        b"set a 0 2147483648 1\r\nx\r\n", b"get a\r\n", b"set a 0 4294967296 1\r\nx\r\n",
        b"get a\r\n", b"set b 0 +100 1\r\nx\r\n", b"set c 0 007 1\r\nx\r\n",
        b"set d 0 -0 1\r\nx\r\n", b"get b c d\r\n", b"set a 0 9223372036854775807 1\r\nx\r\n",
        b"get a\r\n", b"set a 0 9223372036854775808 1\r\nx\r\n", b"set a 0 1x 1\r\nx\r\n",
        b"set a 0 0x1 1\r\nx\r\n",
    ],
    "length_parsing": [
        b"set a 0 0 4294967297\r\nx\r\n", b"get a\r\n", b"set a 0 0 +1\r\nx\r\n",
        b"set a 0 0 01\r\nx\r\n", b"set a 0 0 -0\r\n\r\n", b"get a\r\n",
        b"set a 0 0 -1\r\nx\r\n", b"set a 0 0 2147483646\r\nx\r\n",
        b"set a 0 0 2147483647\r\nx\r\n", b"set a 0 0 9223372036854775807\r\nx\r\n",
        b"set a 0 0 9223372036854775808\r\nx\r\n", b"set a 0 0 1.0\r\nx\r\n", b"get a\r\n",
    ],
    "bad_data_chunks": [
        b"set a 0 0 1\r\nold\r\n", b"set a 0 0 1\r\nx\r\n", b"set a 0 0 3\r\nabcdefg\r\n",
        b"get a\r\n", b"set a 0 0 3\r\nab\r\nget a\r\n", b"set a 0 0 1\nx\nget a\n",
        b"set a 0 0 2\r\nab\n\r\n", b"set a 0 0 2\r\nabc\r\n", b"add b 0 0 1\r\nxx\r\n",
        b"get a b\r\n", b"set a 0 0 1 noreply\r\nxyz\r\n", b"set a 0 0 3 noreply\r\nabcde",
        b"get a\r\n",
    ],
    "too_large": [
        b"set big 0 0 1\r\nx\r\n", b"add big 0 0 %d\r\n%s\r\n" % (BIG + 1, b"a" * (BIG + 1)),
        b"replace big 0 0 %d\r\n%s\r\n" % (BIG + 1, b"a" * (BIG + 1)), b"get big\r\n",
        b"set big 0 0 %d\r\n%s\r\nget big\r\n" % (BIG + 1, b"a" * (BIG + 1)),
        b"set big 1 0 %d\r\n%s\r\n" % (BIG - 3, b"b" * (BIG - 3)),
        b"set big 0 0 %d noreply\r\n%s\r\n" % (BIG + 1, b"a" * (BIG + 1)), b"get big\r\n",
        b"set big 0 0 %d\r\n%s\r\n" % (BIG, b"c" * BIG), b"append big 0 0 1\r\nd\r\n",
        b"prepend big 0 0 1\r\nd\r\n", b"cas big 0 0 %d 1\r\n%s\r\n" % (BIG + 1, b"e" * (BIG + 1)),
    ],
    "noreply_everywhere": [
        b"set a 1 0 1 noreply\r\na\r\n", b"add a 0 0 1 noreply\r\nb\r\n",
        b"replace a 2 0 1 noreply\r\nc\r\n", b"append a 0 0 1 noreply\r\nd\r\n",
        b"prepend a 0 0 1 noreply\r\ne\r\n", b"get a\r\n", b"set n 0 0 1 noreply\r\n5\r\n",
        b"incr n 3 noreply\r\n", b"decr n 1 noreply\r\n", b"incr nope 1 noreply\r\n",
        b"incr n x noreply\r\n", b"touch a 0 noreply\r\n", b"touch a x noreply\r\n",
        b"set a 0x1 0 1 noreply\r\nx\r\n", b"set a 0 0 1 NOREPLY\r\nx\r\n",
        b"set a 0 0 1 noreply \r\ny\r\n", b"get a n noreply\r\n", b"gets noreply\r\n",
    ],
    "bare_newlines": [
        b"set a 0 0 2\nhi\r\n", b"get a\n", b"gets a\n", b"append a 0 0 1\n!\r\n", b"get a\n",
        b"delete a\n", b"version\n", b"bogus\n", b"set a 0 0 2\r\nhi\n\n",
    ],
    "pipelined_mix": [
        b"set a 1 0 3\r\nabc\r\nset b 0 0 1\r\n5\r\nget a b\r\nincr b 10\r\nappend a 0 0 1\r\nd\r\n"
        b"delete a\r\nget a\r\nbogus\r\nadd b 0 0 1\r\nx\r\ntouch b 0\r\ndecr b 100\r\n"
        b"gets b\r\nverbosity 1\r\nflush_all\r\nget b\r\n",
    ],
    "expired_items_are_invisible": [
        b"set a 0 -1 1\r\nx\r\n", b"get a\r\n", b"add a 0 0 1\r\ny\r\n", b"get a\r\n",
        b"set b 0 -1 1\r\nx\r\n", b"replace b 0 0 1\r\ny\r\n", b"append b 0 0 1\r\ny\r\n",
        b"prepend b 0 0 1\r\ny\r\n", b"incr b 1\r\n", b"touch b 0\r\n", b"delete b\r\n",
        b"gets b\r\n", b"gat 0 b\r\n", b"cas b 0 0 1 1\r\ny\r\n",
    ],
    "flushed_items_are_invisible": [
        b"set a 0 0 1\r\n1\r\nset b 0 0 1\r\n2\r\n", b"flush_all\r\n", b"get a b\r\n",
        b"replace a 0 0 1\r\ny\r\n", b"incr b 1\r\n", b"touch a 0\r\n", b"delete b\r\n",
        b"add a 0 0 1\r\ny\r\n", b"get a b\r\n",
    ],
    "multiget_repeats": [
        b"set a 1 0 1\r\nx\r\nset b 2 0 2\r\nyy\r\n",
        b"get b a nope b a " + b" ".join(b"m%d" % i for i in range(40)) + b" a\r\n",
        b"gets a b a\r\n", b"bget a b\r\n",
    ],
    "long_lines_arriving_whole": [
        b"set a 0 0 1\r\nx\r\n", b"get " + b"x " * 1500 + b"a\r\n", b"foo" + b" x" * 1500 + b"\r\n",
        b"version" + b" " * 3000 + b"\r\n",
    ],
    "long_get_in_pieces": [
        b"set key0007 0 0 1\r\n7\r\n", Partial(b"get " + LONG_KEYS), b"\r\n",
        Partial(b"gets " + LONG_KEYS), b"\r\n",
        Partial(b" " * 50 + b"get " + LONG_KEYS), b"\r\n",
    ],
    "long_line_without_newline_closes": [Close(b"set " + b"k" * 2100)],
    "long_gat_in_pieces_closes": [Close(b"gat 0 " + LONG_KEYS)],
    "long_get_after_many_spaces_closes": [Close(b" " * 150 + b"get " + LONG_KEYS)],
    "get_of_http_token": [b"get HTTP/1.1\r\n"],
    "numbers_past_any_int": [
        b"set k 0 0 " + DIGITS + b"\r\n", b"set k " + DIGITS + b" 0 1\r\nx\r\n",
        b"set k 0 " + DIGITS + b" 1\r\nx\r\n", b"set k 0 0 1\r\nx\r\n", b"touch k " + DIGITS + b"\r\n",
        b"incr k " + DIGITS + b"\r\n", b"gat " + DIGITS + b" k\r\n", b"verbosity " + DIGITS + b"\r\n",
        b"set n 0 0 %d\r\n%s\r\n" % (len(DIGITS), DIGITS), b"incr n 1\r\n", b"decr n 1\r\n",
        b"set z 0 0 %d\r\n%s\r\n" % (len(ZEROS), ZEROS), b"incr z " + ZEROS + b"\r\n", b"get z\r\n",
    ],
    "quit_closes": [b"set a 0 0 1\r\nx\r\n", Close(b"get a\r\nquit\r\nget a\r\n")],
    "quit_with_args_closes": [Close(b"quit now please\r\n")],
}


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_same_replies_as_memcached(name, memcached, server):
    steps = SCRIPTS[name]
    want = run_script(memcached, steps)
    got = run_script(server, steps)
    replies = [s for s in steps if not isinstance(s, Partial)]
    for step, w, g in zip(replies, want, got):
        assert g == w, "step %r\n  memcached: %r\n  server:    %r" % (step[:200], w[:500], g[:500])
    assert len(got) == len(want)
