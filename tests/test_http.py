"""memtool's HTTP interface on the memcached port, exact bytes (contract: issue 3, http.md).

Raw-socket tests assert status lines, header order and bodies byte for byte; the
curl tests check that a real client gets along with the server.
"""
import base64
import json
import os
import re
import shutil
import socket
import subprocess
import time

import pytest

from support import max_value_len, wait_for

pytestmark = pytest.mark.memtool_only

CURL = shutil.which("curl")
REASONS = {100: b"Continue", 200: b"OK", 201: b"Created", 400: b"Bad Request",
           403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed", 409: b"Conflict",
           412: b"Precondition Failed", 413: b"Payload Too Large",
           431: b"Request Header Fields Too Large", 501: b"Not Implemented",
           505: b"HTTP Version Not Supported"}
CLOSE = b"Connection: close\r\n"
ALLOW_ALL = b"Allow: GET, HEAD, PUT, POST, DELETE\r\n"
ALLOW_ROOT = b"Allow: GET, HEAD\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CREATED_RE = re.compile(rb'HTTP/1\.1 201 Created\r\nContent-Type: text/plain\r\n'
                        rb'Content-Length: 8\r\nETag: "(\d+)"\r\n\r\nCreated\n')
ITEM_RE = re.compile(rb'HTTP/1\.1 200 OK\r\nContent-Type: application/octet-stream\r\n'
                     rb'Content-Length: (\d+)\r\nX-Memtool-Flags: (\d+)\r\n'
                     rb'X-Memtool-Exptime: (\d+)\r\nETag: "(\d+)"\r\n\r\n(.*)', re.S)
BAD_RE = re.compile(rb"HTTP/1\.1 400 Bad Request\r\nContent-Type: text/plain\r\n"
                    rb"Content-Length: (\d+)\r\n(Connection: close\r\n)?\r\n"
                    rb"(Bad Request: [^\n]*\n)")
STATS_RE = re.compile(rb"HTTP/1\.1 200 OK\r\nContent-Type: application/json\r\n"
                      rb"Content-Length: (\d+)\r\n\r\n")


# --------------------------------------------------------------------------- helpers

def req(method, target, body=None, headers=(), version=b"HTTP/1.1"):
    """Request bytes; a body gets a Content-Length header."""
    lines = [b"%s %s %s" % (method, target, version), b"Host: localhost", *headers]
    if body is not None:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def reply(code, headers=b"", body=None, ctype=b"text/plain", head=False):
    """Exact reply bytes; the default body is '<reason>\\n'."""
    body = REASONS[code] + b"\n" if body is None else body
    return (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n%s"
            % (code, REASONS[code], ctype, len(body), headers, b"" if head else body))


def item(value, cas, flags=0, exptime=0, head=False, headers=b""):
    """Exact 200 reply for an item."""
    meta = b'X-Memtool-Flags: %d\r\nX-Memtool-Exptime: %d\r\nETag: "%d"\r\n' % (flags, exptime, cas)
    return reply(200, meta + headers, value, b"application/octet-stream", head)


def read_reply(s, head=False):
    """The raw bytes of one reply: the head, then Content-Length body bytes (none for HEAD)."""
    raw = s.read_until(b"\r\n\r\n")
    m = re.search(rb"\r\nContent-Length: (\d+)\r\n", raw)
    return raw + (s.recv_exact(int(m.group(1))) if m and not head else b"")


def hang_up(s):
    """Close our side, as a client does after `Connection: close`; the server follows."""
    s.sock.shutdown(socket.SHUT_WR)
    s.expect_closed()


def call(s, request, head=False):
    s.send(request)
    return read_reply(s, head)


def put(s, key, value, headers=(), method=b"PUT"):
    """PUT/POST a value, assert the exact 201 and return its ETag."""
    raw = call(s, req(method, b"/" + key, value, headers))
    m = CREATED_RE.fullmatch(raw)
    assert m, "expected 201 Created, got %r" % raw
    return int(m.group(1))


def get_item(s, key):
    """(flags, exptime, cas, value) from a GET that must answer 200."""
    raw = call(s, req(b"GET", b"/" + key))
    m = ITEM_RE.fullmatch(raw)
    assert m and int(m.group(1)) == len(m.group(5)), "expected 200 item, got %r" % raw
    return int(m.group(2)), int(m.group(3)), int(m.group(4)), m.group(5)


def honours_connection_header(s, raw):
    """After a reply the spec does not say closes: with Connection: close the server must
    close, without it the connection must serve the next request."""
    if CLOSE in raw[:raw.index(b"\r\n\r\n") + 2]:
        s.expect_closed()
    else:
        s.call(req(b"GET", b"/never-stored"), reply(404))


def expect_400(s, must_close=None):
    """Read a 400 'Bad Request: <detail>' reply; must_close None where the spec is silent."""
    raw = read_reply(s)
    m = BAD_RE.fullmatch(raw)
    assert m and int(m.group(1)) == len(m.group(3)), "expected 400, got %r" % raw
    if must_close:
        assert m.group(2), "no Connection: close in %r" % raw
        s.expect_closed()
    else:
        honours_connection_header(s, raw)


def alive(server, key, value):
    """The server still accepts a fresh connection and still has key=value."""
    assert server.running, server.log_tail()
    with server.session() as s:
        assert s.get(key) == value


@pytest.fixture
def http(server):
    """A raw session used for HTTP only."""
    s = server.session()
    yield s
    s.close()


@pytest.fixture
def text(session):
    """The conftest session, named for its use here: the memcached text protocol."""
    return session


# --------------------------------------------------------------------------- methods

def test_put_get_head_delete_round_trip(http, kp):
    """PUT -> 201 with ETag, GET/HEAD -> the item (HEAD without body), DELETE -> 200, then 404s."""
    k, v = kp + b"k", b"bin\x00\r\nary\xff"
    cas = put(http, k, v)
    http.call(req(b"GET", b"/" + k), item(v, cas))
    http.call(req(b"HEAD", b"/" + k), item(v, cas, head=True))
    http.call(req(b"DELETE", b"/" + k), reply(200))
    http.call(req(b"GET", b"/" + k), reply(404))
    http.call(req(b"HEAD", b"/" + k), reply(404, head=True))
    http.call(req(b"DELETE", b"/" + k), reply(404))
    http.call(req(b"GET", b"/" + kp + b"never"), reply(404))


def test_post_is_put_and_empty_body(http, kp):
    """POST stores like PUT (and overwrites); a PUT with no body stores an empty value."""
    k = kp + b"k"
    put(http, k, b"one", method=b"POST")
    cas = put(http, k, b"two", method=b"POST")
    http.call(req(b"GET", b"/" + k), item(b"two", cas))
    cas = put(http, k, None)
    http.call(req(b"GET", b"/" + k), item(b"", cas))


def test_expired_items_are_404(http, text, kp):
    """Exptime -1 stores an already expired item; a 1 s TTL item disappears within seconds."""
    put(http, kp + b"neg", b"x", [b"X-Memtool-Exptime: -1"])
    http.call(req(b"GET", b"/" + kp + b"neg"), reply(404))
    put(http, kp + b"ttl", b"x", [b"X-Memtool-Exptime: 1"])
    wait_for(lambda: call(http, req(b"GET", b"/" + kp + b"ttl")) == reply(404), 5,
             interval=0.1, what="1 s TTL item to expire")
    http.call(req(b"HEAD", b"/" + kp + b"ttl"), reply(404, head=True))
    assert text.get(kp + b"ttl") is None


def test_flags_and_exptime_round_trip(http, text, kp):
    """Flags come back as sent; exptime comes back as absolute unix time (0 = never),
    so copying the header value into a new PUT keeps the expiry."""
    k = kp + b"k"
    cas = put(http, k, b"v", [b"X-Memtool-Flags: 4294967295"])
    http.call(req(b"GET", b"/" + k), item(b"v", cas, 4294967295, 0))
    before = int(time.time())
    put(http, k, b"v", [b"X-Memtool-Flags: 7", b"X-Memtool-Exptime: 100"])
    flags, exptime, _, _ = get_item(http, k)
    assert flags == 7 and before + 99 <= exptime <= int(time.time()) + 101, exptime
    cas = put(http, k, b"copy", [b"X-Memtool-Exptime: %d" % exptime])
    http.call(req(b"GET", b"/" + k), item(b"copy", cas, 0, exptime))
    absolute = int(time.time()) + 40 * 86400
    cas = put(http, k, b"abs", [b"X-Memtool-Exptime: %d" % absolute])
    http.call(req(b"HEAD", b"/" + k), item(b"abs", cas, 0, absolute, head=True))
    assert text.get_items([k])[k][:2] == (0, b"abs")


def test_etag_is_the_cas_unique(http, text, kp):
    """The 201 ETag and the GET ETag equal the cas unique `gets` shows, both ways."""
    k = kp + b"k"
    cas = put(http, k, b"a")
    assert text.gets_cas(k) == cas
    text.set(k, b"b")
    cas2 = text.gets_cas(k)
    assert cas2 != cas
    http.call(req(b"GET", b"/" + k), item(b"b", cas2))


def test_if_match_on_put(http, kp):
    """If-Match acts as cas: current tag, a list holding it, unquoted digits and `*` on an
    existing item store; stale, weak and any tag on an absent item -> 412, value untouched."""
    k = kp + b"k"
    cas = put(http, k, b"v1")
    cas = put(http, k, b"v2", [b'If-Match: "%d"' % cas])
    http.call(req(b"PUT", b"/" + k, b"no", [b'If-Match: "%d"' % (cas + 1000)]), reply(412))
    http.call(req(b"PUT", b"/" + k, b"no", [b'If-Match: W/"%d"' % cas]), reply(412))
    http.call(req(b"GET", b"/" + k), item(b"v2", cas))
    cas = put(http, k, b"v3", [b'If-Match: "1", "%d"' % cas])
    cas = put(http, k, b"v4", [b"If-Match: %d" % cas])
    cas = put(http, k, b"v5", [b"If-Match: *"])
    http.call(req(b"GET", b"/" + k), item(b"v5", cas))
    for tag in (b"*", b'"%d"' % cas):
        http.call(req(b"PUT", b"/" + kp + b"absent", b"x", [b"If-Match: " + tag]), reply(412))
    http.call(req(b"GET", b"/" + kp + b"absent"), reply(404))


def test_if_match_on_delete(http, kp):
    """DELETE with a stale tag or `*` on an absent key -> 412; with the current tag -> 200."""
    k = kp + b"k"
    cas = put(http, k, b"v")
    http.call(req(b"DELETE", b"/" + k, headers=[b'If-Match: "%d"' % (cas + 1)]), reply(412))
    http.call(req(b"GET", b"/" + k), item(b"v", cas))
    http.call(req(b"DELETE", b"/" + k, headers=[b'If-Match: "%d"' % cas]), reply(200))
    http.call(req(b"DELETE", b"/" + k, headers=[b"If-Match: *"]), reply(412))


def test_pdmode_keep(http, kp):
    """X-TT-PDMODE: 1 creates an absent key and answers 409 for an existing one."""
    k = kp + b"k"
    cas = put(http, k, b"first", [b"X-TT-PDMODE: 1"])
    http.call(req(b"PUT", b"/" + k, b"second", [b"X-TT-PDMODE: 1"]), reply(409))
    http.call(req(b"GET", b"/" + k), item(b"first", cas))


def test_pdmode_concat(http, kp):
    """X-TT-PDMODE: 2 creates when absent, appends when present keeping flags and expiry;
    X-TT-PDMODE: 0 is a plain set."""
    k = kp + b"k"
    cas = put(http, k, b"a", [b"X-TT-PDMODE: 2"])
    http.call(req(b"GET", b"/" + k), item(b"a", cas))
    put(http, k, b"base", [b"X-Memtool-Flags: 5", b"X-Memtool-Exptime: 1000"])
    _, exptime, _, _ = get_item(http, k)
    cas = put(http, k, b"+tail", [b"X-TT-PDMODE: 2", b"X-Memtool-Flags: 9",
                                  b"X-Memtool-Exptime: -1"])
    http.call(req(b"GET", b"/" + k), item(b"base+tail", cas, 5, exptime))
    cas = put(http, k, b"plain", [b"X-TT-PDMODE: 0"])
    http.call(req(b"GET", b"/" + k), item(b"plain", cas))


def test_pdmode_concat_over_limit_keeps_value(server, kp):
    """A concat whose result would pass -I (each part fits) is refused with 413 and the
    stored value is left as it was."""
    k, old = kp + b"k", b"a" * 600000
    with server.session() as s:
        put(s, k, old)
        raw = call(s, req(b"PUT", b"/" + k, b"b" * 600000, [b"X-TT-PDMODE: 2"]))
        assert raw.startswith(b"HTTP/1.1 413 Payload Too Large\r\n"), raw[:200]
    alive(server, k, old)


@pytest.mark.parametrize("header", [
    b"X-Memtool-Flags: abc", b"X-Memtool-Flags: -1", b"X-Memtool-Flags: 4294967296",
    b"X-Memtool-Flags: ", b"X-Memtool-Exptime: soon", b"X-Memtool-Exptime: 1.5",
    b"X-Memtool-Exptime: 2147483648", b"X-TT-PDMODE: 3", b"X-TT-PDMODE: keep"])
def test_bad_header_value_is_400(server, kp, header):
    """A bad flags/exptime/pdmode value -> 400, nothing stored, connection sane afterwards."""
    k = kp + b"k"
    with server.session() as s:
        s.send(req(b"PUT", b"/" + k, b"value", [header]))
        expect_400(s)
    with server.session() as s:
        s.call(req(b"GET", b"/" + k), reply(404))


# --------------------------------------------------------------------------- connections

def test_keep_alive_sequential(http, kp):
    """HTTP/1.1 keeps the connection open across requests without any Connection header."""
    k = kp + b"k"
    for i in range(5):
        cas = put(http, k, b"v%d" % i)
        http.call(req(b"GET", b"/" + k), item(b"v%d" % i, cas))


def test_pipelined_requests_answered_in_order(http, text, kp):
    """Seven requests in one write, HEAD and a 405 among them, answered in order."""
    a, b = kp + b"a", kp + b"b"
    http.send(req(b"PUT", b"/" + a, b"AAA") + req(b"POST", b"/" + b, b"BB")
              + req(b"GET", b"/" + a) + req(b"HEAD", b"/" + b)
              + req(b"OPTIONS", b"/" + a, b"junk")
              + req(b"DELETE", b"/" + a) + req(b"GET", b"/" + a) + req(b"GET", b"/" + b))
    cas_a = int(CREATED_RE.fullmatch(read_reply(http)).group(1))
    cas_b = int(CREATED_RE.fullmatch(read_reply(http)).group(1))
    http.expect(item(b"AAA", cas_a) + item(b"BB", cas_b, head=True) + reply(405, ALLOW_ALL)
                + reply(200) + reply(404) + item(b"BB", cas_b))
    assert text.get(a) is None and text.get(b) == b"BB"


def test_http10_closes_after_reply(http, kp):
    """An HTTP/1.0 request is answered (status line still HTTP/1.1) and then closed."""
    http.send(req(b"GET", b"/" + kp + b"k", version=b"HTTP/1.0"))
    http.expect(reply(404, CLOSE))
    http.expect_closed()


def test_http10_keep_alive(http, kp):
    """HTTP/1.0 with Connection: keep-alive stays open and says so in each reply."""
    k, ka = kp + b"k", [b"Connection: keep-alive"]
    http.call(req(b"GET", b"/" + k, headers=ka, version=b"HTTP/1.0"),
              reply(404, b"Connection: keep-alive\r\n"))
    raw = call(http, req(b"PUT", b"/" + k, b"v", ka, version=b"HTTP/1.0"))
    m = re.fullmatch(rb'HTTP/1\.1 201 Created\r\nContent-Type: text/plain\r\nContent-Length: 8\r\n'
                     rb'ETag: "(\d+)"\r\nConnection: keep-alive\r\n\r\nCreated\n', raw)
    assert m, raw
    http.call(req(b"GET", b"/" + k), item(b"v", int(m.group(1))))


def test_connection_close_on_http11(http, kp):
    """HTTP/1.1 with Connection: close gets Connection: close and then EOF."""
    http.send(req(b"GET", b"/" + kp + b"k", headers=[b"Connection: close"]))
    http.expect(reply(404, CLOSE))
    http.expect_closed()


def test_text_protocol_then_http_on_one_connection(http, kp):
    """Memcached commands first, then HTTP; after that the connection speaks only HTTP."""
    k = kp + b"k"
    http.set(k, b"hello", flags=3)
    cas = http.gets_cas(k)
    http.call(req(b"GET", b"/" + k), item(b"hello", cas, 3))
    http.send(b"get %s\r\n\r\n" % k)
    expect_400(http, must_close=True)


def test_bare_lf_line_endings(http, kp):
    """Request lines and headers may end in bare LF; replies still use CRLF."""
    k = kp + b"k"
    http.send(b"PUT /%s HTTP/1.1\nHost: localhost\nContent-Length: 2\n\nhi" % k)
    cas = int(CREATED_RE.fullmatch(read_reply(http)).group(1))
    http.call(b"GET /%s HTTP/1.1\n\n" % k, item(b"hi", cas))


# --------------------------------------------------------------------------- bodies

def test_chunked_body_with_extension_and_trailer(http, kp):
    """A chunked body (extension, hex sizes, trailer) is stored whole; the connection goes on."""
    k = kp + b"k"
    http.send(b"PUT /%s HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"5;name=val\r\nhello\r\nB\r\n world, etc\r\n0\r\nX-Trailer: t\r\n\r\n" % k)
    cas = int(CREATED_RE.fullmatch(read_reply(http)).group(1))
    http.call(req(b"GET", b"/" + k), item(b"hello world, etc", cas))


def test_request_in_many_small_writes(http, kp):
    """A request dribbled in one byte per write, and one in 3-byte writes, are served."""
    k = kp + b"k"
    http.send_pieces(req(b"PUT", b"/" + k, b"split value", [b"X-Memtool-Flags: 2"]))
    cas = int(CREATED_RE.fullmatch(read_reply(http)).group(1))
    http.send_pieces(req(b"GET", b"/" + k), size=3)
    http.expect(item(b"split value", cas, 2))


def test_one_megabyte_body(server_factory, kp):
    """With -I 2m a 1 MB value goes in by Content-Length and by chunks, and comes back."""
    srv = server_factory(max_item_size="2m")
    k, v = kp + b"big", os.urandom(1 << 20)
    with srv.session() as s:
        cas = put(s, k, v)
        s.call(req(b"GET", b"/" + k), item(v, cas))
        s.send(b"PUT /%s HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" % k
               + b"".join(b"%x\r\n%s\r\n" % (1 << 16, v[i:i + (1 << 16)])
                          for i in range(0, len(v), 1 << 16)) + b"0\r\n\r\n")
        cas = int(CREATED_RE.fullmatch(read_reply(s)).group(1))
        assert get_item(s, k)[2:] == (cas, v)


def test_item_size_limit(server, kp):
    """A value exactly at the -I limit (value + key + 59, +4 with flags) is stored; one byte
    more -> 413 + close, decided from the header before any body byte is sent."""
    k = kp + b"k"
    limit = max_value_len(len(k), flags=1)
    with server.session() as s:
        cas = put(s, k, b"x" * limit, [b"X-Memtool-Flags: 1"])
        assert get_item(s, k)[2] == cas
    for headers, n in (([], max_value_len(len(k)) + 1), ([b"X-Memtool-Flags: 1"], limit + 1)):
        with server.session() as s:
            s.send(b"PUT /%s HTTP/1.1\r\nContent-Length: %d\r\n%s\r\n"
                   % (k, n, b"".join(h + b"\r\n" for h in headers)))
            s.expect(reply(413, CLOSE))
            hang_up(s)
    alive(server, k, b"x" * limit)


def test_413_reaches_a_client_still_uploading(server, kp):
    """A client that sends a 4 MB body without waiting (no Expect) still reads the 413:
    the server drops the upload instead of resetting the connection under it."""
    body = b"u" * (4 << 20)
    with server.session(timeout=20) as s:
        s.send(b"PUT /%sk HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (kp, len(body)) + body)
        s.expect(reply(413, CLOSE))
        hang_up(s)
    alive(server, kp + b"k", None)


def test_chunked_over_limit_is_413(server, kp):
    """A chunk size line that takes the body over -I -> 413 + close before its data is sent."""
    with server.session() as s:
        s.send(b"PUT /%sk HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n"
               % (kp, max_value_len(len(kp) + 1) + 1))
        s.expect(reply(413, CLOSE))
        hang_up(s)


def test_many_tiny_chunks_in_many_writes(http, kp):
    """50,000 one-byte chunks, sent in 64 KB writes, are decoded as they arrive
    (not re-parsed from the start on every read) and stored whole."""
    k = kp + b"tiny"
    data = bytes(range(256)) * 195 + b"!" * 80
    body = b"".join(b"1\r\n%s\r\n" % data[i:i + 1] for i in range(len(data))) + b"0\r\n\r\n"
    request = b"PUT /%s HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" % k + body
    for i in range(0, len(request), 65536):
        http.send(request[i:i + 65536])
    assert CREATED_RE.fullmatch(read_reply(http))
    assert ITEM_RE.fullmatch(call(http, req(b"GET", b"/" + k))).group(5) == data


@pytest.mark.parametrize("line,code", [(b"1;" + b"e" * 5000, 400), (b"1;" + b"e" * 1000, 413)],
                         ids=["one-long-size-line", "framing-past-allowance"])
def test_chunk_framing_is_bounded(server, kp, line, code):
    """A chunk size line over 4 KB is refused (400); extensions that pile up past twice
    -I of framing make the body too large (413). Either way the connection closes."""
    with server.session() as s:
        s.send(b"PUT /%sk HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" % kp)
        try:
            for _ in range(2200):
                s.send(line + b"\r\nX\r\n")
            s.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass   # the server closed while we were still sending (the 400 case)
        answer = s.read_to_eof()
    if code == 400:
        assert BAD_RE.match(answer) and CLOSE in answer, answer[:200]
    else:
        assert answer == reply(413, CLOSE), answer[:200]


def test_blank_lines_between_requests_are_dropped(http, kp):
    """16 MB of blank lines between two requests (allowed by RFC 9112 2.2) are skipped
    as they arrive, not kept and rescanned: the next request is answered at once."""
    http.call(req(b"GET", b"/" + kp + b"a"), reply(404))
    for _ in range(32):
        http.send(b"\r\n" * (1 << 18))
    http.call(req(b"GET", b"/" + kp + b"a"), reply(404))


def test_key_with_line_breaks_is_never_echoed_raw(http, text, kp):
    """An HTTP key holding CR LF stays base64 in meta echoes after an append changes
    the item (memcached would send such a key raw and break the reply stream)."""
    k = kp + b"x\r\nHD"
    target = b"/" + k.replace(b"\r", b"%0D").replace(b"\n", b"%0A")
    put(http, target[1:], b"1")
    put(http, target[1:], b"2", headers=[b"X-TT-PDMODE: 2"])
    b64 = base64.b64encode(k)
    text.call(b"mg %s b k v\r\n" % b64, b"VA 2 k%s b\r\n12\r\n" % b64)
    text.send(b"me %s b\r\n" % b64)
    assert text.read_line().startswith(b"ME %s exp=-1 " % b64)


def test_expect_100_continue(http, kp):
    """Expect: 100-continue gets the exact interim reply before the body is sent, then 201;
    when the length is already too large only the 413 comes, and the connection closes."""
    k = kp + b"k"
    http.send(b"PUT /%s HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n" % k)
    http.expect(CONTINUE)
    http.send(b"hello")
    cas = int(CREATED_RE.fullmatch(read_reply(http)).group(1))
    http.call(req(b"GET", b"/" + k), item(b"hello", cas))
    http.send(b"PUT /%s HTTP/1.1\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n" % k)
    http.expect(CONTINUE)
    http.send(b"3\r\nabc\r\n0\r\n\r\n")
    cas = int(CREATED_RE.fullmatch(read_reply(http)).group(1))
    http.call(req(b"GET", b"/" + k), item(b"abc", cas))
    http.send(b"PUT /%s HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
              % (k, 1 << 20))
    http.expect(reply(413, CLOSE))
    hang_up(http)


# --------------------------------------------------------------------------- errors

MALFORMED = [
    (b"GET /%s extra HTTP/1.1\r\n\r\n", 400),
    (b"GET HTTP/1.1\r\n\r\n", 400),
    (b"HTTP/1.1\r\n\r\n", 400),
    (b"GET /%s HTTP/2.0\r\n\r\n", 505),
    (b"GET /%s HTTP/1.1\r\nNoColonHere\r\n\r\n", 400),
    (b"GET /%s HTTP/1.1\r\nX-A: 1\r\n  folded\r\n\r\n", 400),
    (b"GET /%s HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
    (b"PUT /%s HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"3\r\nbad\r\n0\r\n\r\n", 400),
    (b"PUT /%s HTTP/1.1\r\nContent-Length: abc\r\n\r\nbad", 400),
    (b"PUT /%s HTTP/1.1\r\nContent-Length: -3\r\n\r\nbad", 400),
    (b"PUT /%s HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nbad\r\n0\r\n\r\n", 400),
    (b"PUT /%s HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
]


@pytest.mark.parametrize("template,code", MALFORMED,
                         ids=["extra-token", "no-target", "version-only",
                              "http2", "no-colon", "obs-fold", "431", "cl-and-chunked",
                              "cl-abc", "cl-negative", "chunk-size", "gzip"])
def test_malformed_request_closes_and_server_survives(server, kp, template, code):
    """Each malformed request -> its error + Connection: close + EOF; the server keeps
    serving new connections and the item the request aimed at is unchanged."""
    k = kp + b"keep"
    with server.session() as s:
        s.set(k, b"safe")
    with server.session() as s:
        s.send(template.replace(b"%s", k))
        if code == 400:
            expect_400(s, must_close=True)
        else:
            s.expect(reply(code, CLOSE))
            s.expect_closed()
    alive(server, k, b"safe")


def test_bad_request_line_is_400_before_the_headers_end(server):
    """A request line that cannot be HTTP is refused as soon as it is complete."""
    with server.session() as s:
        s.send(b"DELETE HTTP/1.1\r\n")                     # no blank line: headers may follow
        expect_400(s, must_close=True)


# --------------------------------------------------------------------------- exposure

def test_foreign_origin_is_403_and_stores_nothing(http, text, kp):
    """A web page's cross-origin POST (no preflight needed for text/plain) is refused."""
    k = kp + b"o"
    http.send(req(b"POST", b"/" + k, b"evil", [b"Origin: https://evil.example",
                                               b"Content-Type: text/plain"]))
    http.expect(reply(403, CLOSE, b"Forbidden: Origin not allowed (--http-allow-origin)\n"))
    http.expect_closed()
    assert text.get(k) is None


@pytest.mark.parametrize("host", [b"evil.example", b"evil.example:11211", b"10.1.2.3"])
def test_foreign_host_on_loopback_is_403(http, text, kp, host):
    """DNS rebinding: a name that resolves to 127.0.0.1 but is not ours."""
    k = kp + b"h"
    text.set(k, b"secret")
    http.send(b"GET /%s HTTP/1.1\r\nHost: %s\r\n\r\n" % (k, host))
    http.expect(reply(403, CLOSE, b"Forbidden: Host not allowed (--http-host)\n"))
    http.expect_closed()
    assert text.get(k) == b"secret"


@pytest.mark.parametrize("host", [b"localhost", b"127.0.0.1", b"LOCALHOST:1"])
def test_own_host_names_are_served(http, text, kp, host):
    k = kp + b"ok"
    text.set(k, b"v")
    http.send(b"GET /%s HTTP/1.1\r\nHost: %s\r\n\r\n" % (k, host))
    assert ITEM_RE.fullmatch(read_reply(http)).group(5) == b"v"


def test_http_options(server_factory, kp):
    """--http-host and --http-allow-origin admit what they name; --no-http closes."""
    srv = server_factory(extra=["--http-host", "cache.internal",
                                "--http-allow-origin", "https://app.example"])
    with srv.session() as s:
        s.send(req(b"PUT", b"/" + kp, b"v", [b"Origin: https://app.example"]))
        assert CREATED_RE.fullmatch(read_reply(s))
        s.send(b"GET /%s HTTP/1.1\r\nHost: cache.internal:80\r\n\r\n" % kp)
        assert ITEM_RE.fullmatch(read_reply(s))
    off = server_factory(extra=["--no-http"])
    with off.session() as s:
        s.call(b"set %s 0 0 1\r\nx\r\n" % kp, b"STORED\r\n")
        s.send(b"GET /%s HTTP/1.1\r\n\r\n" % kp)      # memcached closes too, silently
        s.expect_closed()


def test_later_http1_minor_version_is_served_as_1_1(http, kp):
    """RFC 9110 2.5: a 1.x request with a minor version we do not know is served as 1.1."""
    http.call(req(b"GET", b"/" + kp + b"v12", version=b"HTTP/1.2"), reply(404))
    http.call(req(b"GET", b"/" + kp + b"v12"), reply(404))      # and the connection stays


def test_headers_just_under_limit_are_fine(http, kp):
    """About 7 KB of headers is well within the 8 KB limit."""
    http.call(req(b"GET", b"/" + kp + b"k", headers=[b"X-Big: " + b"a" * 7000]), reply(404))


@pytest.mark.parametrize("query_len,code", [(5000, 404), (9000, 431)], ids=["5k", "9k"])
def test_long_first_request_line_in_two_writes(server, kp, query_len, code):
    """A first request line longer than a memcached command line, arriving in two writes,
    is still HTTP: 404 under the 8 KB head limit, 431 + close over it."""
    with server.session() as s:
        s.send_pieces(req(b"GET", b"/%sk?%s" % (kp, b"q" * query_len)), 3000, pause=0.05)
        s.expect(reply(404) if code == 404 else reply(431, CLOSE))
        if code == 431:
            s.expect_closed()
    alive(server, b"never-stored", None)


def test_target_without_path_is_400(http, kp):
    """A request target that is neither /key nor http://host/key -> 400 (the spec does
    not say whether this closes)."""
    http.send(req(b"GET", kp + b"k"))
    expect_400(http)


def test_unknown_method_is_405_and_keeps_connection(http, kp):
    """OPTIONS/PATCH/TRACE -> 405 with the full Allow list; their bodies (by length or
    chunked) are discarded and the connection serves the next request."""
    k = kp + b"k"
    http.call(req(b"OPTIONS", b"/" + k), reply(405, ALLOW_ALL))
    http.call(req(b"PATCH", b"/" + k, b"PUT /x HTTP/1.1\r\n\r\n"), reply(405, ALLOW_ALL))
    http.call(b"TRACE /%s HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n"
              % k, reply(405, ALLOW_ALL))
    cas = put(http, k, b"v")
    http.call(req(b"GET", b"/" + k), item(b"v", cas))
    http.call(req(b"GET", b"/x"), reply(404))


@pytest.mark.parametrize("method,body", [(b"PUT", b"v"), (b"POST", b"v"), (b"DELETE", None)])
def test_writes_on_root_are_405(http, method, body):
    """PUT/POST/DELETE on / -> 405 with Allow: GET, HEAD."""
    raw = call(http, req(method, b"/", body))
    assert raw in (reply(405, ALLOW_ROOT), reply(405, ALLOW_ROOT + CLOSE)), raw
    honours_connection_header(http, raw)


def test_key_length_limit(http, kp):
    """Key length counts decoded bytes: 250 bytes (even from 750 encoded chars) is fine,
    251 -> 400."""
    pad = 250 - len(kp)
    cas = put(http, kp + b"%20" * pad, b"spaces")
    http.call(req(b"GET", b"/" + kp + b"%20" * pad), item(b"spaces", cas))
    put(http, kp + b"a" * pad, b"v")
    http.send(req(b"PUT", b"/" + kp + b"a" * (pad + 1), b"v"))
    expect_400(http)


# --------------------------------------------------------------------------- keys

def test_percent_decoding(http, text, kp):
    """%2F/%2f decode to '/', %20 to space, '+' stays '+', any byte may be in a key."""
    cas = put(http, kp + b"a%2Fb%2fc", b"slashes")
    assert text.get(kp + b"a/b/c") == b"slashes"
    http.call(req(b"GET", b"/" + kp + b"a/b/c"), item(b"slashes", cas))
    cas = put(http, kp + b"with%20two%20spaces", b"sp")
    http.call(req(b"GET", b"/" + kp + b"with%20two%20spaces"), item(b"sp", cas))
    put(http, kp + b"a+b", b"plus")
    assert text.get(kp + b"a+b") == b"plus"
    cas = put(http, kp + b"%00%0D%0A%FF", b"odd")
    http.call(req(b"GET", b"/" + kp + b"%00%0d%0a%ff"), item(b"odd", cas))


def test_binary_key_survives_restart(server_factory, engine, kp):
    """A key holding NUL, CR, LF and space, stored by HTTP, is still there after a restart."""
    if engine == "memory":
        pytest.skip("the memory engine keeps nothing across restarts")
    srv = server_factory()
    k = kp + b"%00%0D%0A%20x"
    with srv.session() as s:
        put(s, k, b"v", [b"X-Memtool-Flags: 3"])
    srv.restart()
    with srv.session() as s:
        flags, _, _, value = get_item(s, k)
    assert (flags, value) == (3, b"v")


def test_query_string_ignored_and_absolute_form(http, server, kp):
    """`?x=1` is not part of the key; http://host[:port]/key addresses the same item."""
    k = kp + b"k"
    cas = put(http, k + b"?x=1", b"q")
    http.call(req(b"GET", b"/" + k), item(b"q", cas))
    http.call(req(b"GET", b"/" + k + b"?y=2&z"), item(b"q", cas))
    http.call(req(b"GET", b"http://127.0.0.1:%d/%s" % (server.port, k)), item(b"q", cas))
    http.call(req(b"DELETE", b"http://memtool/" + k), reply(200))
    http.call(req(b"GET", b"/" + k), reply(404))


def test_cross_protocol(http, text, kp):
    """set -> HTTP GET (flags, ETag = cas); HTTP PUT -> get (same flags); deletes either side."""
    a, b = kp + b"a", kp + b"b"
    text.set(a, b"from text", flags=12)
    http.call(req(b"GET", b"/" + a), item(b"from text", text.gets_cas(a), 12))
    put(http, b, b"from http", [b"X-Memtool-Flags: 34"])
    assert text.get_items([b])[b][:2] == (34, b"from http")
    text.call(b"delete %s\r\n" % a, b"DELETED\r\n")
    http.call(req(b"GET", b"/" + a), reply(404))
    http.call(req(b"DELETE", b"/" + b), reply(200))
    assert text.get(b) is None


# --------------------------------------------------------------------------- stats

def numeric(text):
    """A stats value as the JSON number it should be, or the string itself."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def test_stats_json_agrees_with_stats_command(http, text):
    """GET / is the stats command as JSON: same names, numbers as JSON numbers, each
    between the values of a `stats` just before and just after; HEAD / has no body."""
    before = text.stats()
    raw = call(http, req(b"GET", b"/"))
    after = text.stats()
    m = STATS_RE.match(raw)
    assert m, raw
    body = raw[m.end():]
    assert int(m.group(1)) == len(body) and body.endswith(b"\n")
    doc = json.loads(body)
    assert set(doc) == set(before)
    for name, value in doc.items():
        lo, hi = sorted((numeric(before[name]), numeric(after[name])))
        if isinstance(lo, str):
            assert value == lo == hi, name
        else:
            assert type(value) in (int, float) and lo <= value <= hi, (name, value, lo, hi)
    http.send(req(b"HEAD", b"/"))
    assert STATS_RE.fullmatch(read_reply(http, head=True))
    http.call(req(b"GET", b"/nothing-here"), reply(404))


def test_http_requests_move_the_counters(http, text, kp):
    """PUT/POST count as cmd_set, GET as cmd_get + hit/miss, DELETE as delete hit/miss."""
    k = kp + b"k"
    names = ["cmd_set", "cmd_get", "get_hits", "get_misses", "delete_hits", "delete_misses"]
    before = text.stats()
    put(http, k, b"v")
    put(http, k, b"w", method=b"POST")
    get_item(http, k)
    http.call(req(b"GET", b"/" + kp + b"none"), reply(404))
    http.call(req(b"DELETE", b"/" + k), reply(200))
    http.call(req(b"DELETE", b"/" + k), reply(404))
    after = text.stats()
    assert [int(after[n]) - int(before[n]) for n in names] == [2, 2, 1, 1, 1, 1]


# --------------------------------------------------------------------------- curl

@pytest.fixture
def curl():
    if not CURL:
        pytest.skip("curl binary not installed")

    def run(*args):
        done = subprocess.run([CURL, "-sS", "--max-time", "20", *args],
                              capture_output=True, timeout=30)
        assert done.returncode == 0, (args, done.returncode, done.stderr)
        return done
    return run


def test_curl_put_get_delete(curl, server, text, tmp_path, kp):
    """curl -X PUT --data-binary @file, curl GET, -i headers, -X DELETE, 404, a %20 key."""
    url = "http://127.0.0.1:%d/%s" % (server.port, kp.decode())
    f = tmp_path / "v"
    f.write_bytes(b"curl\x00value\r\n")
    assert curl("-X", "PUT", "--data-binary", "@%s" % f, url + "k").stdout == b"Created\n"
    assert curl(url + "k").stdout == b"curl\x00value\r\n"
    cas = text.gets_cas(kp + b"k")
    assert curl("-i", url + "k").stdout == item(b"curl\x00value\r\n", cas)
    assert curl("-X", "DELETE", url + "k").stdout == b"OK\n"
    assert curl("-w", "%{http_code}", url + "k").stdout == b"Not Found\n404"
    assert text.get(kp + b"k") is None
    assert curl("-X", "PUT", "--data-binary", "@%s" % f, url + "a%20b").stdout == b"Created\n"
    assert curl(url + "a%20b").stdout == b"curl\x00value\r\n"


def test_curl_several_urls_reuse_one_connection(curl, server, text, kp):
    """`curl url1 url2 url3` gets every answer over a single connection."""
    text.set(kp + b"1", b"one")
    text.set(kp + b"2", b"two")
    url = "http://127.0.0.1:%d/%s" % (server.port, kp.decode())
    out = curl("-w", "[%{http_code} %{num_connects}]", url + "1", url + "none", url + "2").stdout
    assert out == b"one[200 1]Not Found\n[404 0]two[200 0]"


@pytest.mark.parametrize("expect", [" 100-continue", ""], ids=["expect", "no-expect"])
def test_curl_one_megabyte_upload(curl, server_factory, tmp_path, kp, expect):
    """A 1 MB curl upload with and without Expect: 100-continue (-I 2m); with it the server
    sends the exact 100 Continue, which `curl -i` prints before the 201."""
    srv = server_factory(max_item_size="2m")
    url = "http://127.0.0.1:%d/%sbig" % (srv.port, kp.decode())
    f = tmp_path / "big"
    f.write_bytes(os.urandom(1 << 20))
    out = curl("-i", "-X", "PUT", "-H", "Expect:" + expect, "--data-binary", "@%s" % f,
               url).stdout
    m = CREATED_RE.fullmatch(out[len(CONTINUE):] if expect else out)
    assert m and out.startswith(CONTINUE) == bool(expect), out
    assert curl(url).stdout == f.read_bytes()
    with srv.session() as s:
        assert s.gets_cas(kp + b"big") == int(m.group(1))


@pytest.mark.parametrize("expect", [[], ["-H", "Expect:"]], ids=["curl-default", "no-expect"])
def test_curl_upload_over_limit_gets_413(curl, server, text, tmp_path, kp, expect):
    """A 1.1 MB curl upload to a -I 1m server reports 413 (curl itself sends Expect:
    100-continue for it unless told not to) and stores nothing."""
    f = tmp_path / "big"
    f.write_bytes(b"x" * (1100 * 1024))
    url = "http://127.0.0.1:%d/%sbig" % (server.port, kp.decode())
    out = curl("-w", "%{http_code}", "-X", "PUT", *expect, "--data-binary", "@%s" % f, url).stdout
    assert out == b"Payload Too Large\n413"
    assert text.get(kp + b"big") is None
