"""The meta protocol (mg, ms, md, ma, mn, me) against real memcached 1.6.18.

Each script goes to memcached and to the server under test; every step's
reply must match byte for byte after normalising what legitimately differs:
cas uniques (` c<n>`, `cas=<n>`, classic `VALUE` cas; all but 0) become names
in order of first appearance, and second counts (` t<n>`, ` l<n>`, `exp=`,
`la=`; all but -1) are rounded to the nearest ten, so a clock tick between two
steps is no mismatch; scripts use TTLs that are multiples of ten. `{casN}` in
a step is replaced by the raw cas that `<casN>` stands for in that run.
"""
import re

import pytest

from support import IO_TIMEOUT, max_value_len
from test_differential import normalise

pytestmark = pytest.mark.proxied

CAS_TOKEN_RE = re.compile(rb"(?<= )(c|cas=)(\d+)(?=[ \r])")
SECONDS_RE = re.compile(rb"(?<= )(t|l|exp=|la=)(-?\d+)(?=[ \r])")
PLACEHOLDER_RE = re.compile(rb"\{cas(\d+)\}")


def normalise_meta(reply, cas_names):
    """Classic and meta cas uniques to shared names; second counts rounded to 10s."""
    def rename(m):
        if m.group(2) == b"0":                # ms c on failure: no cas
            return m.group(0)
        name = cas_names.setdefault(m.group(2), b"<cas%d>" % (len(cas_names) + 1))
        return m.group(1) + name

    def round_seconds(m):
        n = int(m.group(2))
        if n == -1:
            return m.group(0)
        return m.group(1) + b"~%d" % ((abs(n) + 5) // 10 * 10 * (1 if n >= 0 else -1))
    reply = normalise(reply, cas_names)
    return SECONDS_RE.sub(round_seconds, CAS_TOKEN_RE.sub(rename, reply))


def fill_placeholders(step, cas_names):
    raw = {name: value for value, name in cas_names.items()}

    def lookup(m):
        name = b"<cas%s>" % m.group(1)
        assert name in raw, "%s used before the server returned it" % name.decode()
        return raw[name]
    return PLACEHOLDER_RE.sub(lookup, step)


def meta_replies(server, steps):
    """Yield each step's normalised reply; a classic set/get sentinel marks its end."""
    cas_names = {}
    with server.session() as s:
        s.call(b"flush_all\r\n", b"OK\r\n")
        for i, step in enumerate(steps):
            sentinel = b"__sentinel%d" % i
            s.send(fill_placeholders(step, cas_names)
                   + b"set %s 0 0 1\r\n!\r\nget %s\r\n" % (sentinel, sentinel))
            tail = b"STORED\r\nVALUE %s 0 1\r\n!\r\nEND\r\n" % sentinel
            try:
                reply = s.read_until(tail)[:-len(tail)]
            except AssertionError as e:
                raise AssertionError("%s, step %r: %s" % (server.label, step[:200], e)) from None
            yield normalise_meta(reply, cas_names)


def assert_same_script(memcached, server, steps):
    """Steps go to the server one by one, so the first differing reply is reported."""
    want = list(meta_replies(memcached, steps))
    for step, w, g in zip(steps, want, meta_replies(server, steps)):
        assert g == w, "step %r\n  memcached: %r\n  server:    %r" % (step[:200], w[:500], g[:500])


K250 = b"k" * 250
K251 = b"k" * 251
B64_248 = b"QUJD" * 62            # 248 base64 characters, 186 bytes decoded
B64_252 = b"QUJD" * 63            # over the 250 limit before decoding
BIG = max_value_len(3)            # largest value for a 3-byte key at -I 1m
O32 = b"O" + b"o" * 31            # longest opaque token: 32 characters with the O
O33 = b"O" + b"o" * 32
DIGITS = b"7" * 5000             # past Python's int() limit of 4300 digits
ZEROS = b"0" * 4999 + b"9"        # the same length, but only one significant digit
MG_FLAGS_17 = b"c f h k l s t v O1 P L I D1 J1 F1 C1 MS"        # mg k + 17 = 20 tokens
MS_FLAGS_16 = b"c k O1 F1 T0 I P L MS D1 J1 f s t v h"          # ms k 1 + 16 = 20 tokens
MD_FLAGS_17 = b"k O1 T0 I P L MS D1 J1 F1 C1 f s t v h u"
MA_FLAGS_17 = b"k O1 T0 I P L MI D1 J1 F1 f s t v h c u"

SCRIPTS = {
    "mg_flags": [
        b"ms a 2 T100 F5\r\nhi\r\n", b"mg a\r\n", b"mg a v\r\n", b"mg a s v\r\n",
        b"mg a k s v t f O9 c\r\n", b"mg a c f O123 k t s v\r\n", b"mg a O1 v k\r\n",
        b"mg a Pfoo Lbar/ I D5 J1 F1 C1 MS v\r\n", b"mg nope\r\n",
        b"mg nope v k O1 s t c f h l\r\n", b"mg a t T200\r\n", b"mg a T300 t\r\n", b"mg a t\r\n",
        b"mg a T0 t\r\n", b"ms b 1\r\nx\r\n", b"mg b t f s c\r\n",
        b"ms c 1 F4294967295\r\nx\r\n", b"mg c f\r\n", b"ms c 1 F4294967297\r\nx\r\n",
        b"mg c f v\r\n", b"mg c T-1 v\r\n", b"mg c v\r\n", b"mg " + K250 + b" v k\r\n",
        b"ms " + K250 + b" 1\r\nz\r\n", b"mg " + K250 + b" v k\r\n",
        b"mg a " + MG_FLAGS_17 + b"\r\n", b"mg nope " + MG_FLAGS_17 + b"\r\n",
        b"mg   a   s   v  \r\n", b"mg a\tv\r\n", b"ms c 1 T2592000\r\nx\r\n", b"mg c t\r\n",
        b"mg c T2592001 v\r\n", b"mg c v\r\n",
    ],
    "mg_hit_and_access_flags": [
        b"ms h 1\r\nx\r\n", b"mg h h l\r\n", b"mg h h l\r\n", b"mg h h v\r\n",
        b"ms u 1\r\nx\r\n", b"mg u h u\r\n", b"mg u v u h\r\n", b"mg u h\r\n", b"mg u h\r\n",
        b"ms g 1\r\nx\r\n", b"get g\r\n", b"mg g h\r\n", b"ms g 1 MA\r\ny\r\n", b"mg g h v\r\n",
        b"ms g 1\r\nx\r\n", b"touch g 0\r\n", b"mg g h\r\n", b"ms g 1\r\nx\r\n", b"mg g T0\r\n",
        b"mg g h\r\n", b"ms g 1\r\nx\r\n", b"mg g u T0\r\n", b"mg g h\r\n",
        b"ms g 1\r\nx\r\n", b"ms g 1 ME\r\ny\r\n", b"mg g h v\r\n",
    ],
    "mg_quiet": [
        b"mg k q\r\n", b"mg k q k O1 v\r\n", b"ms k 1\r\nx\r\n", b"mg k q\r\n",
        b"mg k q v k O2\r\n", b"mg nope q v\r\nmg k q s\r\nmg nope q k\r\n",
    ],
    "ms_modes_and_flags": [
        b"ms a 2 c k O1 F5 T0\r\nhi\r\n", b"ms a 2 q\r\nhi\r\n", b"mg a v f\r\n",
        b"ms a 2 MA c\r\n!!\r\n", b"mg a v f\r\n", b"ms a 1 MP k\r\n^\r\n", b"mg a v\r\n",
        b"ms b 1 MA c k O5\r\nx\r\n", b"ms b 1 MP q\r\nx\r\n", b"ms b 1 MR\r\nx\r\n",
        b"ms b 1 ME c\r\nx\r\n", b"ms b 1 ME\r\ny\r\n", b"ms c 1 MS T100 F7\r\ns\r\n",
        b"mg c v t f\r\n", b"ms c 1 MR\r\nr\r\n", b"mg c v t f\r\n",
        b"ms c 1 F4294967296\r\nx\r\n", b"mg c f\r\n", b"ms c 01 F+5 T+100\r\ny\r\n",
        b"mg c f t v\r\n", b"ms c 1 T-1\r\nx\r\n", b"mg c v\r\n", b"ms c 0\r\n\r\n",
        b"mg c v s\r\n", b"ms c 2\r\n\r\n\r\n", b"mg c v\r\n", b"ms c 1 " + O32 + b" v\r\nx\r\n",
        b"ms c 1 " + MS_FLAGS_16 + b"\r\nx\r\n", b"ms " + K250 + b" 1 k\r\nx\r\n",
    ],
    "ms_cas": [
        b"ms b 1\r\nx\r\n", b"ms b 1 ME C1\r\ny\r\n", b"ms c 1 ME C99 c\r\ny\r\n",
        b"mg c c v\r\n", b"ms c 1 C1\r\nz\r\n", b"ms c 1 C{cas1} c\r\nz\r\n",
        b"ms c 1 C{cas1}\r\nw\r\n", b"ms c 1 C0\r\nw\r\n", b"ms c 1 C0 MR\r\nw\r\n",
        b"ms d 1 C1\r\nz\r\n", b"ms d 1 C0\r\nz\r\n", b"ms d 1 C1 MR\r\nz\r\n",
        b"ms d 1 C1 MA\r\nz\r\n", b"ms d 1 C1 MP\r\nz\r\n", b"ms c 1 C1 MA\r\nz\r\n",
        b"ms c 1 C{cas2} MA c\r\n+\r\n", b"ms c 1 C0 MP\r\n-\r\n", b"mg c v\r\n",
        b"ms e 1 I C99999999\r\nx\r\n", b"ms c 1 I C99999999\r\nx\r\n",
        b"ms c 1 C0 I\r\nx\r\n", b"mg c v c\r\n",        # C0 never matches, even with I
    ],
    "ms_data_blocks_and_errors": [
        b"ms k 3 Z\r\nabc\r\n", b"mg k\r\n", b"ms k 1 c c\r\nx\r\n", b"ms k 1 Me\r\nx\r\n",
        b"ms k 1 MX\r\nx\r\n", b"ms k 1 MEX\r\nx\r\n", b"ms k 1 M\r\nx\r\n",
        b"ms k 1 q Me\r\nz\r\n", b"ms k 1 Fx\r\nx\r\n", b"ms k 1 F-1\r\nx\r\n",
        b"ms k 1 Tx\r\nx\r\n", b"ms k 1 T\r\nx\r\n", b"ms k 1 C-1\r\nx\r\n",
        b"ms k 1 " + O33 + b"\r\nx\r\n", b"ms k 1 b\r\nx\r\n", b"ms k 1 q S1\r\nx\r\n",
        b"mg k\r\n", b"ms k\r\n", b"ms k x\r\nab\r\n", b"ms k -1\r\n", b"ms k 1x\r\nab\r\n",
        b"ms " + K251 + b" 1\r\nx\r\n", b"ms k 1 " + MS_FLAGS_16 + b" u\r\nx\r\n",
        b"ms k 3\r\nabcde\r\n", b"ms k 2 q\r\nabc\r\n", b"mg k v\r\n",
        b"ms\r\n", b"ms k 1 q\r\nx\r\nmg k v\r\n",
    ],
    "ms_too_large": [
        b"ms big 1\r\nx\r\n", b"ms big %d\r\n%s\r\n" % (BIG + 1, b"a" * (BIG + 1)),
        b"mg big v\r\n", b"ms big %d c\r\n%s\r\n" % (BIG, b"b" * BIG), b"mg big s\r\n",
        b"ms big %d F1 q\r\n%s\r\nmg big s\r\n" % (BIG, b"c" * BIG),
        b"ms big %d MA\r\n%s\r\n" % (BIG + 1, b"d" * (BIG + 1)), b"mg big\r\n",
    ],
    "md_flags": [
        b"ms a 1\r\nx\r\n", b"md a q\r\n", b"md a q\r\n", b"md a k O1 q\r\n", b"md a k O1\r\n",
        b"ms a 1 c\r\nx\r\n", b"md a C1 q k\r\n", b"md a C1 I T30\r\n", b"mg a c t\r\n",
        b"md a C{cas1} k O2\r\n", b"mg a\r\n", b"ms a 1 T100\r\nx\r\n", b"md a I\r\n",
        b"mg a t v\r\n", b"md a I T0 q\r\n", b"mg a t\r\n", b"md a\r\n", b"md a I\r\n",
        b"md a " + O32 + b"\r\n", b"ms a 1\r\nx\r\n", b"md a v s t f c\r\n",
        b"ms a 1\r\nx\r\n", b"md a " + MD_FLAGS_17 + b"\r\n", b"md " + K250 + b" k\r\n",
    ],
    "ma_flags": [
        b"ma n\r\n", b"ma n q\r\n", b"ma n MD\r\n", b"ma n N0 J10 v\r\n", b"ma n v\r\n",
        b"ma n q v\r\n", b"mg n v\r\n", b"ma n v D5 MD\r\n", b"ma n v M- D100\r\n",
        b"ma n v M+ D3\r\n", b"ma n v MI\r\n", b"ma n v t c k O1\r\n", b"ma n C1 v\r\n",
        b"ma n C{cas1} v c\r\n", b"ma n N0 J99 v\r\n", b"ma n T100 t v\r\n", b"ma n t T0\r\n",
        b"ma n t\r\n", b"ma x N100 J5 t v\r\n", b"ma y t N100 J5\r\n", b"ma y t\r\n",
        b"ma z N0 v q\r\n", b"ma z D18446744073709551615 v\r\n", b"ms s 3\r\nabc\r\n",
        b"ma s\r\n", b"ma s q\r\n", b"ms e 0\r\n\r\n", b"ma e\r\n", b"ms m 2\r\n-1\r\n",
        b"ma m\r\n", b"ms p 3\r\n100\r\n", b"ma p MD D91 v\r\n", b"mg p v s\r\n",
        b"ma p v\r\n", b"mg p v\r\n", b"ms w 20\r\n18446744073709551615\r\n", b"ma w v\r\n",
        b"mg w v\r\n", b"ma w v D18446744073709551615\r\n", b"ma w v MD D18446744073709551615\r\n",
        b"ms f 1 F9 T100\r\n7\r\n", b"ma f v D30\r\n", b"mg f f t v\r\n", b"ma nope MD k\r\n",
        b"ma n " + MA_FLAGS_17 + b"\r\n", b"ma " + K250 + b" N0 k v\r\n", b"ms k 3\r\n  7\r\n",
        b"ma k v\r\n", b"mg k v s\r\n", b"ma j N100 T50 t v\r\n",
        b"ma mx N0 J18446744073709551615 v\r\n", b"ma mx v\r\n",
    ],
    "stale_while_revalidate": [
        b"ms k 3 T100 c\r\nold\r\n", b"md k I T30\r\n", b"mg k c v t\r\n", b"mg k c v t\r\n",
        b"mg k c\r\n", b"ms k 3 I C{cas1} c\r\nnew\r\n", b"mg k c v t\r\n",
        b"ms k 3 C{cas1}\r\nbad\r\n", b"ms k 3 I C{cas3} c\r\nfre\r\n", b"mg k c v t\r\n",
        b"md k I\r\n", b"mg k c v t\r\n", b"mg k v\r\n", b"ms k 3 C{cas5} I c\r\nnxt\r\n",
        b"mg k v c\r\n", b"ms k 3 I\r\nall\r\n", b"mg k v c\r\n", b"md k C{cas1} I\r\n",
        b"md k C{cas7} q\r\n", b"mg k v\r\n",
    ],
    "vivify_on_miss": [
        b"mg v N30 c v t s f\r\n", b"mg v N30 c v t\r\n", b"mg v c\r\n",
        b"ms v 3 C{cas1} T60 c\r\nnew\r\n", b"mg v N30 v t c\r\n", b"mg w t N30\r\n",
        b"mg w t\r\n", b"mg x N30 T60 t v\r\n", b"mg x N30 T90 t\r\n", b"mg y N30 q\r\n",
        b"mg y N30 q\r\n", b"md y q\r\n", b"mg y N30 k O3\r\n", b"mg z N0 t\r\n", b"mg z t\r\n",
    ],
    "recache_win": [
        b"ms r 1 T10\r\nx\r\n", b"mg r R30 t\r\n", b"mg r R30 t\r\n", b"mg r t\r\n",
        b"ms r2 1 T100\r\nx\r\n", b"mg r2 R30 t\r\n", b"ms r3 1\r\nx\r\n", b"mg r3 R30 t\r\n",
        b"mg r2 R30 T10 t\r\n", b"mg r2 R30 t\r\n", b"ms r4 1 T100\r\nx\r\n",
        b"mg r4 T10 R30 t\r\n", b"ms r 1 T10\r\ny\r\n", b"mg r R30 v\r\n",
        b"mg r5 N30 R30\r\n", b"mg r5 N30 R30\r\n",
    ],
    "quiet_pipelines": [
        b"ms a 1 q\r\n1\r\nms b 1 q MR\r\n2\r\nms a 1 q ME\r\n3\r\nms a 1 q C1\r\n4\r\n"
        b"ms z 1 q C1\r\n5\r\nmg a q v k\r\nmg b q v k\r\nmg b q k O7\r\nmd b q\r\nmd a q\r\n"
        b"md a q\r\nma n q\r\nma n q N0 J5 v\r\nma n q v\r\nma n q C1\r\nmg n q v\r\n"
        b"mg a q Z\r\nmd a q Z\r\nma n q Z\r\nms a 1 q Me\r\nx\r\nmg n q " + O33 + b"\r\n"
        b"ms s 1 q\r\ns\r\nma s q\r\nmn\r\n",
        b"ms a 1 q\r\n1\r\nms b 1 q\r\n2\r\nmg a q\r\nmg c q\r\nmd b q\r\nma c q N0\r\n"
        b"ma c q\r\nmn\r\n",
        b"mg a q v\r\nmg b q v\r\nmg c q v\r\nmn\r\n",
    ],
    "base64_keys": [
        b"set foo 0 0 3\r\nbar\r\n", b"mg Zm9v b k v\r\n", b"mg Zm9v b\r\n", b"me Zm9v b\r\n",
        b"ms Zm8= 2 b k\r\nhi\r\n", b"get fo\r\n", b"mg fo k v\r\n", b"me fo\r\n",
        b"mg Zm9v! b k\r\n", b"mg Zm8 b k v\r\n", b"mg Zm8== b k\r\n", b"mg Zm8=x b k\r\n",
        b"mg Zm9v=== b k\r\n", b"mg Z b k\r\n",
        b"mg ==== b k\r\n", b"mg Zg== b k O1\r\n", b"mg AAEC/w== b k v\r\n",
        b"ms AAEC/w== 1 b k c\r\nx\r\n", b"mg AAEC/w== b k v s\r\n", b"me AAEC/w== b\r\n",
        b"ma AAEC/w== b k\r\n", b"md AAEC/w== b k q\r\n", b"mg AAEC/w== b k q\r\n",
        b"ma bm4= b N0 J1 k v\r\n", b"get nn\r\n", b"md bm4= b k\r\n", b"md bm4= b k\r\n",
        b"ms Z 1 b\r\nx\r\n", b"md Z b\r\n", b"ma Z b\r\n", b"me Z b\r\n",
        b"ms " + B64_248 + b" 1 b\r\nx\r\n", b"mg " + B64_248 + b" b s\r\n",
        b"mg " + B64_252 + b" b s\r\n",
    ],
    "error_lines": [
        b"mg\r\n", b"ms\r\n", b"md\r\n", b"ma\r\n", b"me\r\n", b"mx\r\n", b"mx a\r\n",
        b"mgg a\r\n", b"MG a\r\n", b"mn\r\n", b"mn 1 2 3\r\n", b"mn\r\nmn\r\n",
        b"mg a Z\r\n", b"mg a E\r\n", b"mg a c c\r\n", b"mg a v v\r\n", b"mg a O1 O2\r\n",
        b"mg a Tx\r\n", b"mg a T\r\n", b"mg a N\r\n", b"mg a R1x\r\n", b"mg a C\r\n",
        b"mg a Fx\r\n", b"mg a Dx\r\n", b"mg a Jx\r\n", b"mg a M\r\n", b"mg a MSS\r\n",
        b"mg a " + MG_FLAGS_17 + b" u\r\n", b"mg a " + b"x " * 30 + b"\r\n",
        b"mg a " + O33 + b"\r\n", b"mg a q " + O33 + b"\r\n", b"mg a Z q\r\n",
        b"mg " + K251 + b"\r\n", b"mg " + K251 + b" q\r\n", b"md a Z\r\n", b"md a c c\r\n",
        b"md a Tx\r\n", b"md a Dx\r\n", b"md a b\r\n", b"md a " + O33 + b"\r\n",
        b"md a " + MD_FLAGS_17 + b" q\r\n", b"md " + K251 + b"\r\n", b"ma a Z\r\n",
        b"ma a MX\r\n", b"ma a Mi\r\n", b"ma a MDD\r\n", b"ma a Dx\r\n", b"ma a D-1\r\n",
        b"ma a D18446744073709551616\r\n", b"ma a Jx\r\n", b"ma a q Z\r\n",
        b"ma a " + O33 + b"\r\n", b"ma a " + MA_FLAGS_17 + b" q\r\n", b"ma " + K251 + b"\r\n",
        b"me a\r\n", b"me " + K250 + b"\r\n", b"me " + K251 + b"\r\n", b"me a b c\r\n",
    ],
    "late_opaque_errors_keep_side_effects": [
        b"ms n 1\r\n5\r\n", b"ma n v " + O33 + b"\r\n", b"mg n v\r\n",
        b"ma nn N0 J3 " + O33 + b"\r\n", b"mg nn v\r\n", b"ms t 1 T100\r\nx\r\n",
        b"mg t T300 " + O33 + b"\r\n", b"mg t t\r\n", b"md t " + O33 + b"\r\n", b"mg t t\r\n",
        b"ms t 1 " + O33 + b"\r\nx\r\n", b"mg t v\r\n",
        # an unlocked mg is a fetch before its opaque is looked at; with h it is not
        b"ms f 1\r\nx\r\n", b"mg f " + O33 + b"\r\n", b"me f\r\n", b"ms g 1\r\nx\r\n",
        b"mg g h " + O33 + b"\r\n", b"me g\r\n",
    ],
    "numbers_past_any_int": [   # thousands of digits: refused like any overflow
        b"mg k T" + DIGITS + b"\r\n", b"mg k N" + DIGITS + b"\r\n", b"md k C" + DIGITS + b"\r\n",
        b"ma k D" + DIGITS + b"\r\n", b"ms k " + DIGITS + b"\r\n",
        b"ms k 1 F" + DIGITS + b"\r\nx\r\n", b"ms n %d\r\n%s\r\n" % (len(DIGITS), DIGITS),
        b"ma n\r\n", b"incr n 1\r\n", b"mg n s\r\n", b"ms z %d\r\n%s\r\n" % (len(ZEROS), ZEROS),
        b"ma z v\r\n", b"ma z v D" + ZEROS + b"\r\n",
    ],
    "ma_compares_cas_before_parsing": [
        b"ms s 3\r\nabc\r\n", b"ma s C999\r\n", b"ma s\r\n", b"ms e 0\r\n\r\n", b"ma e C999\r\n",
    ],
    "meta_debug": [
        b"me a\r\n", b"ms a 3\r\nabc\r\n", b"me a\r\n", b"mg a\r\n", b"me a\r\n",
        b"ms b 5 F9 T100\r\nhello\r\n", b"me b\r\n", b"mg b u v\r\n", b"me b\r\n",
        b"md b I T30\r\n", b"me b\r\n", b"me a b c\r\n",
    ],
    "classic_and_meta_pipelined": [
        b"set a 1 0 3\r\nabc\r\nmg a v f c\r\ngets a\r\nms a 3 c\r\nxyz\r\nget a\r\nmd a q\r\n"
        b"get a\r\nincr n 1\r\nma n N0 J7 v\r\nincr n 1\r\nmn\r\ndelete n\r\nmg n\r\n"
        b"bogus\r\nmg a q v\r\nversion\r\nadd a 0 0 1\r\nq\r\nms a 1 ME\r\nr\r\nmg a v k\r\n",
        b"gets a\r\n", b"mg a c\r\n", b"cas a 0 0 1 {cas3}\r\nz\r\n", b"gets a\r\n",
        b"ms a 1 C{cas4} c\r\nw\r\n", b"ms a 1 C{cas3}\r\nv\r\n",
        b"append a 0 0 1\r\n!\r\n", b"mg a v c\r\n", b"touch a 100\r\n", b"mg a t\r\n",
        b"gat 0 a\r\n", b"mg a t\r\n",
    ],
}


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_same_replies_as_memcached(name, memcached, server):
    """Every step of the script gets memcached's exact reply."""
    assert_same_script(memcached, server, SCRIPTS[name])


def test_meta_command_in_small_pieces(memcached, server):
    """Meta commands and a data block dribbled in one byte per write parse like one write."""
    data = b"ms p 5 T0 F3 c k\r\nhello\r\nmg p s v f k c\r\nma n N0 J9 v\r\nmn\r\n"

    def replay(srv):
        with srv.session() as s:
            s.call(b"flush_all\r\n", b"OK\r\n")
            s.send_pieces(data)
            return normalise_meta(s.read_until(b"MN\r\n"), {})
    want = replay(memcached)
    assert want == b"HD c<cas1> kp\r\nVA 5 s5 f3 kp c<cas1>\r\nhello\r\nVA 1\r\n9\r\nMN\r\n"
    assert replay(server) == want


STAT_COUNTERS = ("cmd_get get_hits get_misses cmd_touch touch_hits touch_misses cmd_set "
                 "cas_hits cas_misses cas_badval delete_hits delete_misses incr_hits "
                 "incr_misses decr_hits decr_misses cmd_meta total_items").split()
STATS_FIRST = (
    b"mg a v\r\nms a 1\r\nx\r\nmg a v\r\nmg a q\r\nmg a T100\r\nmg b T100\r\nmg b N30\r\n"
    b"mg b N30\r\nms a 1 C1\r\nx\r\nms q 1 C1\r\nx\r\nms a 1 ME\r\nx\r\nms a 1 Mz\r\nx\r\n"
    b"ms a 1 Z\r\nx\r\nms a 2\r\nxyz\r\nmg a c\r\nmn\r\n"
)
STATS_SECOND = (
    b"ms a 1 C%s\r\ny\r\nmd a C1\r\nmd a I\r\nmd a\r\nmd a\r\nmd a Z\r\nma n\r\nma n MD\r\n"
    b"ma n N0\r\nma n\r\nma n MD\r\nma n C1\r\nms s 1\r\nx\r\nma s\r\nme s\r\nme nope\r\n"
    b"me\r\nms g 1\r\n8\r\nincr g 1\r\nincr g 1\r\ndecr g 5\r\nma g MI D100\r\nmn\r\n"
)


@pytest.mark.server_only
def test_stats_counters_move_like_memcached(memcached, server):
    """The counters meta commands move change by memcached's amounts."""
    def counters(srv):
        with srv.session() as s, srv.session() as aux:
            s.call(b"flush_all\r\n", b"OK\r\n")
            before = aux.stats()
            s.send(STATS_FIRST)
            cas = re.search(rb"HD c(\d+)\r\nMN\r\n$", s.read_until(b"MN\r\n")).group(1)
            s.send(STATS_SECOND % cas)
            s.read_until(b"MN\r\n")
            after = aux.stats()
        return {k: int(after[k]) - int(before[k]) if k in after else None
                for k in STAT_COUNTERS}
    want = counters(memcached)
    assert want["cmd_meta"] == 2 and want["cmd_touch"] == 1 and want["cas_hits"] == 1
    assert counters(server) == want


def client_story(mm, port):
    """What the meta-memcache client sees for a fixed sequence of high-level calls."""
    client = mm.CacheClient.cache_client_from_servers(
        [mm.ServerAddress("127.0.0.1", port)],
        mm.connection_pool_factory_builder(connection_timeout=IO_TIMEOUT, recv_timeout=IO_TIMEOUT))
    lease = mm.LeasePolicy(ttl=30, miss_retries=2)

    def no_wait(seconds):
        """Lease retries without sleeping."""
    out = [client.set("a", {"x": [1, 2]}, ttl=100), client.get("a"), client.get("missing")]
    _, cas = client.get_cas("a")
    out += [client.set("a", "new", ttl=100, cas_token=cas),
            client.set("a", "newer", ttl=100, cas_token=cas), client.get("a"),
            client.set("clé ü", b"bytes", ttl=0), client.get("clé ü"),     # base64 key
            client.set("L" * 300, 42, ttl=0), client.get("L" * 300),      # hashed long key
            client.refill("a", "x", ttl=10),
            client.set("a", "!", ttl=100, set_mode=mm.SetMode.APPEND), client.get("a"),
            client.delta_initialize_and_get("n", 5, initial_value=10, initial_ttl=100),
            client.delta_and_get("n", -3), client.delta("nope", 1),
            client.touch("a", 50), client.touch("nope", 50),
            sorted((k.key, v) for k, v in client.multi_get(["a", "n", "nope"]).items()),
            client.get_or_lease("lease", lease, lease_wait_fn=no_wait),    # wins: None
            client.get_or_lease("lease", lease, lease_wait_fn=no_wait),    # loses, gives up
            client.delete("a", stale_policy=mm.StalePolicy(mark_stale_on_deletion_ttl=30)),
            client.get("a"), client.get("a"),
            client.set("q", 7, ttl=0, no_reply=True), client.get("q"),
            client.delete("q"), client.delete("q"), client.invalidate("q")]
    return out


def test_meta_memcache_client_round_trip(memcached, server):
    """The meta-memcache library (PyPI) gets the same results from both servers."""
    mm = pytest.importorskip("meta_memcache",
                             reason="meta-memcache not installed (pip install meta-memcache)")

    def run(srv):
        with srv.session() as s:
            s.call(b"flush_all\r\n", b"OK\r\n")
        return client_story(mm, srv.port)
    want = run(memcached)
    assert want[:2] == [True, {"x": [1, 2]}] and ("n", "7 ") in want[18]   # padded decrement
    assert run(server) == want
