"""The codec without sockets: framing requests (split at every byte offset), the
command table, replies."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import memtool  # noqa: E402

REQUESTS = [
    b"get a\r\n", b"get a b c\n", b"gets  k1 k2\r\n", b"gat 10 a b\r\n",
    b"set k 1 2 5\r\nhello\r\n", b"set k 0 0 5 noreply\r\nhe\r\nl\r\n",
    b"cas k 0 0 3 99\r\nabc\r\n", b"append k 0 0 0\r\n\r\n",
    b"set k 0 0 abc\r\n",                    # bad length: no data block follows
    b"set " + b"k" * 251 + b" 0 0 1\r\n",    # key too long: no data block either
    b"incr n 5\r\n", b"delete k noreply\r\n", b"touch k 100\r\n",
    b"mg k v c t\r\n", b"ms k 3 T10 F5\r\nxyz\r\n", b"ms k 2 Zbad\r\nab\r\n",
    b"ms k\r\n", b"md k q\r\n", b"ma n D3\r\n", b"mn\r\n", b"me k\r\n",
    b"flush_all 10\r\n", b"version\r\n", b"stats\r\n", b"bogus cmd\r\n", b"\r\n",
    b"set k 0 0 4\r\n\r\n\r\n\r\n", b"get a\x00junk\r\n",
]


def frame_all(buf):
    """Frame every complete request in buf: [(name, tokens, block)], offset of the rest."""
    out, pos = [], 0
    while pos < len(buf):
        framed = memtool.frame_request(buf, pos)
        if framed is None:
            break
        spec, tokens, start, end, args = framed
        if end > len(buf):
            break
        out.append((spec and spec.name, tokens, buf[start:end]))
        pos = end
    return out, pos


def test_every_request_framed_alone():
    for request in REQUESTS:
        framed, rest = frame_all(request)
        assert rest == len(request), request
        assert len(framed) == 1, (request, framed)


def test_pipelined_requests_split_at_every_offset():
    """Feeding the pipelined stream in two pieces, cut anywhere, frames the same requests."""
    stream = b"".join(REQUESTS)
    whole, rest = frame_all(stream)
    assert rest == len(stream) and len(whole) == len(REQUESTS)
    for cut in range(len(stream) + 1):
        first, pos = frame_all(stream[:cut])
        second, rest = frame_all(stream[pos:])
        assert first + second == whole, cut
        assert pos + rest == len(stream)


def test_data_blocks_follow_only_valid_lengths():
    framed, _ = frame_all(b"set k 0 0 abc\r\nget a\r\n")
    assert [name for name, _, _ in framed] == [b"set", b"get"]
    framed, _ = frame_all(b"ms k 2 Zbad\r\nab\r\n")      # a bad flag still has its block
    assert framed == [(b"ms", [b"ms", b"k", b"2", b"Zbad"], b"ab\r\n")]
    spec, tokens, start, end, args = memtool.frame_request(b"set k 7 0 100\r\nabc", 0)
    assert (spec.name, args, end - start) == (b"set", (b"k", 7, 0, 100, 0), 102)


def test_long_lines():
    long_get = b"get " + b"k " * 3000
    assert memtool.frame_request(long_get, 0) is None        # a multiget may be long
    with pytest.raises(memtool.Disconnect):
        memtool.frame_request(b"set " + b"x" * 3000, 0)
    spec = memtool.frame_request(b"GET /" + b"q" * 3000, 0)[0]
    assert spec is memtool.HTTP_REQUEST
    assert memtool.frame_request(b"GET /k HTTP/1.1\r\n", 0)[0] is memtool.HTTP_REQUEST


def test_command_table():
    table = memtool.COMMANDS
    assert table[b"get"].route == memtool.ROUTE_KEYS and table[b"gat"].key == 2
    assert table[b"set"].block == memtool.BLOCK_STORAGE and table[b"set"].writes
    assert table[b"ms"].block == memtool.BLOCK_META and table[b"ms"].reply == memtool.REPLY_META
    assert table[b"flush_all"].route == memtool.ROUTE_ALL
    assert table[b"version"].route == memtool.ROUTE_LOCAL


@pytest.mark.parametrize("reply,expect,result", [
    (b"STORED\r\n", memtool.REPLY_LINE, (8, b"STORED", [])),
    (b"VALUE a 5 2\r\nhi\r\nEND\r\n", memtool.REPLY_VALUES, (22, b"END", [(b"a", 5, b"hi", 0, 17)])),
    (b"VA 2 kx\r\nhi\r\n", memtool.REPLY_META, (13, b"VA", [(b"x", 0, b"hi", 0, 13)])),
    (b"SERVER_ERROR out of space\r\n", memtool.REPLY_VALUES,
     (27, b"SERVER_ERROR out of space", [])),
])
def test_read_reply_at_every_cut(reply, expect, result):
    for cut in range(len(reply)):
        assert memtool.read_reply(reply[:cut], 0, expect) is None
    assert memtool.read_reply(reply, 0, expect) == result
