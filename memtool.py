#!/usr/bin/env python3
"""memtool: a memcached-compatible key-value server that keeps its data.

One file, standard library only, Python 3.9+. Copy it to a server and run:

    python3 memtool.py serve                      # 127.0.0.1:11211, data in ./memtool-data
    python3 memtool.py serve -p 11311 --data /var/lib/memtool --sync always
    python3 memtool.py check --data /var/lib/memtool [--fix]   # verify, repair (stopped)
    python3 memtool.py proxy -c nutcracker.yml    # shard over servers as twemproxy does
    python3 memtool.py serve --sid 1 --peer host-b:11211   # on host-a, and on host-b
    python3 memtool.py serve --sid 2 --peer host-a:11211   # ... a dual master
    python3 memtool.py replicate --from host-a:11211 --to cache:11211 --rts a.rts
    python3 memtool.py replicate --check host-a:11211 host-b:11211 [--repair]

Any memcached client (pymemcache, libmemcached's memccp/memccat, telnet)
talks to it; every change goes to an append-only update log (ulog) before it
is acknowledged, and to a dbm-style store on disk, so a restart or a crash
loses nothing that was acknowledged (``--sync always``; see the README for
what the other sync modes promise).

Protocol (memcached 1.6 text protocol, ``doc/protocol.txt``):

    storage    set add replace append prepend cas      <key> <flags> <exptime> <bytes> [noreply]
    retrieval  get gets <key>*    gat gats <exptime> <key>*
    other      delete incr decr touch flush_all version verbosity stats quit shutdown
    meta       mg ms md ma mn me <key> <flags>*   (the meta protocol of memcached 1.6.18)
    errors     ERROR | CLIENT_ERROR <why> | SERVER_ERROR <why>

The same port answers HTTP (Tokyo Tyrant style), on the same items:

    curl -X PUT --data-binary hello http://127.0.0.1:11211/greeting     # 201
    curl http://127.0.0.1:11211/greeting                                # 200 hello
    curl -X DELETE http://127.0.0.1:11211/greeting                      # 200
    curl http://127.0.0.1:11211/                                        # stats as JSON

A telnet session:

    $ telnet 127.0.0.1 11211
    set greeting 0 0 5
    hello
    STORED
    get greeting
    VALUE greeting 0 5
    hello
    END

File formats (under ``--data``):

    store.sqlite3   SQLite, the table of Python 3.13's dbm.sqlite3:
                    Dict(key BLOB UNIQUE NOT NULL, value BLOB NOT NULL);
                    value = <flags u32><exptime i64><cas u64><stamp µs u64><stamp sid
                    u32> little-endian + data (the cas field's top 2 bits: the item's
                    stale/base64-key state; then a bit for "a stamp follows", rows of
                    release 1 have none, and one for a tombstone)
    store.<engine>  the same key/value pairs in a dbm.gnu/ndbm/dumb file
    ENGINE          the engine's name: another engine is refused
    ulog/*.ulog     the update log; record format in section 6
    ulog/PRUNED     the newest ulog file deleted, once old files are pruned
    aside/          files `check --fix` or `--convert` replaced, never deleted

Contents (``grep -n '^# =====' memtool.py``):

    1. Constants and limits
    2. Errors
    3. Protocol codec
    4. Hash ring
    5. Storage
    6. Update log
    7. Event loop and connections
    8. Server
    9. Proxy
    10. Replication
    11. Bench
    12. CLI
"""

import argparse
import binascii
import bisect
import collections
import contextlib
import errno
import fcntl
import hashlib
import heapq
import importlib
import ipaddress
import itertools
import json
import logging
import multiprocessing
import os
import queue
import random
import re
import resource
import selectors
import signal
import socket
import sqlite3
import statistics
import struct
import sys
import threading
import time
import urllib.parse
import zlib

__version__ = "0.1.0"

# ===== 1. Constants and limits ===============================================

MEMCACHED_VERSION = b"1.6.18"       # the protocol level we answer to
VERSION_STRING = MEMCACHED_VERSION + b"-memtool-" + __version__.encode()
DEFAULT_PORT = 11211
DEFAULT_HOST = "127.0.0.1"          # never all interfaces unless asked
DEFAULT_DATA_DIR = "./memtool-data"

KEY_MAX_LENGTH = 250                # memcached KEY_MAX_LENGTH
TEXT_KEY_UNSAFE = re.compile(rb"[\x00-\x20\x7f]")   # bytes a text-protocol key lacks
LINE_MAX_BYTES = 2048               # no newline after this many bytes: drop the client
MULTIGET_LINE_MAX_BYTES = 1 << 20   # our bound on a long get line (memcached has none)
HTTP_HEAD_MAX_BYTES = 8192          # HTTP request line + headers; more is 431
HTTP_LINGER_SECONDS = 5             # after a 413, read and drop the upload this long
ITEM_SIZE_MAX_DEFAULT = 1 << 20     # -I
ITEM_HEADER_BYTES = 59              # memcached's per-item overhead counted against -I:
                                    # 48-byte header + key NUL + "\r\n" + 8-byte cas
VALUE_LENGTH_MAX = 2 ** 31 - 3      # memcached refuses vlen > INT_MAX - 2
REALTIME_MAXDELTA = 30 * 24 * 3600  # exptime above this is a unix time, not seconds
MAX_CONNS_DEFAULT = 1024            # -c
MEMORY_LIMIT_MB_DEFAULT = 64        # -m: the memory engine's items (memcached's default)
READ_CACHE_MB_DEFAULT = 256         # -m of disk engines: their read cache, sized to hold a
                                    # working set of 100,000 1 KiB items
ULOG_LIMIT_DEFAULT = 64 << 20       # --ulog-limit: rotate the update log at this size
ULOG_LIMIT_MIN = 64 << 10           # ... and at least this
ULOG_KEEP_DEFAULT = 4               # rotated ulog files kept for recovery and peers
ULOG_RETAIN_DEFAULT = 1 << 30       # --ulog-retain: files a connected replica still needs
                                    # are kept past --ulog-keep up to this many bytes
TOMBSTONE_TTL_DEFAULT = 86400       # --tombstone-ttl: seconds a delete is remembered
REPL_BACKLOG_DEFAULT = 64 << 20     # --repl-backlog: the memory engine's recent records

ACCEPT_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
ACCEPT_RETRY_SECONDS = 0.1          # accepting pauses this long when it runs out of fds
RESERVED_FDS = 20                   # descriptors besides clients (memcached's reserved_fds)
RECV_BYTES = 65536                  # 128 KiB+ makes glibc mmap/munmap on every recv
HELD_BYTES_MIN = 8 << 20            # incomplete data blocks may hold -m, or at least this
OUTPUT_HIGH_WATER = 4 << 20         # stop reading a client that does not read its replies
SEND_JOIN_MAX_BYTES = 256 << 10     # a pass's replies up to this are joined into one send
OUTPUT_CHECK_CHUNKS = 64            # parsers weigh queued replies every this many chunks
SEND_CHUNKS_MAX = 512               # buffers per sendmsg() (IOV_MAX is 1024 on Linux)
REQS_PER_EVENT_DEFAULT = 20        # -R: requests a client gets per loop pass (memcached's)
MULTIGET_KEYS_PER_REQUEST = 16      # ... where a multiget's keys count this many to a request
SWEEP_INTERVAL_SECONDS = 1.0        # background expiry sweep: one bounded step per interval
SWEEP_STEP_ITEMS = 500
UINT32_MASK = 0xFFFFFFFF
UINT64_MASK = 0xFFFFFFFFFFFFFFFF

# Reply lines, defined once.
STORED = b"STORED\r\n"
NOT_STORED = b"NOT_STORED\r\n"
EXISTS = b"EXISTS\r\n"
NOT_FOUND = b"NOT_FOUND\r\n"
DELETED = b"DELETED\r\n"
TOUCHED = b"TOUCHED\r\n"
END = b"END\r\n"
OK = b"OK\r\n"
RESET = b"RESET\r\n"
CRLF = b"\r\n"
NOREPLY = b"noreply"

log = logging.getLogger("memtool")


def now():
    """Current unix time in seconds (float); the one clock everything reads."""
    return time.time()


def parse_address(text):
    """'host:port' or '[v6]:port' -> (host, port); ValueError when it is neither."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not host:port: {text!r}")
    return host.strip("[]"), int(port)


def parse_size(text):
    """'1m' -> 1048576, '512k' -> 524288, '100' -> 100 bytes (memcached -I style).

    Raises ValueError for anything else, including sizes below 1.
    """
    text = text.strip().lower()
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(text[-1:], 1)
    number = int(text[:-1] if scale != 1 else text)
    if number < 1:
        raise ValueError(f"size must be positive: {text!r}")
    return number * scale


# ===== 2. Errors =============================================================

class MemtoolError(Exception):
    """Root of memtool's own errors."""


class ProtocolError(MemtoolError):
    """A request the protocol refuses; `line` is the exact reply (with CRLF).

    The fixed refusals are subclasses made by refusal() and raised as
    classes, so each raise makes a fresh instance: an instance raised again
    keeps the traceback of every earlier raise, and with it their frames and
    receive buffers.
    """

    line = b"ERROR\r\n"
    prefix = b""
    why = b""            # the line without its prefix and CRLF

    def __init__(self, why=None):
        if why is not None:
            self.line = self.prefix + why + CRLF
            self.why = why
        super().__init__(self.line.decode("latin-1").strip())

    @classmethod
    def refusal(cls, why):
        """A subclass whose line is `<prefix> why`: raise it as a class."""
        return type(cls.__name__, (cls,), {"line": cls.prefix + why + CRLF, "why": why})


class UnknownCommand(ProtocolError):
    """Unknown command or wrong token count: memcached's bare `ERROR`."""


class ClientError(ProtocolError):
    """`CLIENT_ERROR <why>`: the client sent something malformed."""

    prefix = b"CLIENT_ERROR "
    line = b"CLIENT_ERROR bad command line format\r\n"


class ServerError(ProtocolError):
    """`SERVER_ERROR <why>`: a well-formed request the server cannot do."""

    prefix = b"SERVER_ERROR "


class HttpError(MemtoolError):
    """An HTTP request whose framing is broken: answer `status` and close.

    detail (bytes) goes into a 400's body; the connection cannot continue
    because where the next request starts is unknown.
    """

    def __init__(self, status, detail=b""):
        super().__init__(f"HTTP {status} {detail.decode('latin-1')}")
        self.status = status
        self.detail = detail


class Disconnect(MemtoolError):
    """Drop the client without a reply (memcached's 'nuke the connection')."""


class BadReply(MemtoolError):
    """A server reply that does not parse as the reply to the request sent."""


class BackendUnavailable(MemtoolError):
    """A server we are a client of cannot be reached."""


class LogCorrupt(MemtoolError):
    """An update-log record failed its length or crc32 check."""


class LogDamaged(LogCorrupt):
    """A ulog file cannot be read past `offset`. torn: what is left is the
    unfinished end of the newest file, which start-up may cut."""

    def __init__(self, path, offset, torn):
        super().__init__(f"{path}: damaged record at offset {offset}")
        self.path = path
        self.offset = offset
        self.torn = torn


class PositionLost(MemtoolError):
    """A log position that the log no longer holds (pruned, or out of the
    memory backlog) or never held (another server's, or an older log's)."""


class ConfigError(MemtoolError):
    """A setting or data directory that cannot work; the CLI prints it and exits 1."""


class StoreUnreadable(ConfigError):
    """The store file cannot be opened or read: one line with the cause and the remedy."""

    def __init__(self, data_dir, engine, cause):
        super().__init__(
            f"the {engine} store in {data_dir} cannot be read ({cause}); if the update log "
            f"is complete, `memtool.py check --data {data_dir} --fix` rebuilds it from the log")


# ===== 3. Protocol codec =====================================================
#
# Pure functions from bytes to values, no I/O. Numbers parse as memcached's
# safe_strtoul/safe_strtol do (util.c): leading whitespace and a sign are
# allowed, the digits must end the token or be followed by whitespace, and
# the result is truncated to the C type memcached stores it in.

_NUMBER = re.compile(rb"[ \t\n\v\f\r]*([+-]?)([0-9]+)(?:[ \t\n\v\f\r\0]|$)")
BAD_FORMAT = ClientError
UNKNOWN = UnknownCommand
INVALID_EXPTIME = ClientError.refusal(b"invalid exptime argument")
INVALID_DELTA = ClientError.refusal(b"invalid numeric delta argument")
NON_NUMERIC_VALUE = ClientError.refusal(b"cannot increment or decrement non-numeric value")
BAD_DATA_CHUNK = ClientError.refusal(b"bad data chunk")
TOO_LARGE = ServerError.refusal(b"object too large for cache")
NO_MEMORY = ServerError.refusal(b"out of memory storing object")
LINE_NO_MEMORY = ServerError.refusal(b"out of memory reading request")
DELETE_USAGE = ClientError.refusal(b"bad command line format.  Usage: delete <key> [noreply]")


def _int_digits(digits):
    """int() of ASCII digits, with more than 20 significant ones (past any 64-bit
    value, and past Python's limit on int() of long strings) counted as 2**64."""
    if len(digits) > 20:
        digits = digits.lstrip(b"0") or b"0"
        if len(digits) > 20:
            return 1 << 64
    return int(digits)


def _strto(text):
    """(negative, digits) of a strtol-style number, or None when it is not one."""
    match = _NUMBER.match(text)
    if match is None:
        return None
    return match.group(1) == b"-", _int_digits(match.group(2))


def parse_uint64(text):
    """strtoull as memcached's safe_strtoull uses it: int in [0, 2**64), or None.

    A minus sign is refused unless the value is still below 2**63 after C's
    negation ('-0' is 0), exactly as memcached checks it.
    """
    if text.isdigit():
        value = _int_digits(text)
        return value if value <= UINT64_MASK else None
    parsed = _strto(text)
    if parsed is None or parsed[1] > UINT64_MASK:
        return None
    negative, value = parsed
    if negative:
        value = -value & UINT64_MASK
        if value >= 1 << 63:
            return None
    return value


def parse_int32(text):
    """strtol into memcached's int32: None on junk or 64-bit overflow, else wrapped."""
    if text.isdigit():
        value = _int_digits(text)
        if value < 1 << 31:
            return value
    else:
        parsed = _strto(text)
        if parsed is None:
            return None
        value = -parsed[1] if parsed[0] else parsed[1]
    if not -(1 << 63) <= value < 1 << 63:
        return None
    return (value + (1 << 31) & UINT32_MASK) - (1 << 31)


def parse_flags(text):
    """Client flags: parsed as unsigned 64-bit, kept as 32 (memcached 1.6.18)."""
    value = parse_uint64(text)
    return None if value is None else value & UINT32_MASK


def split_command(line):
    """Tokens of one command line (without its newline).

    memcached splits on spaces only (a tab is a key byte), ignores runs of
    spaces, strips one CR before the newline and stops at a NUL byte.
    """
    if line[-1:] == b"\r":
        line = line[:-1]
    nul = line.find(b"\0")
    if nul >= 0:
        line = line[:nul]
    tokens = line.split(b" ")
    if b"" in tokens:
        tokens = [t for t in tokens if t]
    return tokens


def is_long_get(buf, pos):
    """True when an unterminated line at `pos` may be a large multiget."""
    start = pos
    while buf[pos:pos + 1] == b" ":
        pos += 1
    return pos - start <= 100 and (buf.startswith(b"get ", pos) or buf.startswith(b"gets ", pos))


def parse_storage(tokens):
    """Parse `<cmd> <key> <flags> <exptime> <bytes> [<cas unique>] [noreply]`.

    Returns (key, flags, exptime, nbytes, cas_unique); exptime is the raw
    protocol value (see Store.absolute), cas_unique 0 unless the command is
    cas. Raises UNKNOWN for a wrong token count, then BAD_FORMAT as
    memcached's process_update_command does, checking in its order: key,
    numbers, length.
    """
    with_cas = tokens[0] == b"cas"
    arity = 6 if with_cas else 5
    if len(tokens) != arity and len(tokens) != arity + 1:
        raise UNKNOWN
    key = tokens[1]
    if len(key) > KEY_MAX_LENGTH:
        raise BAD_FORMAT
    flags, exptime, nbytes = tokens[2], tokens[3], tokens[4]
    if (len(flags) < 10 and len(exptime) < 10 and len(nbytes) < 10
            and flags.isdigit() and exptime.isdigit() and nbytes.isdigit()):
        flags, exptime, nbytes = int(flags), int(exptime), int(nbytes)  # the usual case
    else:
        flags, exptime, nbytes = parse_flags(flags), parse_int32(exptime), parse_int32(nbytes)
        if flags is None or exptime is None or nbytes is None:
            raise BAD_FORMAT
    cas_unique = 0
    if with_cas:
        cas_unique = parse_uint64(tokens[5])
        if cas_unique is None:
            raise BAD_FORMAT
    if not 0 <= nbytes <= VALUE_LENGTH_MAX:
        raise BAD_FORMAT
    return key, flags, exptime, nbytes, cas_unique


def parse_meta_length(tokens):
    """The datalen of `ms <key> <datalen> <flag>*`, after memcached's checks before it
    (a request that fails them has no data block)."""
    if len(tokens) < 2:
        raise UNKNOWN
    if len(tokens[1]) > KEY_MAX_LENGTH or len(tokens) == 2:
        raise BAD_FORMAT
    if len(tokens) > META_TOKENS_MAX:
        raise META_TOO_LONG
    nbytes = parse_int32(tokens[2])
    if nbytes is None or not 0 <= nbytes <= VALUE_LENGTH_MAX:
        raise BAD_FORMAT
    return nbytes


def item_total_size(key, flags, nbytes):
    """memcached's ITEM_ntotal in bytes: header, key, data, cas (flags cost 4 bytes)."""
    return ITEM_HEADER_BYTES + len(key) + nbytes + (4 if flags else 0)


def item_size_ok(key, flags, nbytes, item_size_max):
    """memcached's item_size_ok: does the item fit under -I?"""
    return item_total_size(key, flags, nbytes) <= item_size_max


def _slab_chunk_sizes(factor=1.25, smallest=96, largest=512 * 1024):
    """memcached slabs_init's chunk sizes with its defaults (-f 1.25, -n 48, 1 MB pages)."""
    sizes = []
    size = smallest
    while size < largest / factor:
        size += -size % 8
        sizes.append(size)
        size = int(size * factor)
    sizes.append(largest)
    return sizes


SLAB_CHUNK_SIZES = _slab_chunk_sizes()


def slab_class(ntotal):
    """The slab class memcached would keep an item of ntotal bytes in (`me` cls=)."""
    return min(bisect.bisect_left(SLAB_CHUNK_SIZES, ntotal), len(SLAB_CHUNK_SIZES) - 1) + 1


# Meta commands (memcached 1.6.18 proto_text.c, _meta_flag_preparse): after
# the key come one-letter flags, some with a value glued on (`T30`, `Oabc`).
# A command's flags are parsed into a dict in request order, because return
# flags are echoed in that order.
META_FLAG_CHARS = frozenset(b"bNTRlOPLkstcfvhuqFCMJDI")  # known to every meta command
META_PLAIN_FLAGS = frozenset(b"lPLkstcfvhuqI")            # ... of them, those without a value
MG_SILENT_FLAGS = frozenset(b"bPLvuqFCMJDI")              # nothing for mg to echo or do
MG_LOCKING_FLAGS = frozenset(b"hlNTR")     # mg delays its LRU bump (memcached's of.locked)
META_TOKENS_MAX = 19        # memcached's MFLAG_MAX_OPT_LENGTH, less its terminal token
META_OPAQUE_MAX = 32        # bytes of an O token, the O included
META_TTL_FLAGS = frozenset(b"NTR")      # exptime values (safe_strtol)
META_U64_FLAGS = {ord("C"): ClientError.refusal(b"bad token in command line format"),
                  ord("J"): ClientError.refusal(b"invalid numeric initial value"),
                  ord("D"): ClientError.refusal(b"invalid numeric delta value")}
INVALID_FLAG = ClientError.refusal(b"invalid flag")
DUPLICATE_FLAG = ClientError.refusal(b"duplicate flag")
BAD_TOKEN = META_U64_FLAGS[ord("C")]
BAD_M_LENGTH = ClientError.refusal(b"incorrect length for M token")
BAD_KEY_ENCODING = ClientError.refusal(b"error decoding key")
OPAQUE_TOO_LONG = ClientError.refusal(b"opaque token too long")
META_FLAG_SETS_KEPT = 4096  # parsed flag sets remembered (opaques make most of them unique)
_PARSED_META_FLAGS = {}     # tuple of flag tokens -> their flags dict
MG_TOO_LONG = ClientError.refusal(b"options flags are too long")
META_TOO_LONG = ClientError.refusal(b"options flags too long")      # ms, md, ma word it so
INVALID_OR_DUPLICATE_FLAG = ClientError.refusal(b"invalid or duplicate flag")
INVALID_MS_MODE = ClientError.refusal(b"invalid mode for ms M token")
INVALID_MA_MODE = ClientError.refusal(b"invalid mode for ma M token")
MS_MODES = (b"S", b"E", b"A", b"P", b"R")   # set, add (E), append, prepend, replace
MA_MODES = (b"I", b"+", b"D", b"-")         # incr, incr, decr, decr
BASE64_OTHER = re.compile(rb"[^A-Za-z0-9+/=]")


def parse_meta_flags(tokens, start):
    """(key, flags) of a meta command whose flags begin at tokens[start].

    flags maps each flag's character code to its value: an int for N T R
    (raw exptime) C F J D, the mode byte for M, the token itself for O, and
    True for the rest. It may be shared with other commands that sent the
    same flags, so it must not be changed. With `b` the key is
    base64-decoded. Raises ClientError as memcached does: an unknown or
    repeated flag at once, any other bad flag after the scan, the last one
    winning (a bad F keeps the message before it, or `bad command line
    format`).
    """
    key = tokens[1]
    # Clients send the same few flag sets over and over: parse each once.
    flag_tokens = tuple(tokens[start:])
    flags = _PARSED_META_FLAGS.get(flag_tokens)
    if flags is not None:
        return key, flags
    flags = {}
    error = None
    for token in tokens[start:]:
        char = token[0]
        if char in flags or char >= 127:
            raise DUPLICATE_FLAG
        if char in META_PLAIN_FLAGS:
            flags[char] = True
            continue
        if char not in META_FLAG_CHARS:
            raise INVALID_FLAG
        value = True
        if char in META_TTL_FLAGS:
            value = parse_int32(token[1:])
            if value is None:
                error = BAD_TOKEN
        elif char in META_U64_FLAGS:
            value = parse_uint64(token[1:])
            if value is None:
                error = META_U64_FLAGS[char]
        elif char == 70:     # F
            value = parse_flags(token[1:])
            if value is None:
                error = error or BAD_FORMAT
        elif char == 77:     # M
            if len(token) != 2:
                error = BAD_M_LENGTH
            value = token[1:2]
        elif char == 79:     # O
            value = token
        elif char == 98:     # b
            key = base64_key(key)
            if key is None:
                error, key = BAD_KEY_ENCODING, b""
        flags[char] = value
    if error is not None:
        raise error
    if 98 not in flags:              # with b the key depends on more than the flags
        if len(_PARSED_META_FLAGS) >= META_FLAG_SETS_KEPT:
            _PARSED_META_FLAGS.clear()
        _PARSED_META_FLAGS[flag_tokens] = flags
    return key, flags


def base64_key(text):
    """A `b` flag's key decoded, or None where memcached's base64_decode fails.

    Its rules: bytes outside the alphabet are skipped, the rest (`=`
    included) must be a non-empty multiple of 4, and decoding ends with the
    first 4-byte block holding `=`, each `=` dropping one byte (3 is an error).
    """
    chars = BASE64_OTHER.sub(b"", text)
    if not chars or len(chars) % 4:
        return None
    pad_at = chars.find(b"=")
    pad = 0
    if pad_at >= 0:
        chars = chars[:pad_at - pad_at % 4 + 4]
        pad = chars.count(b"=")
        if pad > 2:
            return None
    key = binascii.a2b_base64(chars.replace(b"=", b"A"))
    return key[:len(key) - pad] or None


def meta_key(key, binary):
    """The `k` return flag: the key, or its base64 followed by ` b`."""
    if binary:
        return b"k" + binascii.b2a_base64(key, newline=False) + b" b"
    return b"k" + key


def meta_echo(flags, key, binary, cas=None):
    """The O and k return flags (and c, when `cas` is given), in request order.

    Every meta reply carries them. Raises OPAQUE_TOO_LONG for an O token
    over META_OPAQUE_MAX bytes.
    """
    out = []
    for char, arg in flags.items():
        if char == 79:
            if len(arg) > META_OPAQUE_MAX:
                raise OPAQUE_TOO_LONG
            out.append(arg)
        elif char == 107:
            out.append(meta_key(key, binary))
        elif char == 99 and cas is not None:
            out.append(b"c%d" % cas)
    return out


def meta_ttl(exptime, now):
    """The `t` return flag: seconds left (as memcached's unsigned 32-bit sum), -1 = never."""
    return b"t%d" % ((exptime - int(now)) & UINT32_MASK) if exptime else b"t-1"


def encode_stats(pairs):
    """`STAT <name> <value>` lines then END, from (name, value) pairs."""
    lines = [b"STAT %s %s\r\n" % (name.encode(), str(value).encode()) for name, value in pairs]
    lines.append(END)
    return b"".join(lines)


def stats_reply(tokens, source):
    """The reply to `stats [sub]`, memcached's: source gives general_stats() and
    settings() pairs and reset_stats(). Raises the errors memcached gives."""
    if len(tokens) == 1:
        return encode_stats(source.general_stats())
    sub = tokens[1]
    if sub == b"reset":
        source.reset_stats()
        return RESET
    if sub == b"settings":
        return encode_stats(source.settings())
    if sub == b"detail":
        mode = tokens[2] if len(tokens) > 2 else None
        if mode in (b"on", b"off"):
            return OK
        if mode == b"dump":
            return END
        raise ClientError(b"usage: stats detail on|off|dump")
    if sub in (b"items", b"slabs", b"sizes", b"conns"):
        return END     # no slab allocator: memcached's answer for an empty cache
    group = getattr(source, "stat_groups", {}).get(sub.decode("ascii", "replace"))
    if group is not None:
        return encode_stats(group())
    raise UNKNOWN


# HTTP/1.1 requests (RFC 9112), as far as a key-value store needs them: the
# head, a Content-Length or chunked body, keys from the path.
HTTP_HEAD_END = re.compile(rb"\n\r?\n")
HTTP_BLANK_LINES = re.compile(rb"[\r\n]*")
HTTP_REQUEST_START = re.compile(rb"[A-Z]+ (?:/|[Hh][Tt][Tt][Pp][Ss]?://)")
HTTP_VERSION = re.compile(rb"HTTP/(\d)\.\d\Z")
HTTP_CHUNK_SIZE = re.compile(rb"[ \t]*([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\n]*)?\r?\Z")
HTTP_CHUNK_LINE_MAX_BYTES = 4096         # a chunk size line with its extensions, a trailer
CHUNK_FRAMING_SLACK_BYTES = 64 << 10


def parse_http_head(head):
    """(method, target, minor version, headers) of a request head.

    head: bytes from the request line through the blank line; lines may end
    in CRLF or LF. headers maps lowercased names to values (bytes, stripped);
    a repeated header's values are joined with ", " (RFC 9110 5.3). Raises
    HttpError 400 for a malformed line, 505 for an HTTP major version not 1.
    """
    lines = head.split(b"\n")
    parts = lines[0].rstrip(b"\r").split(b" ")
    version = HTTP_VERSION.match(parts[-1]) if len(parts) == 3 else None
    if version is None or not parts[0] or not parts[1]:
        raise HttpError(400, b"malformed request line")
    if version.group(1) != b"1":
        raise HttpError(505)
    headers = {}
    for line in lines[1:]:
        line = line.rstrip(b"\r")
        if not line:
            continue
        if line[:1] in b" \t":
            raise HttpError(400, b"folded header line")
        name, sep, value = line.partition(b":")
        if not sep or not name or name.strip(b" \t") != name:
            raise HttpError(400, b"malformed header line")
        name, value = name.lower(), value.strip(b" \t")
        if name in headers:
            if name == b"content-length" and headers[name] != value:
                raise HttpError(400, b"conflicting Content-Length headers")
            if name != b"content-length":
                value = headers[name] + b", " + value
        headers[name] = value
    return parts[0], parts[1], int(parts[2][7:8]), headers


class ChunkedBody:
    """A chunked request body (RFC 9112 7.1), decoded as its bytes arrive.

    feed() takes what is complete and says how far it used the buffer, so
    the caller drops those bytes and each byte is parsed once. limit: the
    most data bytes accepted; the framing (sizes, extensions, trailers) may
    add up to as much again plus CHUNK_FRAMING_SLACK_BYTES.
    """

    def __init__(self, limit):
        self.limit = limit
        self.parts = []          # data of the complete chunks
        self.total = 0           # ... and its size
        self.framed = 0          # bytes of the body used so far, framing included
        self.in_trailers = False  # the last chunk is in; trailer fields follow
        self.done = False        # the body and its trailers are complete
        self.wanted = 0          # bytes past feed()'s offset needed before it can go on

    def feed(self, buf, pos):
        """Decode the complete parts of buf[pos:]; the offset up to which it used buf.

        Sets `done` at the end of the body (data: `parts`). Raises HttpError
        400 for bad framing, 413 when the declared sizes pass the limit
        (before their data is read) or the framing passes its allowance, 431
        for an oversized trailer line.
        """
        end = self._decode(buf, pos)
        self.framed += end - pos
        if self.framed > 2 * self.limit + CHUNK_FRAMING_SLACK_BYTES:
            raise HttpError(413)
        return end

    def _decode(self, buf, pos):
        while True:
            eol = buf.find(b"\n", pos, pos + HTTP_CHUNK_LINE_MAX_BYTES + 1)
            if eol < 0:
                if len(buf) - pos > HTTP_CHUNK_LINE_MAX_BYTES:
                    raise HttpError(431 if self.in_trailers else 400, b"chunk line too long")
                self.wanted = len(buf) - pos + 1
                return pos
            if self.in_trailers:       # trailer fields, up to a blank line; ignored
                line, pos = buf[pos:eol].rstrip(b"\r"), eol + 1
                if not line:
                    self.done = True
                    return pos
                continue
            size = HTTP_CHUNK_SIZE.match(buf, pos, eol)
            if size is None:
                raise HttpError(400, b"bad chunk size line")
            size = int(size.group(1), 16)
            if size == 0:
                self.in_trailers = True
                pos = eol + 1
                continue
            if self.total + size > self.limit:
                raise HttpError(413)
            end = eol + 1 + size
            tail = buf[end:end + 2]
            if tail == CRLF:
                after = end + 2
            elif tail[:1] == b"\n":
                after = end + 1
            elif tail in (b"", b"\r"):         # the data has not all arrived
                self.wanted = end + 2 - pos
                return pos
            else:
                raise HttpError(400, b"chunk data not followed by CRLF")
            self.parts.append(buf[eol + 1:end])
            self.total += size
            pos = after


def http_key(target):
    """The item key of a request target (`/key?query` or `http://host/key`), or None.

    The path after its first `/` is percent-decoded to bytes (RFC 3986); the
    query is ignored. None when the target has no path.
    """
    if target[:1] != b"/":
        scheme, sep, rest = target.partition(b"://")
        if not sep or scheme.lower() not in (b"http", b"https"):
            return None
        target = b"/" + rest.partition(b"/")[2]
    path = target.partition(b"?")[0].partition(b"#")[0]
    return urllib.parse.unquote_to_bytes(path[1:])


def if_match(header, cas):
    """Does an If-Match value (RFC 9110 13.1.1) accept an item with this cas unique?

    cas None means the item is absent: nothing matches, not even `*`.
    Weak tags never match; a bare number is taken as a tag.
    """
    if cas is None:
        return False
    tag = b"%d" % cas
    for candidate in header.split(b","):
        candidate = candidate.strip(b" \t")
        if candidate == b"*" or candidate.strip(b'"') == tag and candidate[:2] != b"W/":
            return True
    return False


# The command table: what a server, a proxy and a client need to know about a
# request without executing it (memcached's process_command_ascii as data):
# where its key is, whether a data block follows and where its length is,
# what its reply looks like, and where a proxy sends it. memcached replies are
# not self-describing, so the reply kind is what a client tells read_reply().
REPLY_LINE = 0          # one line: STORED, DELETED, a number, ...
REPLY_VALUES = 1        # VALUE blocks, then END (get, gets, gat, gats)
REPLY_META = 2          # one meta response: HD, EN, NS, ... or VA with a data block
REPLY_META_BATCH = 3    # meta responses up to and including MN (quiet mode pipelines)
REPLY_STATS = 4         # STAT lines, then END
REPLY_NONE = 5          # nothing (quit)
ERROR_PREFIXES = (b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR")
REPLY_LINE_MAX_BYTES = 8192
BLOCK_NONE, BLOCK_STORAGE, BLOCK_META = 0, 1, 2   # no data block; <bytes> at 4; datalen at 2
ROUTE_KEY, ROUTE_KEYS, ROUTE_ALL, ROUTE_LOCAL = "key", "keys", "all", "local"

CommandSpec = collections.namedtuple("CommandSpec", "name key block reply route writes")
CommandSpec.__doc__ = """One command of the text and meta protocols.

name: the command (bytes); key: index of its (first) key token, 0 for none;
block: BLOCK_*; reply: REPLY_*; route: ROUTE_* (one key, each key on its own
server, every server, or answered where it arrives); writes: it changes items.
"""


def _command_table():
    table = {}
    for names, key, block, reply, route, writes in (
            ("get gets bget", 1, BLOCK_NONE, REPLY_VALUES, ROUTE_KEYS, False),
            ("gat gats", 2, BLOCK_NONE, REPLY_VALUES, ROUTE_KEYS, True),
            ("set add replace append prepend cas", 1, BLOCK_STORAGE, REPLY_LINE, ROUTE_KEY,
             True),
            ("delete incr decr touch", 1, BLOCK_NONE, REPLY_LINE, ROUTE_KEY, True),
            ("mg", 1, BLOCK_NONE, REPLY_META, ROUTE_KEY, False),
            ("ms", 1, BLOCK_META, REPLY_META, ROUTE_KEY, True),
            ("md ma", 1, BLOCK_NONE, REPLY_META, ROUTE_KEY, True),
            ("me", 1, BLOCK_NONE, REPLY_LINE, ROUTE_KEY, False),
            ("mn", 0, BLOCK_NONE, REPLY_META, ROUTE_LOCAL, False),
            ("flush_all", 0, BLOCK_NONE, REPLY_LINE, ROUTE_ALL, True),
            ("verbosity", 0, BLOCK_NONE, REPLY_LINE, ROUTE_ALL, False),
            ("cache_memlimit", 0, BLOCK_NONE, REPLY_LINE, ROUTE_ALL, False),
            ("version shutdown", 0, BLOCK_NONE, REPLY_LINE, ROUTE_LOCAL, False),
            ("stats", 0, BLOCK_NONE, REPLY_STATS, ROUTE_LOCAL, False),
            ("quit", 0, BLOCK_NONE, REPLY_NONE, ROUTE_LOCAL, False)):
        for name in names.split():
            table[name.encode()] = CommandSpec(name.encode(), key, block, reply, route, writes)
    return table


COMMANDS = _command_table()
HTTP_REQUEST = CommandSpec(b"HTTP", 0, BLOCK_NONE, REPLY_NONE, ROUTE_LOCAL, False)


def frame_request(buf, pos):
    """Where the request at buf[pos:] ends, by memcached's framing rules.

    Returns None while its command line is incomplete and may still grow,
    else (spec, tokens, start, end, args): spec is the CommandSpec (None for
    an unknown command, HTTP_REQUEST for an HTTP request line, which starts
    at pos), tokens the line's tokens, start the offset past the line, end
    the offset past the request. A data block follows only when the line
    gives a valid length (memcached reads the next line as a command
    otherwise); end then lies past the block and its CRLF, maybe beyond buf
    (not all arrived), and args is (key, flags, exptime, nbytes, cas unique)
    for the classic storage commands, nbytes for ms; else end == start and
    args is None. Raises Disconnect for a line too long to wait for.
    """
    eol = buf.find(b"\n", pos)
    if eol < 0:
        waiting = len(buf) - pos
        if waiting > LINE_MAX_BYTES and not (
                waiting <= MULTIGET_LINE_MAX_BYTES and is_long_get(buf, pos)):
            if HTTP_REQUEST_START.match(buf, pos):          # a long URL: HTTP's limits
                return HTTP_REQUEST, None, pos, pos, None
            raise Disconnect
        return None
    tokens = split_command(buf[pos:eol])
    start = eol + 1
    spec = COMMANDS.get(tokens[0]) if tokens else None
    if spec is None or not spec.block:
        if spec is None and tokens and tokens[-1].startswith(b"HTTP/"):
            return HTTP_REQUEST, tokens, pos, pos, None
        return spec, tokens, start, start, None
    try:
        if spec.block == BLOCK_STORAGE:
            args = parse_storage(tokens)
            return spec, tokens, start, start + args[3] + 2, args
        nbytes = parse_meta_length(tokens)
        return spec, tokens, start, start + nbytes + 2, nbytes
    except ProtocolError:
        return spec, tokens, start, start, None     # the handler says why


def read_reply(buf, pos, expect):
    """Parse one reply of kind `expect` (a REPLY_* constant) at buf[pos:].

    Returns None until the whole reply is there, else (end offset, status,
    hits): status is the reply's last line without CRLF (b"END", b"STORED",
    b"MN", an error line, ...), hits a list of (key, flags, data, start, end)
    for each value it carried, start and end the offsets of its whole block
    from the start of the reply (key None for a meta VA without the k flag). An error line ends any
    reply but a quiet batch, which only MN ends. Raises BadReply for bytes
    that are not a reply.
    """
    hits = []
    first = pos
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            if len(buf) - pos > REPLY_LINE_MAX_BYTES:
                raise BadReply("reply line too long")
            return None
        line = buf[pos:eol]
        if expect == REPLY_LINE or (expect != REPLY_META_BATCH
                                    and line.startswith(ERROR_PREFIXES)):
            return eol + 2, line, hits
        if line.startswith(b"VALUE ") if expect == REPLY_VALUES else line.startswith(b"VA "):
            parts = line.split(b" ")
            try:
                if expect == REPLY_VALUES:
                    key, flags, nbytes = parts[1], int(parts[2]), int(parts[3])
                else:
                    flags, nbytes = 0, int(parts[1])
                    key = next((p[1:] for p in parts[2:] if p[:1] == b"k"), None)
            except (IndexError, ValueError):
                raise BadReply(f"bad value line {line[:80]!r}") from None
            end = eol + 2 + nbytes
            if end + 2 > len(buf):
                return None
            if buf[end:end + 2] != CRLF:
                raise BadReply("data block not followed by CRLF")
            hits.append((key, flags, buf[eol + 2:end], pos - first, end + 2 - first))
            pos = end + 2
            if expect == REPLY_META:
                return pos, b"VA", hits
        elif expect in (REPLY_VALUES, REPLY_STATS):
            if line == b"END":
                return eol + 2, line, hits
            if expect == REPLY_VALUES or not line.startswith(b"STAT "):
                raise BadReply(f"unexpected line {line[:80]!r}")
            pos = eol + 2
        elif expect == REPLY_META or line == b"MN":
            return eol + 2, line, hits
        else:
            pos = eol + 2   # HD, EN, ... inside a quiet batch


# ===== 4. Hash ring ==========================================================
#
# Key placement as twemproxy 0.5.0 (src/hashkit/) and libmemcached compute
# it, so a memtool client pool and a nutcracker with the same servers agree
# on every key: server names (the port-11211 rule), twemproxy's name order,
# ketama point counts in float32, md5 points, lower-bound search with wrap.
# Hashes use C's signed-char bytes where twemproxy does (x86 builds).

def _signed(byte):
    return byte - 256 if byte > 127 else byte


def hash_md5(key):
    return int.from_bytes(hashlib.md5(key).digest()[:4], "little")


def hash_crc32(key):
    """libmemcached's crc32: the standard CRC-32, bits 16..30 only."""
    return (zlib.crc32(key) >> 16) & 0x7FFF


def hash_crc32a(key):
    return zlib.crc32(key)


def hash_fnv1_64(key):
    h = 0xCBF29CE484222325
    for byte in key:
        h = ((h * 0x100000001B3) ^ (_signed(byte) & UINT64_MASK)) & UINT64_MASK
    return h & UINT32_MASK


def hash_fnv1a_64(key):
    """twemproxy's default: a 32-bit FNV-1a with the low halves of the 64-bit constants."""
    h = 0x84222325
    for byte in key:
        h = ((h ^ (_signed(byte) & UINT32_MASK)) * 0x1B3) & UINT32_MASK
    return h


def hash_fnv1_32(key):
    h = 2166136261
    for byte in key:
        h = ((h * 16777619) ^ (_signed(byte) & UINT32_MASK)) & UINT32_MASK
    return h


def hash_fnv1a_32(key):
    h = 2166136261
    for byte in key:
        h = ((h ^ (_signed(byte) & UINT32_MASK)) * 16777619) & UINT32_MASK
    return h


def hash_one_at_a_time(key):
    h = 0
    for byte in key:
        h = (h + _signed(byte)) & UINT32_MASK
        h = (h + (h << 10)) & UINT32_MASK
        h ^= h >> 6
    h = (h + (h << 3)) & UINT32_MASK
    h ^= h >> 11
    return (h + (h << 15)) & UINT32_MASK


def hash_murmur(key):
    """MurmurHash2 (m 0x5bd1e995, r 24), seeded with 0xdeadbeef * length; unsigned tail."""
    m, n = 0x5BD1E995, len(key)
    h = ((0xDEADBEEF * n) ^ n) & UINT32_MASK
    blocks = n >> 2
    for k in struct.unpack_from("<%dI" % blocks, key) if blocks else ():
        k = (k * m) & UINT32_MASK
        h = ((h * m) ^ (((k ^ (k >> 24)) * m) & UINT32_MASK)) & UINT32_MASK
    tail = key[blocks << 2:]
    if tail:
        for i in range(len(tail) - 1, 0, -1):
            h ^= tail[i] << (8 * i)
        h = ((h ^ tail[0]) * m) & UINT32_MASK
    h = ((h ^ (h >> 13)) * m) & UINT32_MASK
    return h ^ (h >> 15)


def _rotl(x, k):
    return ((x << k) | (x >> (32 - k))) & UINT32_MASK


def hash_jenkins(key):
    """Bob Jenkins' lookup3 hashlittle, initval 13; the last 1..12 bytes, zero-padded,
    go through the final mix."""
    n = len(key)
    a = b = c = (0xDEADBEEF + n + 13) & UINT32_MASK
    if not n:
        return c
    full = (n - 1) // 12
    words = struct.unpack("<%dI" % (3 * full + 3), key + bytes(12 * full + 12 - n))
    for i in range(0, 3 * full, 3):
        a, b, c = (a + words[i]) & UINT32_MASK, (b + words[i + 1]) & UINT32_MASK, \
            (c + words[i + 2]) & UINT32_MASK
        for x, y, z, r in ((0, 2, 1, 4), (1, 0, 2, 6), (2, 1, 0, 8),
                           (0, 2, 1, 16), (1, 0, 2, 19), (2, 1, 0, 4)):
            v = [a, b, c]
            v[x] = ((v[x] - v[y]) & UINT32_MASK) ^ _rotl(v[y], r)
            v[y] = (v[y] + v[z]) & UINT32_MASK
            a, b, c = v
    i = 3 * full
    a, b, c = (a + words[i]) & UINT32_MASK, (b + words[i + 1]) & UINT32_MASK, \
        (c + words[i + 2]) & UINT32_MASK
    for x, y, r in ((2, 1, 14), (0, 2, 11), (1, 0, 25), (2, 1, 16), (0, 2, 4), (1, 0, 14),
                    (2, 1, 24)):
        v = [a, b, c]
        v[x] = ((v[x] ^ v[y]) - _rotl(v[y], r)) & UINT32_MASK
        a, b, c = v
    return c


def hash_hsieh(key):
    """Paul Hsieh's SuperFastHash started at 0 (not the length); 0 for an empty key.
    In a 3-byte tail the last byte is a signed char."""
    n = len(key)
    if not n:
        return 0
    h, blocks = 0, n >> 2
    words = struct.unpack_from("<%dH" % (2 * blocks), key) if blocks else ()
    for i in range(0, 2 * blocks, 2):
        h += words[i]
        h = ((h << 16) ^ (words[i + 1] << 11) ^ h) & UINT32_MASK
        h += h >> 11
    h &= UINT32_MASK
    tail = key[blocks << 2:]
    if len(tail) == 3:
        h = (h + tail[0] + (tail[1] << 8)) & UINT32_MASK
        h ^= (h << 16) & UINT32_MASK
        h ^= (_signed(tail[2]) << 18) & UINT32_MASK
        h += h >> 11
    elif len(tail) == 2:
        h = (h + tail[0] + (tail[1] << 8)) & UINT32_MASK
        h ^= (h << 11) & UINT32_MASK
        h += h >> 17
    elif tail:
        h = (h + tail[0]) & UINT32_MASK
        h ^= (h << 10) & UINT32_MASK
        h += h >> 1
    h &= UINT32_MASK
    for shift, xor in ((3, True), (5, False), (4, True), (17, False), (25, True), (6, False)):
        h = (h ^ (h << shift)) & UINT32_MASK if xor else (h + (h >> shift)) & UINT32_MASK
    return h


def _crc16_table():
    table = []
    for i in range(256):
        c = i << 8
        for _ in range(8):
            c = (c << 1) ^ 0x1021 if c & 0x8000 else c << 1
        table.append(c & 0xFFFF)
    return table


_CRC16_TABLE = _crc16_table()


def hash_crc16(key):
    """CRC-16/XMODEM (poly 0x1021, init 0), but the running value is not masked to
    16 bits and is returned whole (twemproxy's)."""
    table, crc = _CRC16_TABLE, 0
    for byte in key:
        crc = ((crc << 8) & UINT32_MASK) ^ table[((crc >> 8) ^ byte) & 0xFF]
    return crc


HASHES = {"one_at_a_time": hash_one_at_a_time, "md5": hash_md5, "crc16": hash_crc16,
          "crc32": hash_crc32, "crc32a": hash_crc32a, "fnv1_64": hash_fnv1_64,
          "fnv1a_64": hash_fnv1a_64, "fnv1_32": hash_fnv1_32, "fnv1a_32": hash_fnv1a_32,
          "hsieh": hash_hsieh, "murmur": hash_murmur, "jenkins": hash_jenkins}
DISTRIBUTIONS = ("ketama", "modula", "random")
KETAMA_POINTS_PER_SERVER = 160


def _f32(x):
    return struct.unpack("f", struct.pack("f", x))[0]


def server_name(host, port, name=None):
    """The string hashed onto the ring: the name if given, the host alone for
    port 11211 (libmemcached's rule), else host:port, never resolved."""
    if name:
        return name
    return host if port == 11211 else f"{host}:{port}"


def hash_tag_key(key, tag):
    """The part of key that is hashed under a two-byte hash_tag such as b"{}": the
    bytes between the first opening byte and the first closing one after it,
    when there are any; else the whole key (twemproxy's rule)."""
    start = key.find(tag[:1])
    if start >= 0:
        end = key.find(tag[1:], start + 1)
        if end > start + 1:
            return key[start + 1:end]
    return key


class Continuum:
    """Which server owns a key (twemproxy's nc_ketama.c / nc_modula.c).

    servers: list of (name, weight) in any order; twemproxy orders them by
    (name length, name bytes), and index() answers positions in the list
    as given. hash_name: a HASHES key. distribution: one of DISTRIBUTIONS
    (random: any server, weights ignored). hash_tag: two bytes (b"{}") or
    None, see hash_tag_key(). Raises ConfigError for an unknown hash or
    distribution.
    """

    def __init__(self, servers, hash_name="fnv1a_64", distribution="ketama", hash_tag=None):
        if hash_name not in HASHES:
            raise ConfigError(f"unknown hash {hash_name!r}; known: {', '.join(HASHES)}")
        if distribution not in DISTRIBUTIONS:
            raise ConfigError(f"unknown distribution {distribution!r}")
        self.hash = HASHES[hash_name]
        self.hash_tag = hash_tag
        self.count = len(servers)
        self.random = distribution == "random"
        order = sorted(range(len(servers)), key=lambda i: (len(servers[i][0]), servers[i][0]))
        if distribution != "ketama":
            self.slots = [i for i in order for _ in range(servers[i][1])]
            self.points = None
            return
        total = sum(weight for _, weight in servers)
        ring = []
        for i in order:
            name, weight = servers[i]
            share = _f32(_f32(weight) / _f32(total))
            count = _f32(_f32(_f32(share * KETAMA_POINTS_PER_SERVER) / 4) * _f32(len(servers)))
            for k in range(int(_f32(count + 1e-10))):
                digest = hashlib.md5(f"{name}-{k}".encode()).digest()
                ring.extend((int.from_bytes(digest[j:j + 4], "little"), i) for j in (0, 4, 8, 12))
        ring.sort()
        self.points = [value for value, _ in ring]
        self.owners = [owner for _, owner in ring]

    def index(self, key):
        """Position in the server list of the server that owns key (bytes)."""
        if self.count == 1:
            return 0
        if self.random:
            return random.randrange(self.count)
        return self.at(self.key_hash(key))

    def key_hash(self, key):
        """The hash value placement uses for key (after hash_tag; 0 for empty)."""
        if self.hash_tag:
            key = hash_tag_key(key, self.hash_tag)
        return self.hash(key) if key else 0

    def at(self, value):
        """Position of the server owning hash value `value`."""
        if self.points is None:
            return self.slots[value % len(self.slots)]
        i = bisect.bisect_left(self.points, value)
        return self.owners[i if i < len(self.owners) else 0]

    def point(self, value):
        """The ring point (ketama) or slot (modula) that value lands on."""
        if self.points is None:
            return value % len(self.slots)
        i = bisect.bisect_left(self.points, value)
        return self.points[i if i < len(self.points) else 0]


# ===== 5. Storage ============================================================
#
# Store is the item model (expiry, cas, flush_all, LRU) over an engine, the
# store of record on disk. Every change is handed to `journal` (the update
# log, section 6) as an *effect* Record before it is applied:
#
#     OP_SET    key flags exptime cas value   (every write: set/add/replace/cas,
#                                              the result of append/prepend/incr/
#                                              decr, touch; the op byte's high
#                                              nibble holds the item's
#                                              PERSISTED_STATE bits)
#     OP_DELETE key                           (leaves a tombstone)
#     OP_FLUSH  exptime=deadline (0 = at once)
#     OP_RTS    key=source address, value=its rts (section 10): how far
#               this server has applied that source's log
#     OP_TOUCH  key exptime                   (read in logs of the release
#                                              before stamps; no longer written)
#
# Effects rather than commands: replaying a record twice gives the same
# state, so the store may lag the log safely, and a replica applies exactly
# what the origin stored. exptime in a record is always absolute (0 =
# never). Changes reach the engine in checkpoints (every CHECKPOINT_SECONDS
# or CHECKPOINT_ITEMS keys), each with the log position it covers, so a
# busy key costs one disk write per checkpoint and recovery replays the log
# from that position. Store methods return status constants; only the
# server turns them into reply lines.
#
# Every record and item carries a stamp, microseconds << 32 | origin sid,
# from a hybrid logical clock (Store.stamp_now: never behind the newest stamp
# the server has seen). Replicas apply another server's records by the
# stamp rule (apply_remote): the higher stamp wins, for writes and deletes
# alike (a delete leaves a TOMBSTONE holding its stamp for --tombstone-ttl,
# as does an item that expired), and a flush_all kills the items stamped
# before it (before its deadline, when delayed). cas uniques stay local.

OP_SET, OP_DELETE, OP_TOUCH, OP_FLUSH, OP_RTS = 1, 2, 3, 4, 5
ST_STORED, ST_NOT_STORED, ST_EXISTS, ST_NOT_FOUND, ST_DELETED, ST_NON_NUMERIC = range(6)
STAMP_SID_BITS = 32                     # stamp = microseconds << 32 | origin sid
CLOCK_AHEAD_MAX_US = 86400 * 10 ** 6    # a remote stamp moves our clock at most this far
                                        # past our time

# Item.state bits, memcached's it_flags that the meta protocol shows.
STALE = 1               # invalidated by `md I` or a stale `ms I` write (mg shows X)
KEY_BINARY = 2          # the key arrived base64 (`b`) or is not a text key: echo it encoded
TOKEN_SENT = 4          # a client holds the recache token (mg shows Z, not W)
TOMBSTONE = 8           # not an item: a delete, remembered with its stamp (replication)
PERSISTED_STATE = STALE | KEY_BINARY   # the bits kept on disk and in the ulog

RECORD_HEADER = struct.Struct("<IqQ")   # flags, exptime, cas unique: before the data
RECORD_STATE_SHIFT = 62                 # the stored cas field's top bits hold PERSISTED_STATE,
RECORD_STAMPED = 1 << 61                # ... then: a RECORD_STAMP follows the header,
RECORD_TOMBSTONE = 1 << 60              # ... the row is a tombstone
RECORD_CAS_MASK = (1 << 60) - 1         # cas uniques never get near 2**60
RECORD_STAMP = struct.Struct("<QI")     # the stamp: microseconds, origin sid
RECORD_STAMPED_HEAD = struct.Struct("<IqQQI")   # the two, packed at once (a stamped row's head)
RECORD_HEAD_BYTES = RECORD_STAMPED_HEAD.size   # what a scan reads of a row
META_KEY = b"memtool:meta:" + b"." * KEY_MAX_LENGTH  # longer than any client key
CACHE_ITEM_OVERHEAD = 320               # bytes of Python objects per cached item beyond its
                                        # key and reply bytes (measured: 474 per 100-byte item)
CACHE_ABSENT_OVERHEAD = 150             # ... per remembered miss, beyond its key
ABSENT = False                          # cache entry: the engine has no such key
UNPLACED = float("-inf")                # Item.placed of one replaced in place: see _cache_put
CHECKPOINT_SECONDS = 1.0                # write changes to the engine at least this often
                                        # (rows of one batch share B-tree pages: at 0.1 s the
                                        # 1 KiB pipelined load ran 0.8x as fast)
CHECKPOINT_ITEMS = 50000                # ... or once this many keys changed (among 1M
                                        # keys, 10,000 rows cost a page each: sets ran 0.8x)
CHECKPOINT_PENDING_MAX = 2 * CHECKPOINT_ITEMS  # past this, the loop waits for the writer
STORE_COUNTERS = ("get_expired", "get_flushed", "evictions", "reclaimed", "total_items",
                  "expired_unfetched", "evicted_unfetched")
ENGINES = ("sqlite", "gnu", "ndbm", "dumb", "memory")
ENGINE_FILE = "ENGINE"                  # in the data directory: which engine wrote it
MISSING = object()                      # no entry for the key (pending, writing, undo)
DAMAGED_KEYS_LOGGED = 100               # undecodable rows named in the log, then counted
CHECKPOINT_RETRY_SECONDS = 1.0          # a checkpoint the engine refused is tried again
SQLITE_CACHE_MIN_BYTES = 2 << 20        # SQLite's page cache per connection: its default,
SQLITE_CACHE_SHARE = 8                  # or 1/8 of -m when that is more
SQLITE_IN_KEYS = 500                    # keys per `IN (...)` query
EVICT_SECOND_CHANCES = 64               # recently fetched items passed over per eviction
STORE_UNREADABLE = ServerError.refusal(b"cannot read the store")


class Record(collections.namedtuple("Record", "stamp op key flags exptime cas value")):
    """One effect: what the update log holds and replay, replication and the
    stream (section 10) carry and apply.

    stamp: microseconds << 32 | origin sid (Store.stamp_now). op: an OP_* in
    the low nibble, the item's PERSISTED_STATE bits in the high one. exptime:
    absolute unix seconds, 0 = never (OP_FLUSH: its deadline, 0 = at once).
    cas: the cas unique on the server whose log holds the record (it means
    nothing elsewhere). key, value: bytes.
    """

    __slots__ = ()

    @property
    def ts(self):
        """Microseconds since the epoch."""
        return self.stamp >> STAMP_SID_BITS

    @property
    def sid(self):
        """The origin server's --sid."""
        return self.stamp & UINT32_MASK


class Item:
    """One item: flags (u32), exptime (absolute unix seconds, 0 = never), cas unique (u64).

    `rendered` is the exact `get` reply block for it, built once when it is
    stored, because formatting on every get costs more than the memory.
    `size` is what `stats bytes` counts for it: key + record header + data.
    `state` holds the STALE/KEY_BINARY/TOKEN_SENT bits. `atime` is the unix
    time of the last fetch, or minus the time it was stored while it has not
    been fetched: memcached's ITEM_FETCHED bit rides in the sign, so a get
    pays one attribute store for both. `placed` is when it last went to the
    young end of the Store's cache (for CLOCK eviction; UNPLACED for one
    that took its key's place there). `stamp` is the
    stamp of the write that made it, microseconds << 32 | origin sid (0 for
    items stored before stamps): the last writer wins on it. A TOMBSTONE
    Item is a remembered delete, with exptime the end of its memory.
    """

    __slots__ = ("flags", "exptime", "cas", "rendered", "vstart", "size", "state", "atime",
                 "placed", "stamp")

    def __init__(self, key, flags, exptime, cas, value, state=0, stamp=0):
        self.flags = flags
        self.exptime = exptime
        self.cas = cas
        self.state = state
        self.stamp = stamp
        self.atime = 0
        self.placed = 0.0
        self.rendered = b"VALUE %b %d %d\r\n%b\r\n" % (key, flags, len(value), value)
        self.vstart = len(self.rendered) - len(value) - 2
        self.size = len(key) + RECORD_HEADER.size + len(value)

    @property
    def value(self):
        return self.rendered[self.vstart:-2]

    @property
    def nbytes(self):
        """Length of the data, without copying it."""
        return len(self.rendered) - self.vstart - 2

    def gets_block(self):
        """The `gets` block as (header with the cas unique, data): the data is not copied."""
        return (b"%b %d\r\n" % (self.rendered[:self.vstart - 2], self.cas),
                memoryview(self.rendered)[self.vstart:])

    def record(self):
        """The bytes stored on disk: RECORD_HEADER (the state and the STAMPED and
        TOMBSTONE marks in the cas field's top bits), RECORD_STAMP, the data."""
        cas = self.cas | (self.state & PERSISTED_STATE) << RECORD_STATE_SHIFT | RECORD_STAMPED
        if self.state & TOMBSTONE:
            cas |= RECORD_TOMBSTONE
        # one pack and a slice: half the time of a join of three parts (checkpoints
        # make one per changed key, holding the GIL)
        stamp = self.stamp
        return (RECORD_STAMPED_HEAD.pack(self.flags, self.exptime, cas, stamp >> STAMP_SID_BITS,
                                         stamp & UINT32_MASK) + self.rendered[self.vstart:-2])

    @classmethod
    def from_record(cls, key, record):
        """The Item of a stored row (rows written before stamps have none: 0).
        Raises struct.error or TypeError for a row that does not decode."""
        flags, exptime, cas = RECORD_HEADER.unpack_from(record)
        start, stamp, state = RECORD_HEADER.size, 0, (cas >> RECORD_STATE_SHIFT)
        if cas & RECORD_STAMPED:
            ts, sid = RECORD_STAMP.unpack_from(record, start)
            start, stamp = start + RECORD_STAMP.size, ts << STAMP_SID_BITS | sid
            if cas & RECORD_TOMBSTONE:
                state |= TOMBSTONE
        return cls(key, flags, exptime, cas & RECORD_CAS_MASK, record[start:], state, stamp)


def row_facts(key, length, head):
    """What an engine row is, from its length and its first RECORD_HEAD_BYTES:
    (size as Item.size counts it, exptime, cas unique, stamp, is a tombstone).
    Raises struct.error or TypeError for a row that does not decode."""
    flags, exptime, cas = RECORD_HEADER.unpack_from(head)
    size, stamp = len(key) + length, 0
    if cas & RECORD_STAMPED:
        ts, sid = RECORD_STAMP.unpack_from(head, RECORD_HEADER.size)
        size, stamp = size - RECORD_STAMP.size, ts << STAMP_SID_BITS | sid
    return size, exptime, cas & RECORD_CAS_MASK, stamp, bool(cas & RECORD_TOMBSTONE)


class SqliteEngine:
    """The default store: SQLite with Python 3.13's dbm.sqlite3 table.

    WAL with synchronous=NORMAL: a commit does not fsync, because the update
    log is the durable record and replays whatever a crash lost here.
    """

    errors = (OSError, sqlite3.Error)    # what its calls raise when the file fails

    def __init__(self, path, cache_bytes=SQLITE_CACHE_MIN_BYTES):
        self.path = path + ".sqlite3"
        self.cache_bytes = cache_bytes       # SQLite's page cache for this connection
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        # a TEXT value (not ours) comes back as a str, which no row decodes from
        self.db.text_factory = lambda data: data.decode("utf-8", "replace")
        self.db.execute("PRAGMA journal_mode = wal")
        self.db.execute("PRAGMA synchronous = NORMAL")
        self.db.execute("PRAGMA cache_size = -%d" % (cache_bytes >> 10))
        self.db.execute("CREATE TABLE IF NOT EXISTS Dict ("
                        "key BLOB UNIQUE NOT NULL, value BLOB NOT NULL)")
        if not os.access(self.path, os.W_OK):   # say so now, not at the first checkpoint
            raise OSError(errno.EACCES, "the store file is read-only", self.path)

    def get(self, key):
        row = self.db.execute("SELECT value FROM Dict WHERE key = CAST(? AS BLOB)",
                              (key,)).fetchone()
        return None if row is None else row[0]

    def head(self, key):
        """(length, first RECORD_HEAD_BYTES) of key's row, or None: see row_facts."""
        return self.db.execute("SELECT length(value), substr(value, 1, %d) FROM Dict WHERE "
                               "key = CAST(? AS BLOB)" % RECORD_HEAD_BYTES, (key,)).fetchone()

    def write(self, puts, deletes):
        """Store puts [(key, value)] and drop deletes [key] in one transaction;
        on an error nothing of it is kept."""
        try:
            self.db.execute("BEGIN")
            self.db.executemany("DELETE FROM Dict WHERE key = CAST(? AS BLOB)",
                                [(key,) for key in deletes])
            # an upsert updates a row in place, where REPLACE deletes and inserts it
            self.db.executemany("INSERT INTO Dict (key, value) VALUES (CAST(? AS BLOB), "
                                "CAST(? AS BLOB)) ON CONFLICT (key) DO UPDATE SET "
                                "value = excluded.value", puts)
            self.db.execute("COMMIT")
        except sqlite3.Error:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise

    def heads(self, keys):
        """{key: (length, first RECORD_HEAD_BYTES)} for those of keys the store has."""
        found, keys = {}, list(keys)
        for i in range(0, len(keys), SQLITE_IN_KEYS):
            chunk = keys[i:i + SQLITE_IN_KEYS]
            found.update((key, (length, head)) for key, length, head in self.db.execute(
                "SELECT key, length(value), substr(value, 1, %d) FROM Dict WHERE key IN (%s)"
                % (RECORD_HEAD_BYTES, ",".join(["CAST(? AS BLOB)"] * len(chunk))), chunk))
        return found

    def clone(self):
        """Another connection to the same file, for the checkpoint writer thread."""
        return SqliteEngine(self.path[:-len(".sqlite3")], self.cache_bytes)

    def scan(self, after, limit, whole=False, max_bytes=None):
        """Up to `limit` (key, length, first RECORD_HEAD_BYTES) rows with key > after,
        in key order; with `whole`, (key, record) pairs, ending with the one that
        reaches max_bytes of records."""
        cursor = self.db.execute(
            "SELECT key, %s FROM Dict WHERE key > CAST(? AS BLOB) ORDER BY key LIMIT ?"
            % ("value" if whole else "length(value), substr(value, 1, %d)" % RECORD_HEAD_BYTES),
            (after, limit))
        return list(cursor) if max_bytes is None else take_bytes(cursor, max_bytes)

    def count(self):
        """(number of pairs, bytes of keys and values), the meta row included."""
        n, total = self.db.execute(
            "SELECT COUNT(*), SUM(length(key) + length(value)) FROM Dict").fetchone()
        return n, total or 0

    def close(self):
        self.db.close()


def take_bytes(pairs, max_bytes):
    """The (key, record) pairs up to the one with which the records reach max_bytes."""
    out, size = [], 0
    for pair in pairs:
        out.append(pair)
        size += len(pair[1])
        if size >= max_bytes:
            break
    return out


class DbmEngine:
    """A dbm.gnu, dbm.ndbm or dbm.dumb file as the store.

    dbm has no transactions: write() applies the batch and syncs, and the
    meta record written last says how far the log is applied. Replaying
    effects from an older position is harmless, so a crash in between loses
    nothing, as long as the module's own sync is atomic. dbm.dumb's is not:
    it rewrites its whole index file in place, so a kill -9 during a
    checkpoint can lose any item (the server says so when it opens one).
    """

    def __init__(self, path, module_name):
        module = importlib.import_module("dbm." + module_name)
        self.errors = (OSError, module.error)   # what its calls raise when the file fails
        self.path = f"{path}.{module_name}"
        try:
            self.db = module.open(self.path, "c")
        except (ValueError, SyntaxError, module.error) as err:   # dumb's index may not parse
            raise OSError(str(err)) from None
        if module_name == "dumb":
            log.warning("engine dumb: Python's dbm.dumb rewrites its index in place, so a "
                        "crash (kill -9, power loss) during a checkpoint can lose items; "
                        "use the sqlite engine for data that matters")
        self.scan_keys = []      # sorted key snapshot the sweep walks through

    def get(self, key):
        return self.db.get(key)

    def head(self, key):
        value = self.db.get(key)
        return None if value is None else (len(value), value[:RECORD_HEAD_BYTES])

    def heads(self, keys):
        found = {}
        for key in keys:
            value = self.db.get(key)
            if value is not None:
                found[key] = (len(value), value[:RECORD_HEAD_BYTES])
        return found

    @staticmethod
    def clone():
        """None: a dbm file is written from the loop's thread only."""
        return None

    def write(self, puts, deletes):
        for key in deletes:
            try:
                del self.db[key]
            except KeyError:
                pass
        for key, value in puts:
            self.db[key] = value
        sync = getattr(self.db, "sync", None)   # dbm.ndbm has none
        if sync is not None:
            sync()

    def scan(self, after, limit, whole=False, max_bytes=None):
        if not after:
            self.scan_keys = sorted(self.db.keys())
        keys = self.scan_keys
        rows = ((key, self.db.get(key))
                for key in itertools.islice(keys, bisect.bisect_right(keys, after), None))
        rows = itertools.islice(((key, value) if whole else
                                 (key, len(value), value[:RECORD_HEAD_BYTES])
                                 for key, value in rows if value is not None), limit)
        return list(rows) if max_bytes is None else take_bytes(rows, max_bytes)

    def count(self):
        n = total = 0
        for key in self.db.keys():
            n += 1
            total += len(key) + len(self.db[key])
        return n, total

    def close(self):
        self.db.close()


def available_engines():
    """The ENGINES whose modules import on this Python."""
    names = []
    for name in ENGINES:
        if name in ("gnu", "ndbm"):
            try:
                importlib.import_module("dbm." + name)
            except ImportError:
                continue
        names.append(name)
    return names


def open_engine(name, data_dir, memory_limit=0):
    """The engine called `name` (one of ENGINES) storing under data_dir/store.*;
    memory_limit (bytes, -m) sizes SQLite's page cache.

    Returns None for 'memory'. Raises ConfigError when the dbm module behind
    the name is missing from this Python (naming the engines that are
    there), and StoreUnreadable when the store file cannot be opened.
    """
    if name == "memory":
        return None
    base = os.path.join(data_dir, "store")
    try:
        if name == "sqlite":
            return SqliteEngine(base, max(SQLITE_CACHE_MIN_BYTES,
                                          memory_limit // SQLITE_CACHE_SHARE))
        return DbmEngine(base, name)
    except ImportError:
        raise ConfigError(f"engine {name!r} needs dbm.{name}, which this Python lacks; "
                          f"available engines: {', '.join(available_engines())}") from None
    except (OSError, sqlite3.Error) as err:
        raise StoreUnreadable(data_dir, name, err) from None


def store_files(data_dir):
    """Names of the store files in data_dir (any engine's)."""
    try:
        return sorted(n for n in os.listdir(data_dir) if n.startswith("store."))
    except FileNotFoundError:
        return []


def recorded_engine(data_dir):
    """The engine whose data data_dir holds: its ENGINE_FILE, else the engine
    whose store file is there (directories from before the file); None when new.

    Raises ConfigError when there is no ENGINE_FILE and several engines' files.
    """
    try:
        with open(os.path.join(data_dir, ENGINE_FILE)) as f:
            return f.read().strip()
    except FileNotFoundError:
        pass
    found = {name.split(".")[1] for name in store_files(data_dir)}
    found = sorted({"sqlite3": "sqlite"}.get(engine, engine) for engine in found)
    if len(found) > 1:
        raise ConfigError(f"{data_dir} holds stores of several engines ({', '.join(found)}) "
                          f"and no {ENGINE_FILE} file saying which is in use: move the "
                          f"others away, or write the engine's name into {ENGINE_FILE}")
    return found[0] if found else None


def record_engine(data_dir, engine):
    """Write data_dir's ENGINE_FILE (atomically)."""
    path = os.path.join(data_dir, ENGINE_FILE)
    with open(path + ".tmp", "w") as f:
        f.write(engine + "\n")
    os.replace(path + ".tmp", path)


def prepare_data_dir(data_dir, engine):
    """Make sure data_dir can take `engine`'s data: create it and record the engine.

    Raises ConfigError when data_dir is not a directory or holds another
    engine's store. With 'memory' nothing is created; a directory holding
    data gets a warning that none of it is used.
    """
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise ConfigError(f"--data {data_dir}: not a directory")
    recorded = recorded_engine(data_dir)
    if engine == "memory":
        if recorded or os.path.isdir(os.path.join(data_dir, "ulog")):
            log.warning("--engine memory: nothing in %s is read or kept", data_dir)
        return
    if recorded and recorded != engine:
        raise ConfigError(f"{data_dir} holds a {recorded} store, not {engine}: start with "
                          f"--engine {recorded}, or convert it with `memtool.py check --data "
                          f"{data_dir} --convert {engine}`")
    os.makedirs(data_dir, exist_ok=True)
    if recorded is None:
        record_engine(data_dir, engine)


class CheckpointWriter(threading.Thread):
    """Writes checkpoints off the event loop, on a connection of its own, one at
    a time: sqlite3 releases the GIL while SQLite works, and the records are
    made row by row as SQLite asks for them, so the loop gets the GIL often.

    submit(batch, unknown, meta) starts one (see write_checkpoint). `result`
    is None while it runs, then write_checkpoint's (done, error, corrections).
    """

    def __init__(self, engine):
        super().__init__(name="memtool-checkpoint", daemon=True)
        self.engine = engine             # its own connection to the store
        self.jobs = queue.Queue()        # (batch, unknown, meta), or None to stop
        self.result = None               # the outcome of the last job, once done
        self.done = threading.Event()    # set when no job is under way
        self.done.set()

    def submit(self, batch, unknown, meta):
        self.result = None
        self.done.clear()
        self.jobs.put((batch, unknown, meta))

    def wait(self):
        """Block until the job under way is done."""
        self.done.wait()

    def stop(self):
        """Finish the job under way, then end."""
        self.jobs.put(None)
        self.join()
        self.engine.close()

    def run(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                self.result = write_checkpoint(self.engine, *job)
            except Exception as err:         # a bug: say so, and keep the batch
                log.exception("checkpoint writer: unexpected error")
                self.result = (False, err, (0, 0))
            self.done.set()


def write_checkpoint(engine, batch, unknown, meta):
    """Write batch (key -> Item, None: deleted) and the meta record in one engine
    transaction. unknown: keys written blind, counted as new items in meta
    (dict): those the engine has are counted out again. Returns (done, the
    engine's error or None, (items, bytes) corrections for the counts)."""
    try:
        found = [size for size, tombstone in
                 (_row_size(key, *row) for key, row in engine.heads(unknown).items())
                 if not tombstone] if unknown else ()
        corrections = (-len(found), -sum(found))
        meta = dict(meta, items=meta["items"] + corrections[0],
                    bytes=meta["bytes"] + corrections[1])
        # in key order: neighbouring rows share B-tree pages (about 1.5x faster);
        # keys, not items, sorted: the sort holds the GIL (50,000 keys: 11 ms, not 26)
        in_order = ((key, batch[key]) for key in sorted(batch))
        puts = itertools.chain(((key, item.record()) for key, item in in_order
                                if item is not None),
                               ((META_KEY, json.dumps(meta).encode()),))
        engine.write(puts, [key for key, item in batch.items() if item is None])
    except engine.errors as err:
        return False, err, (0, 0)
    return True, None, corrections


def _row_size(key, length, head):
    """(size, is a tombstone) of an engine row; a row that does not decode
    holds no item, as Store._decode treats it."""
    try:
        size, _, _, _, tombstone = row_facts(key, length, head)
    except (struct.error, TypeError):
        return 0, True
    return size, tombstone


def deadline_stamp(deadline):
    """The stamp a delayed flush_all takes effect at: its deadline (unix seconds)."""
    return deadline * 1000000 << STAMP_SID_BITS


class Store:
    """Items with memcached semantics over an engine (None = memory only).

    memory_limit: bytes. For the memory engine it bounds the items (least
    recently used are evicted, counted in `evictions`) and the tombstones
    (evicted first); for disk engines it bounds the read cache in front of
    the engine. item_size_max: bytes, as memcached -I. journal(stamp, op,
    key, flags, exptime, cas, value), a Record's fields (no Record is made
    on the busiest path), receives each effect before it is applied; with
    `undoable` it may refuse it by raising (a ServerError while the log
    cannot be written): nothing has changed then, and the changes journaled
    since the last commit() form a batch that rollback() undoes. sid: this
    server's id, in the stamps of its changes. tombstone_ttl: seconds a
    delete (or an expired item) is remembered with its stamp, 0 = not at
    all. `now` is the store's clock (unix seconds): the server sets it once
    per loop pass with tick(), replay to each record's time. Raises
    StoreUnreadable when the engine's meta record cannot be read.
    """

    def __init__(self, engine=None, memory_limit=MEMORY_LIMIT_MB_DEFAULT << 20,
                 item_size_max=ITEM_SIZE_MAX_DEFAULT, journal=None, undoable=False, sid=1,
                 tombstone_ttl=TOMBSTONE_TTL_DEFAULT):
        self.engine = engine                  # store of record, or None
        self.memory_limit = memory_limit      # bytes for cached/held items
        self.item_size_max = item_size_max    # -I, bytes
        self.journal = journal                # effect sink (the update log) or None
        self.undoable = undoable              # the journal may refuse: keep undo records
        self.sid = sid                        # --sid, in our stamps
        self.tombstone_ttl = tombstone_ttl    # seconds a delete is remembered
        self.cache = collections.OrderedDict()  # key -> Item or ABSENT, least recent first
        self.cache_bytes = 0                  # estimated memory of `cache` and `tombstones`
        self.tombstones = collections.OrderedDict()  # memory engine: key -> tombstone Item,
                                              # oldest first
        self.pending = {}                     # key -> Item (a tombstone too), or None for a
                                              # row to drop, not yet written to the engine
        self.writing = None                   # the batch the writer thread is writing
        self.writing_position = None          # ... and the log position it covers
        self.writing_unknown = None           # ... and its keys of unknown earlier presence
        self.unknown = set()                  # keys written blind (set): counted as new
                                              # items, their checkpoint corrects the counts
        self.writer = None                    # the CheckpointWriter, see start_writer()
        self.checkpointed = now()             # when pending was last written
        self.now = now()                      # unix seconds, set by tick()
        self.get_expired = self.get_flushed = 0   # memcached counters (STORE_COUNTERS)
        self.evictions = self.reclaimed = self.total_items = 0
        self.expired_unfetched = self.evicted_unfetched = 0
        self.curr_items = self.bytes = 0      # items on disk (or held) and their bytes
        self.undo = None                      # while a batch is open: key -> (pending entry
                                              # or MISSING, its exptime and stamp, key in
                                              # unknown) before it changed
        self.undo_counts = None               # ... and the counters and flush state before
        self.damaged = set()                  # keys whose engine rows do not decode
        self.checkpoint_error = None          # why the last checkpoint failed, or None
        meta = self._read_meta() if engine is not None else {}
        self.last_cas = meta.get("cas", 0)    # last cas unique handed out
        self.clock = meta.get("clock", 0)     # microseconds of the newest stamp seen
        self.skew_warned = False              # a stamp far ahead was logged
        self.flush_stamp = meta.get("flush_stamp", 0)  # items stamped below it are flushed
        self.flush_last = meta.get("flush_last", 0)    # the stamp of the latest flush_all
        pending = meta.get("flush_pending") or (
            meta.get("flush_deadline") and [0, meta["flush_deadline"]])  # release 1's form
        self.flush_pending = tuple(pending) if pending else None  # (stamp, deadline) of a
                                              # delayed flush_all yet to take effect
        self.flush_cas = meta.get("flush_cas", 0)  # rows from before stamps with a smaller
                                              # cas unique are flushed
        self.rts = meta.get("rts", {})        # source address -> "sid file offset" applied
        self.lost = meta.get("lost")          # [after, before] µs: our changes a restore
                                              # may have lost, until the peers sent them
        self.log_position = meta.get("ulog")  # [file name, offset] of the log's end
        self.log_last = meta.get("ulog_last")  # [stamp, frame length] of the record before
        self.checkpoint_position = self.log_position  # what the engine covers
        self.sweep_after = b""                # sweep cursor: last key checked
        self.meta_dirty = False               # flush state changed since the checkpoint

    # -- reads ---------------------------------------------------------------

    def get(self, key, fetch=True):
        """The live Item for key, or None (expired and flushed items vanish here).

        fetch: count this as a client read (memcached's do_item_bump): LRU
        position and last access time (Item.atime). Writes look items up
        with fetch=False, as memcached's DONT_UPDATE.
        """
        item = self.cache.get(key)
        if not item:
            if item is ABSENT:
                return None
            item = self._load(key)
            if item is None:
                return None
        elif (item.exptime and item.exptime <= self.now) or item.stamp < self.flush_stamp:
            self._reap(key, item)
            return None
        if fetch:
            item.atime = self.now
        return item

    def fetched(self, key, item):
        """Count a read of an item looked up with get(fetch=False)."""
        item.atime = self.now

    # -- storage commands ----------------------------------------------------

    # The classic storage commands, as status constants. set is the busiest
    # command and skips store()'s lookup of the old item; the rest are its modes.

    def set(self, key, flags, exptime, value):
        self._write_blind(key, flags, self.absolute(exptime) if exptime else 0, value)
        return ST_STORED

    def add(self, key, flags, exptime, value):
        return self.store(b"E", key, flags, exptime, value)[0]

    def replace(self, key, flags, exptime, value):
        return self.store(b"R", key, flags, exptime, value)[0]

    def append(self, key, flags, exptime, value):
        """Add value after the item's data; flags and exptime are ignored (memcached)."""
        return self.store(b"A", key, flags, exptime, value)[0]

    def prepend(self, key, flags, exptime, value):
        """Add value before the item's data; flags and exptime are ignored (memcached)."""
        return self.store(b"P", key, flags, exptime, value)[0]

    def cas(self, key, flags, exptime, value, cas_unique):
        return self.store(b"S", key, flags, exptime, value, cas_unique)[0]

    def store(self, mode, key, flags, exptime, value, cas_unique=None, invalidate=False,
              state=0):
        """The meta `ms` write (memcached do_store_item): (status, new Item or None).

        mode: b"S" set, b"E" add, b"A" append, b"P" prepend, b"R" replace.
        cas_unique (None = none; 0 never matches) turns set/replace into cas;
        a non-zero one guards append/prepend. With `invalidate`, a cas older
        than the item's still stores, as a STALE item keeping the old exptime
        (mg then shows X).
        """
        old = self.get(key, False)
        if old is None:
            if cas_unique is not None and mode in b"SR":
                return ST_NOT_FOUND, None
            if mode in b"APR":
                return ST_NOT_STORED, None
            return ST_STORED, self._write(key, flags, self.absolute(exptime), value, None,
                                          state=state)
        if mode == b"E":
            return ST_NOT_STORED, None
        if mode in b"AP":
            if cas_unique and cas_unique != old.cas:
                return ST_EXISTS, None
            return self._concat(key, value, mode == b"A")
        exptime = self.absolute(exptime)
        if cas_unique is not None and cas_unique != old.cas:
            if not (invalidate and 0 < cas_unique < old.cas):   # C0 never matches
                return ST_EXISTS, None
            exptime = old.exptime
            state |= STALE | (old.state & TOKEN_SENT)
        return ST_STORED, self._write(key, flags, exptime, value, old.size, state=state)

    def delete(self, key, cas_unique=None):
        """ST_DELETED, ST_NOT_FOUND, or ST_EXISTS when cas_unique is given and differs."""
        old = self.get(key, False)
        if old is None:
            return ST_NOT_FOUND
        if cas_unique is not None and cas_unique != old.cas:
            return ST_EXISTS
        stamp = self.stamp_now()
        self._journal(stamp, OP_DELETE, key, 0, 0, 0, b"")
        self._bury(key, old.size, stamp)
        return ST_DELETED

    def incr(self, key, delta, incr=True, cas_unique=0):
        """(status, new value, Item): ST_STORED, ST_NOT_FOUND, ST_EXISTS or ST_NON_NUMERIC.

        incr wraps at 2**64, decr stops at 0. A result no longer than the old
        value is right-padded with spaces to its length and keeps the item's
        state, as memcached's in-place update does. cas_unique (0 = none)
        must match the item's (meta `ma C`).
        """
        old = self.get(key, False)
        if old is None:
            return ST_NOT_FOUND, 0, None
        data = old.value
        if not data:
            return ST_NON_NUMERIC, 0, None
        if cas_unique and cas_unique != old.cas:    # memcached compares cas before parsing
            return ST_EXISTS, 0, None
        current = parse_uint64(data)
        if current is None:
            return ST_NON_NUMERIC, 0, None
        result = (current + delta) & UINT64_MASK if incr else max(current - delta, 0)
        digits = b"%d" % result
        in_place = len(digits) <= len(data)
        if in_place:
            digits = digits.ljust(len(data))
        if in_place:
            item = self._rewrite(key, old, old.exptime, digits, old.state)
        else:
            item = self._write(key, old.flags, old.exptime, digits, old.size)
        return ST_STORED, result, item

    def touch(self, key, exptime):
        """The item with its new exptime, or None when absent."""
        item = self.get(key)
        if item is not None:
            self.set_exptime(key, item, self.absolute(exptime))
        return item

    def set_exptime(self, key, item, exptime):
        """Give a live item a new absolute exptime (0 = never). It keeps its cas
        unique (memcached's touch) and is logged whole under a new stamp, so
        that a touch competes with writes by the stamp rule."""
        stamp = self.stamp_now()
        self._journal(stamp, OP_SET | (item.state & PERSISTED_STATE) << 4, key, item.flags,
                      exptime, item.cas, item.value)
        self._retime(key, item, exptime, stamp)

    def vivify(self, key, value=b""):
        """Create a missing item (flags 0, no expiry) for meta `N`; returns it."""
        return self._write(key, 0, 0, value, None)

    def mark_stale(self, key, item, exptime):
        """meta `md I`: keep the item but mark it STALE under a new cas unique.

        The recache token is handed out again: the next mg wins it (W).
        """
        self._rewrite(key, item, exptime, item.value, (item.state | STALE) & ~TOKEN_SENT)

    def flush_all(self, delay=0):
        """Invalidate every item now (delay <= 0) or at a deadline (exptime rules).

        Items stored up to the deadline die; a later flush_all replaces a
        pending one (memcached keeps a single oldest_live).
        """
        self._flush(self.stamp_now(), self.absolute(delay) if delay > 0 else 0, True)

    def absolute(self, exptime):
        """Protocol exptime -> absolute unix seconds (0 = never).

        exptime: seconds if <= 30 days, unix time above; negative means
        already expired (memcached's realtime()).
        """
        if exptime == 0:
            return 0
        if exptime < 0:
            return 1
        if exptime > REALTIME_MAXDELTA:
            return exptime
        return int(self.now) + exptime

    def stamp_now(self):
        """The stamp of a new local change: the time in microseconds, moved past
        every stamp this server has seen (a hybrid logical clock), and our sid."""
        ts = time.time_ns() // 1000
        if ts <= self.clock:
            ts = self.clock + 1
        self.clock = ts
        return ts << STAMP_SID_BITS | self.sid

    # -- records ---------------------------------------------------------------

    def apply(self, record):
        """Apply a Record of this server's own log (replay): as when it was
        logged, so unconditionally and in log order; the inverse of journal."""
        stamp, op, key = record.stamp, record.op & 0x0F, record.key
        if stamp >> STAMP_SID_BITS > self.clock:
            self._follow(record)
        if record.cas > self.last_cas:
            self.last_cas = record.cas
        if op == OP_SET:
            self._write_blind(key, record.flags, record.exptime, record.value, record.cas,
                              record.op >> 4, stamp)
        elif op == OP_DELETE:
            self._bury(key, self._held(key)[1], stamp)
        elif op == OP_TOUCH:
            item = self.get(key, False)
            if item is not None:
                self._retime(key, item, record.exptime, stamp)
        elif op == OP_FLUSH:
            self._flush(stamp, record.exptime)
        elif op == OP_RTS:
            self._note_rts(key.decode(), record.value.decode())

    def apply_remote(self, record):
        """Apply another server's Record by the stamp rule: when its stamp is above
        the stamp of what the key holds (item or tombstone; for a flush_all, see
        _flush_state), it is journaled, with its origin stamp and a new local
        cas unique, and applied as a client's write is; else nothing changes.
        Returns whether it was applied. Raises what the journal raises."""
        stamp, op, key = record.stamp, record.op & 0x0F, record.key
        if stamp >> STAMP_SID_BITS > self.clock:      # so later local writes win over it
            self._follow(record)
        if op == OP_FLUSH:
            return self._flush(stamp, record.exptime, True)
        if op not in (OP_SET, OP_DELETE, OP_TOUCH) or not 0 < len(key) <= KEY_MAX_LENGTH:
            return False
        held, size = self._held(key)
        if stamp <= held or stamp < self.flush_stamp:
            return False
        if op == OP_SET:
            state = record.op >> 4 & PERSISTED_STATE
            if not state & KEY_BINARY and TEXT_KEY_UNSAFE.search(key):
                state |= KEY_BINARY                  # meta echoes it base64
            self._write(key, record.flags, record.exptime, record.value, size, state=state,
                        stamp=stamp)
        elif op == OP_DELETE:
            self._journal(stamp, OP_DELETE, key, 0, 0, 0, b"")
            self._bury(key, size, stamp)
        else:                     # a touch from a source of the release before stamps
            item = self.get(key, False)
            if item is None:
                return False
            self._write(key, item.flags, record.exptime, item.value, size,
                        state=item.state & PERSISTED_STATE, stamp=stamp)
        return True

    def _follow(self, record):
        """Move the clock up to another server's record (or one replayed), but
        never more than CLOCK_AHEAD_MAX_US past our time: a stamp from a broken
        clock must not stop our own stamps (they must fit in the log)."""
        ceiling = time.time_ns() // 1000 + CLOCK_AHEAD_MAX_US
        if record.ts > ceiling and record.sid != self.sid and not self.skew_warned:
            log.warning("store: a change from sid %d is stamped %s, more than %d s ahead of "
                        "our clock; check the servers' clocks (NTP)", record.sid,
                        time.strftime("%Y-%m-%d %H:%M:%S",
                                      time.gmtime(min(record.ts // 10 ** 6, 2 ** 35))),
                        CLOCK_AHEAD_MAX_US // 10 ** 6)
            self.skew_warned = True
        self.clock = max(self.clock, min(record.ts, ceiling))

    def stamp_of(self, key):
        """The stamp of what key holds (an item, live or not, or a tombstone); 0 for
        nothing."""
        return self._held(key)[0]

    def note_rts(self, source, text):
        """Record how far this server has applied a source's log (section 10):
        journaled with the records it covers, so it is exactly as durable."""
        self._journal(self.stamp_now(), OP_RTS, source.encode(), 0, 0, 0, text.encode())
        self._note_rts(source, text)

    # -- housekeeping --------------------------------------------------------

    def tick(self, when):
        """Advance the clock; a delayed flush_all whose deadline passed takes effect
        (not logged: its record says when, so a replay repeats it exactly)."""
        self.now = when
        pending = self.flush_pending
        if pending is not None and when >= pending[1]:
            self.flush_pending = None
            self.flush_stamp = max(self.flush_stamp, deadline_stamp(pending[1]))
            self.meta_dirty = True

    def sweep(self, limit=SWEEP_STEP_ITEMS):
        """Remove up to `limit` expired or flushed items and ended tombstones; a
        bounded step. An expired item leaves a tombstone."""
        if self.engine is None:
            return self._sweep_tombstones(limit)
        try:
            rows = self.engine.scan(self.sweep_after, limit)
        except self.engine.errors as err:
            log.warning("store: the expiry sweep cannot read the store: %s", err)
            return 0
        self.sweep_after = rows[-1][0] if len(rows) == limit else b""
        reaped = 0
        for key, length, head in rows:
            if len(key) > KEY_MAX_LENGTH or self._unwritten(key) is not MISSING:
                continue   # the meta record, or a key whose disk row is out of date
            try:
                size, exptime, cas, stamp, tombstone = row_facts(key, length, head)
            except (struct.error, TypeError):
                self._decode(key, head)        # logs the damaged row once
                continue
            if tombstone:
                if exptime <= self.now:
                    if self.undoable:
                        self._keep(key)
                    self.pending[key] = None
            elif self._flushed(stamp, cas):
                self._remove(key, size)
                reaped += 1
            elif exptime and exptime <= self.now:
                self._bury(key, size, stamp)
                reaped += 1
        self.reclaimed += reaped
        return reaped

    def start_writer(self):
        """Write checkpoints from a thread of their own, if the engine can."""
        engine = self.engine.clone() if self.engine is not None else None
        if engine is not None:
            self.writer = CheckpointWriter(engine)
            self.writer.start()

    def commit(self, log_position=None, force=False, log_last=None):
        """End of a batch, which the log now holds: note how far the log goes
        (and log_last, the (stamp, frame length) of the record that ends there);
        checkpoint when one is due."""
        self.undo = None
        self._collect()
        if log_position is not None:
            self.log_position, self.log_last = log_position, log_last
        if self.checkpoint_error is not None and self.now < self.checkpointed:
            return   # a failed checkpoint waits before it is tried again
        if force or len(self.pending) >= CHECKPOINT_ITEMS or (
                (self.pending or self.meta_dirty)
                and self.now - self.checkpointed >= CHECKPOINT_SECONDS):
            self.checkpoint()

    def checkpoint(self):
        """Write the pending changes and the meta record to the engine.

        Returns False when the engine refused them: they stay pending, the
        meta record keeps its older log position (so a restart replays the
        log from there), and commit() tries again after CHECKPOINT_RETRY_SECONDS.
        """
        self.checkpointed = self.now
        if self.engine is None:
            self.meta_dirty = False
            return True
        if self.writing is not None:
            if len(self.pending) < CHECKPOINT_PENDING_MAX:
                return True                   # one at a time: the next commit() goes on
            self.writer.wait()                # writes outrun the disk: memory stays bounded
            self._collect()
            if self.checkpoint_error is not None:
                return False
        batch, self.pending = self.pending, {}
        unknown, self.unknown = self.unknown, set()
        self.meta_dirty = False
        meta = {"cas": self.last_cas, "clock": self.clock, "flush_stamp": self.flush_stamp,
                "flush_last": self.flush_last, "flush_pending": self.flush_pending,
                "flush_cas": self.flush_cas, "rts": dict(self.rts), "lost": self.lost,
                "ulog": self.log_position,
                "ulog_last": self.log_last, "items": self.curr_items, "bytes": self.bytes}
        self.writing, self.writing_position = batch, self.log_position
        self.writing_unknown = unknown
        if self.writer is not None:
            self.writer.submit(batch, unknown, meta)
            return True
        return self._written(*write_checkpoint(self.engine, batch, unknown, meta))

    def _collect(self):
        """Take in what the writer thread finished, between batches."""
        writer = self.writer
        if writer is not None and self.writing is not None and writer.result is not None:
            self._written(*writer.result)

    def _written(self, done, err, corrections=(0, 0)):
        """A checkpoint ended: the counts take its corrections (keys written blind
        that the engine had); on failure its changes are pending again (behind
        any newer ones) and the next try waits CHECKPOINT_RETRY_SECONDS."""
        batch, self.writing = self.writing, None
        unknown, self.writing_unknown = self.writing_unknown, None
        if not done:
            batch.update(self.pending)
            self.pending = batch
            self.unknown |= unknown
            self.meta_dirty = True
            if self.checkpoint_error is None:
                log.error("store checkpoint failed: %s; the changes stay in memory and the "
                          "update log, retrying every %g s", err, CHECKPOINT_RETRY_SECONDS)
            self.checkpoint_error = err
            self.checkpointed = self.now + CHECKPOINT_RETRY_SECONDS
            return False
        if self.checkpoint_error is not None:
            log.warning("store checkpoint succeeded again")
            self.checkpoint_error = None
        self.curr_items += corrections[0]
        self.bytes += corrections[1]
        self.checkpoint_position = self.writing_position
        return True

    def rollback(self):
        """Undo the batch (every change since the last commit()): the log could
        not take it. Items, pending changes, counters, the flush state and the
        rts return to what they were; cas uniques and stamps handed out
        meanwhile stay used."""
        if self.undo is None:
            return
        for key, (prior, exptime, stamp, unknown) in self.undo.items():
            if not unknown:
                self.unknown.discard(key)
            if prior is MISSING:
                self.pending.pop(key, None)
            else:
                self.pending[key] = prior
                if prior:
                    prior.exptime, prior.stamp = exptime, stamp   # touch changes items in place
            cached = self.cache.pop(key, None)
            if cached is not None:
                self.cache_bytes -= self._footprint(key, cached)
        (self.curr_items, self.bytes, self.total_items, self.flush_stamp, self.flush_pending,
         self.flush_last, self.rts) = self.undo_counts
        self.undo = None
        self._collect()

    def set_memory_limit(self, limit):
        """New memory limit in bytes; evicts (or drops cached items) down to it."""
        self.memory_limit = limit
        self._evict()

    def reset_counters(self):
        for name in STORE_COUNTERS:
            setattr(self, name, 0)

    def close(self):
        """Checkpoint and close the engine; False when the last checkpoint failed
        (the engine then still says how far the log is applied)."""
        done = True
        if self.writer is not None:
            self.writer.stop()
            self._collect()
            self.writer = None
        if self.engine is not None:
            done = self.checkpoint()
            self.engine.close()
        return done

    # -- internals -----------------------------------------------------------

    def _read_meta(self):
        try:
            raw = self.engine.get(META_KEY)
            meta = json.loads(raw) if raw else {}
            if "items" in meta:
                self.curr_items, self.bytes = meta["items"], meta["bytes"]
            else:     # a store written before the counts were kept
                self.curr_items, self.bytes = self.engine.count()
                if raw:
                    self.curr_items -= 1
                    self.bytes -= len(META_KEY) + len(raw)
        except self.engine.errors + (ValueError, KeyError, TypeError) as err:
            raise StoreUnreadable(os.path.dirname(self.engine.path), type(self.engine).__name__,
                                  err) from None
        return meta

    def _journal(self, stamp, op, key, flags, exptime, cas, value):
        """Hand a new change to the journal, which may refuse it by raising."""
        if self.journal is not None:
            self.journal(stamp, op, key, flags, exptime, cas, value)

    def _keep(self, key):
        """Remember what is pending for key (and the counters) before the open
        batch first changes it, for rollback(); a logged store only."""
        undo = self.undo
        if undo is None:
            undo = self.undo = {}
            self.undo_counts = (self.curr_items, self.bytes, self.total_items, self.flush_stamp,
                                self.flush_pending, self.flush_last, dict(self.rts))
        if key not in undo:
            prior = self.pending.get(key, MISSING)
            if prior.__class__ is Item:
                undo[key] = (prior, prior.exptime, prior.stamp, key in self.unknown)
            else:
                undo[key] = (prior, 0, 0, key in self.unknown)

    def _decode(self, key, record):
        """The Item of an engine row, or None (logged once) when it does not decode."""
        try:
            return Item.from_record(key, record)
        except (struct.error, TypeError):      # too short, or not a blob
            if key not in self.damaged:
                if len(self.damaged) < DAMAGED_KEYS_LOGGED:
                    log.error("store: the row of key %r does not decode (%d bytes); treating "
                              "it as absent (`memtool.py check` reports such rows)", key,
                              len(record))
                self.damaged.add(key)
            return None

    def _flush_state(self, stamp, deadline):
        """(flush_stamp, flush_pending, flush_last) after a flush_all stamped `stamp`
        with `deadline` (unix seconds, 0 = at once).

        The stamp rule: a flush_all kills the items stamped before it, or
        before its deadline. The latest (by stamp) replaces a pending one, as
        memcached's single oldest_live; one that arrives after a later one
        takes effect only if that later one came after its deadline.
        """
        threshold, pending, last = self.flush_stamp, self.flush_pending, self.flush_last
        fires = deadline_stamp(deadline) if deadline else stamp
        if stamp > last:
            last, pending = stamp, None
            if deadline > self.now:
                pending = (stamp, deadline)
            else:
                threshold = max(threshold, fires)
        elif not deadline or (last >= fires and deadline <= self.now):
            threshold = max(threshold, fires)
        return threshold, pending, last

    def _flush(self, stamp, deadline, log_it=False):
        """Apply a flush_all by the stamp rule (journaled first with log_it);
        returns whether it changed anything."""
        state = self._flush_state(stamp, deadline)
        if state == (self.flush_stamp, self.flush_pending, self.flush_last):
            return False
        if log_it:
            self._journal(stamp, OP_FLUSH, b"", 0, deadline, 0, b"")
        if self.undoable:
            self._keep(b"")
        self.flush_stamp, self.flush_pending, self.flush_last = state
        self.meta_dirty = True
        return True

    def _note_rts(self, source, text):
        if self.undoable:
            self._keep(b"")
        self.rts[source] = text
        self.meta_dirty = True

    def _retime(self, key, item, exptime, stamp):
        if self.undoable:
            self._keep(key)
        item.exptime, item.stamp = exptime, stamp
        if self.engine is not None:
            self.pending[key] = item

    def _flushed(self, stamp, cas):
        """Killed by a flush_all: by its stamp, or by cas for rows from before stamps?"""
        return stamp < self.flush_stamp or (not stamp and cas < self.flush_cas)

    def _dead(self, item):
        """Expired or flushed?"""
        return (item.exptime and item.exptime <= self.now) or self._flushed(item.stamp, item.cas)

    def _unwritten(self, key):
        """key's change the engine may not hold yet (pending, or being written by
        a checkpoint): an Item, None for a delete, MISSING when there is none."""
        item = self.pending.get(key, MISSING)
        if item is MISSING and self.writing is not None:
            item = self.writing.get(key, MISSING)
        return item

    def _read(self, how, key):
        """how(key): the engine's get or head; a read the engine refuses is logged
        and raised as STORE_UNREADABLE."""
        try:
            return how(key)
        except self.engine.errors as err:
            log.error("store: reading key %r failed: %s", key, err)
            raise STORE_UNREADABLE from None

    def _load(self, key):
        if self.engine is None:
            return None
        item = self._unwritten(key)
        if item is not MISSING:
            if item is None or item.state & TOMBSTONE:
                return None
        else:
            record = self._read(self.engine.get, key)
            item = None if record is None else self._decode(key, record)
            if item is None or item.state & TOMBSTONE:
                # Remember the miss: a get-heavy client asking for absent keys
                # would otherwise cost one engine lookup per request.
                if record is not None and item is None:
                    return None            # damaged: logged, not remembered
                self._cache_put(key, ABSENT)
                return None
            item.atime = -self.now
        if self._dead(item):
            self._reap(key, item)
            return None
        self._cache_put(key, item)
        return item

    def _reap(self, key, item):
        if self._flushed(item.stamp, item.cas):
            self.get_flushed += 1
            self._remove(key, item.size)
            return
        self.get_expired += 1
        if item.atime <= 0:
            self.expired_unfetched += 1
        self._bury(key, item.size, item.stamp)

    def _concat(self, key, value, at_end):
        """append/prepend: (status, new Item or None)."""
        old = self.get(key, False)
        if old is None:
            return ST_NOT_STORED, None
        data = old.value + value if at_end else value + old.value
        if not item_size_ok(key, old.flags, len(data), self.item_size_max):
            return ST_NOT_STORED, None
        return ST_STORED, self._write(key, old.flags, old.exptime, data, old.size)

    def _write(self, key, flags, exptime, value, old_size, cas=None, state=0, stamp=0):
        """Store a new item and return it; old_size is the replaced one's size, None
        if there was none.

        Without `cas` this is a new change: it gets the next cas unique and
        (unless given, for a replicated write) a new stamp, and is journaled.
        With one it is a record being replayed.
        """
        if cas is None:
            self.last_cas = cas = self.last_cas + 1
            if not stamp:
                stamp = self.stamp_now()
            if self.journal is not None:     # _journal() inline: the busiest path
                self.journal(stamp, OP_SET | (state & PERSISTED_STATE) << 4, key, flags, exptime,
                             cas, value)
        if self.undoable:
            self._keep(key)
        item = Item(key, flags, exptime, cas, value, state, stamp)
        item.atime = -self.now
        if old_size is None:
            self.curr_items += 1
        else:
            self.bytes -= old_size
        self.bytes += item.size
        self.total_items += 1
        if self.tombstones:
            self._drop_tombstone(key)
        self._cache_put(key, item)
        if self.engine is not None:
            self.pending[key] = item
        return item

    def _rewrite(self, key, old, exptime, value, state):
        """Replace old by what memcached makes of it in place: the new item keeps
        old's flags and last access, and does not count as a new one (total_items)."""
        item = self._write(key, old.flags, exptime, value, old.size, state=state)
        item.atime = old.atime
        self.total_items -= 1
        return item

    def _remove(self, key, size):
        """Drop key's item (size: what it counts) without a tombstone: a flushed one,
        which the flush's stamp outlives."""
        if self.undoable:
            self._keep(key)
        item = self.cache.pop(key, None)
        if item is not None:
            self.cache_bytes -= self._footprint(key, item)
        if self.engine is not None:
            self.pending[key] = None
        self.curr_items -= 1
        self.bytes -= size

    def _bury(self, key, size, stamp):
        """Drop key's item (size: what it counts; None when no item is there) and
        remember the delete under stamp for tombstone_ttl seconds, so that a
        write stamped before it that arrives later (replication) stays dead."""
        if self.undoable:
            self._keep(key)
        cached = self.cache.pop(key, None)
        if cached is not None:
            self.cache_bytes -= self._footprint(key, cached)
        if size is not None:
            self.curr_items -= 1
            self.bytes -= size
        tombstone = None
        if self.tombstone_ttl:
            tombstone = Item(key, 0, int(self.now) + self.tombstone_ttl, 0, b"", TOMBSTONE,
                             stamp)
        if self.engine is not None:
            self.pending[key] = tombstone
        elif tombstone is not None:
            self._drop_tombstone(key)
            self.tombstones[key] = tombstone
            self.cache_bytes += self._footprint(key, tombstone)
            if self.cache_bytes > self.memory_limit:
                self._evict()

    def _drop_tombstone(self, key):
        """The memory engine forgets key's tombstone, if it has one."""
        tombstone = self.tombstones.pop(key, None)
        if tombstone is not None:
            self.cache_bytes -= self._footprint(key, tombstone)

    def _sweep_tombstones(self, limit):
        """The memory engine's sweep: forget tombstones whose time is up (they are
        kept oldest first)."""
        tombstones = self.tombstones
        while tombstones and limit:
            key, tombstone = next(iter(tombstones.items()))
            if tombstone.exptime > self.now:
                break
            del tombstones[key]
            self.cache_bytes -= self._footprint(key, tombstone)
            limit -= 1
        return 0

    def _write_blind(self, key, flags, exptime, value, cas=None, state=0, stamp=0):
        """_write() without reading the engine: a key only the engine could know of
        counts as new, and the checkpoint that writes it corrects the counts."""
        old = self.cache.get(key)
        if old is None and self.engine is not None:
            old = self._unwritten(key)
        known = old is not MISSING and old and not old.state & TOMBSTONE
        item = self._write(key, flags, exptime, value, old.size if known else None,
                           cas, state, stamp)
        if old is MISSING:               # after _write: a refused write adds nothing
            self.unknown.add(key)
        return item

    def _held(self, key):
        """(stamp, size) of what key holds: an item, live or not (size as it
        counts), a tombstone (size None), or nothing ((0, None))."""
        item = self.cache.get(key)
        if item:
            return item.stamp, item.size
        if self.engine is None:
            tombstone = self.tombstones.get(key)
            return (tombstone.stamp if tombstone is not None else 0), None
        item = self._unwritten(key)
        if item is MISSING:
            row = self._read(self.engine.head, key)
            if row is None:
                return 0, None
            try:
                size, _, _, stamp, tombstone = row_facts(key, *row)
            except (struct.error, TypeError):
                return 0, None             # a damaged row holds nothing
            return stamp, None if tombstone else size
        if item is None:
            return 0, None
        return item.stamp, None if item.state & TOMBSTONE else item.size

    @staticmethod
    def _footprint(key, item):
        """Memory a cache entry takes, so that -m bounds the process."""
        if item:
            return CACHE_ITEM_OVERHEAD + len(key) + len(item.rendered)
        return CACHE_ABSENT_OVERHEAD + len(key)

    def _cache_put(self, key, item):
        """Enter key's item (or ABSENT) in the cache: a new key at the young end;
        a replaced one keeps its key's place with `placed` UNPLACED, which the
        evictor takes as a use and moves it then (an OrderedDict move per set
        costs a microsecond among 100,000 keys)."""
        cache = self.cache
        old = cache.get(key)
        cache[key] = item
        if item:
            item.placed = self.now if old is None else UNPLACED
        if old and item:             # one item for another: only their replies differ
            self.cache_bytes += len(item.rendered) - len(old.rendered)
        else:
            self.cache_bytes += self._footprint(key, item) - (
                0 if old is None else self._footprint(key, old))
        if self.cache_bytes > self.memory_limit:
            self._evict()

    def _evict(self):
        """Evict least recently placed items down to the limit, after the memory
        engine's tombstones; one fetched (or replaced) since it was placed
        gets a second chance at the young end instead (CLOCK: a get or a set
        costs an attribute store, not an LRU move; memcached's ACTIVE flag)."""
        cache, tombstones = self.cache, self.tombstones
        while self.cache_bytes > self.memory_limit and tombstones:
            key, tombstone = tombstones.popitem(last=False)
            self.cache_bytes -= self._footprint(key, tombstone)
        chances = EVICT_SECOND_CHANCES
        while self.cache_bytes > self.memory_limit and len(cache) > 1:
            victim_key, victim = cache.popitem(last=False)
            if victim and victim.atime > victim.placed and chances:
                chances -= 1
                victim.placed = self.now
                cache[victim_key] = victim
                continue
            self.cache_bytes -= self._footprint(victim_key, victim)
            if self.engine is None:
                self.curr_items -= 1
                self.bytes -= victim.size
                self.evictions += 1
                if victim.atime <= 0:
                    self.evicted_unfetched += 1


class StoreScan:
    """Every key a Store holds, once each, a chunk at a time while the store
    changes: full copies and digests (section 10) walk it.

    chunk(limit, max_bytes) returns up to `limit` (key, Item) pairs and about
    max_bytes of values, live items and tombstones (TOMBSTONE state) as they
    are when the chunk is read; [] when a bounded read found none, `ended`
    once all is read. Keys the engine may not have yet (those pending when the
    scan began) come first, then the engine's rows in key order; keys
    stored after the scan began may be missed (a copy sends the log from
    that point). Memory: the keys pending at the start (the memory engine:
    all its keys).
    """

    def __init__(self, store):
        self.store = store
        if store.engine is None:
            self.first = list(store.cache) + list(store.tombstones)
        else:
            self.first = sorted(set(store.pending).union(store.writing or ()))
        self.seen = frozenset(self.first) if store.engine is not None else frozenset()
        self.index = 0                     # next of `first`
        self.after = b""                   # last engine key returned
        self.done = False                  # the engine's rows are all read

    @property
    def ended(self):
        return self.index >= len(self.first) and (self.done or self.store.engine is None)

    def chunk(self, limit, max_bytes):
        store, out, size = self.store, [], 0
        stop = min(len(self.first), self.index + 4 * limit)    # dead keys count too
        while self.index < stop and len(out) < limit and size < max_bytes:
            key = self.first[self.index]
            self.index += 1
            item = self._current(key, None)
            if item is not None:
                out.append((key, item))
                size += len(item.value)
        if out or self.done or store.engine is None or self.index < len(self.first):
            return out
        try:
            found = store.engine.scan(self.after, limit, whole=True, max_bytes=max_bytes)
        except store.engine.errors as err:
            log.error("store: a scan cannot read the store: %s", err)
            raise STORE_UNREADABLE from None
        for key, record in found:
            self.after = key
            size += len(record)
            if len(key) > KEY_MAX_LENGTH or key in self.seen:
                continue
            item = self._current(key, record)
            if item is not None:
                out.append((key, item))
        self.done = len(found) < limit and size < max_bytes
        return out

    def _current(self, key, record):
        """key's Item or tombstone as the store holds it now (record: its engine
        row, read already), or None when it has neither or the item is dead."""
        store = self.store
        item = store.cache.get(key)
        if not item:
            if store.engine is None:
                return store.tombstones.get(key)
            item = store._unwritten(key)
            if item is MISSING:
                if record is None:
                    record = store._read(store.engine.get, key)
                item = None if record is None else store._decode(key, record)
            if item is None:
                return None
        if item.state & TOMBSTONE:
            return item
        return None if store._dead(item) else item


# ===== 6. Update log =========================================================
#
# The ulog is a directory of append-only files, ulog/<µs timestamp>.ulog,
# each named by the time it was started, so names sort in write order and a
# reader can seek by time (Tokyo Tyrant's ulog, with rts in microseconds).
# A file is a sequence of records, all integers little-endian:
#
#     magic    u8    0xC9
#     length   u32   bytes of the body
#     crc32    u32   zlib.crc32 of the body
#     body:            a Record (section 5):
#       ts       u64   the stamp's microseconds since the epoch
#       sid      u32   the stamp's origin server id (--sid)
#       op       u8    low nibble OP_SET=1 OP_DELETE=2 OP_TOUCH=3 OP_FLUSH=4
#                      OP_RTS=5, high nibble the item's PERSISTED_STATE bits
#       flags    u32
#       exptime  i64   absolute unix seconds, 0 = never (OP_FLUSH: the deadline)
#       cas      u64   cas unique on this server (release 1's OP_FLUSH: the
#                      cas below which items were flushed; now unused)
#       keylen   u16
#       key      keylen bytes
#       value    the rest of the body
#
# Records are in the order this server applied them; a replica's log holds
# other servers' records with their own stamps, so ts is not monotonic.
# Records of one loop pass are written with one write(); --sync decides when
# they reach the disk: always (fsync before any reply leaves), everysec (a
# timer), no (the OS decides). A write or fsync that fails (ENOSPC, EIO) is
# cut back off the file and the pass's writes are not acknowledged; the log
# then refuses writes until it can be written again. A crash can leave only
# an unfinished last record in the newest file (or one ending in zeros,
# where the file grew before its data reached the disk): start-up cuts that.
# Any other damage stops the start until `memtool.py check --data DIR
# --fix` repairs it.
# Positions are [file name, offset] lists (JSON-friendly), always at a
# record boundary. When old files are pruned, ulog/PRUNED names the newest
# one deleted: the log no longer holds every change since the store began.
# Rotated files are kept --ulog-keep deep, and past that while a connected
# replica still reads them, up to --ulog-retain bytes. The memory engine
# keeps its newest records for replicas in a MemoryBacklog instead, with
# the same positions and the same read().

ULOG_MAGIC = 0xC9
ULOG_FRAME = struct.Struct("<BII")
ULOG_BODY = struct.Struct("<QIBIqQH")
ULOG_RECORD_MAX = (1 << 30) + (64 << 10)   # a body longer than the largest item is damage
ULOG_SUFFIX = ".ulog"
BACKLOG_SUFFIX = ".mem"           # the name of a MemoryBacklog's positions
ULOG_PRUNED = "PRUNED"
ULOG_ZERO_TAIL_BYTES = 16         # a run of zeros this long ends a torn file, not data
ULOG_READ_BYTES = 1 << 20       # replay and check read files this much at a time
ULOG_RETRY_SECONDS = 1.0        # an unwritable log is tried again this often
ULOG_RETRY_ROOM = 64 << 10      # ... once the disk has this much more room than the failed write
SYNC_MODES = ("always", "everysec", "no")
OUT_OF_SPACE = ServerError.refusal(b"out of space")
LOG_UNWRITABLE = ServerError.refusal(b"cannot write the update log")

def read_record(buf, pos):
    """The record framed at buf[pos:]: (Record, offset past it), or None while
    buf ends inside the frame. Raises LogCorrupt for a bad magic, length or crc32."""
    if len(buf) - pos < ULOG_FRAME.size:
        return None
    magic, length, crc = ULOG_FRAME.unpack_from(buf, pos)
    if magic != ULOG_MAGIC or not ULOG_BODY.size <= length <= ULOG_RECORD_MAX:
        raise LogCorrupt("bad frame")
    start = pos + ULOG_FRAME.size
    end = start + length
    if end > len(buf):
        return None
    ts, sid, op, flags, exptime, cas, keylen = ULOG_BODY.unpack_from(buf, start)
    if keylen > KEY_MAX_LENGTH or ULOG_BODY.size + keylen > length \
            or not OP_SET <= op & 0x0F <= OP_RTS:
        raise LogCorrupt("bad record header")
    if zlib.crc32(memoryview(buf)[start:end]) != crc:
        raise LogCorrupt("crc32 mismatch")
    key_start = start + ULOG_BODY.size
    return Record(ts << STAMP_SID_BITS | sid, op, bytes(buf[key_start:key_start + keylen]),
                  flags, exptime, cas, bytes(buf[key_start + keylen:end])), end


def _frame_end(buf, pos):
    """Offset past the frame that starts at buf[pos:], as its header says (or
    past the header, while that is incomplete)."""
    if len(buf) - pos < ULOG_FRAME.size:
        return pos + ULOG_FRAME.size
    return pos + ULOG_FRAME.size + ULOG_FRAME.unpack_from(buf, pos)[1]


def record_frame(stamp, op, key, flags, exptime, cas, value):
    """A Record (its fields: record_frame(*record)) as its frame, in parts:
    (frame header, body head with the key, value); the crc32 runs over the
    parts, so the value is never copied."""
    head = ULOG_BODY.pack(stamp >> STAMP_SID_BITS, stamp & UINT32_MASK, op, flags, exptime,
                          cas, len(key)) + key
    crc = zlib.crc32(value, zlib.crc32(head))
    return ULOG_FRAME.pack(ULOG_MAGIC, len(head) + len(value), crc), head, value


def record_end(record):
    """(stamp, frame length) of a Record: what a position just past it names."""
    return record.stamp, ULOG_FRAME.size + ULOG_BODY.size + len(record.key) + len(record.value)


def last_record_of(parts):
    """(stamp, frame length) of the last record of a batch's frame parts
    (record_frame's three per record)."""
    header, head, value = parts[-3:]
    ts, sid = ULOG_BODY.unpack_from(head)[:2]
    return ts << STAMP_SID_BITS | sid, len(header) + len(head) + len(value)


def next_record_at(buf, pos):
    """Offset of the first whole, good record at or after pos; -1 when none."""
    magic = bytes((ULOG_MAGIC,))
    while True:
        pos = buf.find(magic, pos)
        if pos < 0:
            return -1
        try:
            if read_record(buf, pos) is not None:
                return pos
        except LogCorrupt:
            pass
        pos += 1


def ulog_names(directory):
    """The ulog file names in directory, oldest first."""
    return sorted(n for n in os.listdir(directory) if n.endswith(ULOG_SUFFIX))


def _is_torn_tail(buf, pos, newest):
    """Is buf[pos:], the end of a file, what a crash mid-write leaves: a last
    record that is unfinished or ends the file in zeros (the file grew before
    its data reached the disk), with no good record after? Only the newest
    file may end so."""
    if not newest or next_record_at(buf, pos + 1) >= 0:
        return False
    zeros = len(buf) - len(buf.rstrip(b"\0"))
    if zeros >= min(ULOG_ZERO_TAIL_BYTES, len(buf) - pos - ULOG_FRAME.size):
        return True
    try:
        return read_record(buf, pos) is None
    except LogCorrupt:
        return False


class LogReader:
    """The records of a ulog directory from a position on, read a chunk at a time.

    position: [file name, offset] (UpdateLog.position), or None for the start
    of the oldest kept file. read() returns the next chunk of whole records
    (a stream reads its source's log so); records() yields them one at a
    time, with `position` just past each meanwhile (replay). It never
    changes a file. Raises LogDamaged where a record cannot be read (its
    `torn` says whether it is the unfinished end of the newest file that a
    crash leaves).
    """

    def __init__(self, directory, position=None):
        self.directory = directory          # the ulog directory
        self.name, self.offset = position or (None, 0)  # where the next record starts

    @property
    def position(self):
        return [self.name, self.offset]

    def read(self, max_bytes, end=None):
        """[(Record, its frame as a memoryview)]: the whole records from the
        position on, about max_bytes of them (one at least if there is one),
        all of one file, not past `end`; the position moves past them, [] at
        the end.

        end: a writer's position (what it has written whole), for a stream
        that follows a live log; a position the log does not hold (a file
        pruned or never there, an offset past its end or not at a record)
        then raises PositionLost. None: read to the ends of the files (replay),
        and a position in a file that is gone starts at the oldest file after it.
        """
        while True:
            if end is not None and self.position == end:
                return []
            names = ulog_names(self.directory)
            if self.name not in names:
                if end is not None:
                    raise PositionLost(f"no file {self.name}")
                later = [n for n in names if self.name is None or n > self.name]
                if not later:
                    return []
                self.name, self.offset = later[0], 0
            path = os.path.join(self.directory, self.name)
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                stop = end[1] if end is not None and end[0] == self.name else size
                if self.offset > stop:
                    raise PositionLost(f"{self.name} holds {stop} bytes, not {self.offset}")
                if self.offset == stop:
                    later = [n for n in names if n > self.name]
                    if not later:
                        if end is not None:
                            raise PositionLost(f"{self.name} is not followed by another file")
                        return []
                    self.name, self.offset = later[0], 0
                    continue
                f.seek(self.offset)
                buf = f.read(min(max_bytes, stop - self.offset))
                out, pos = [], 0
                while pos < len(buf):
                    try:
                        found = read_record(buf, pos)
                    except LogCorrupt:
                        found = False
                    if found is None and not out and self.offset + _frame_end(buf, 0) <= stop:
                        buf += f.read(_frame_end(buf, 0) - len(buf))   # one long record
                        continue
                    if not found:
                        if out:
                            break                # the records before it first
                        f.seek(self.offset)
                        torn = end is None and _is_torn_tail(f.read(), 0, self.name == names[-1])
                        raise LogDamaged(path, self.offset, torn)
                    out.append((found[0], memoryview(buf)[pos:found[1]]))
                    pos = found[1]
                self.offset += pos
                return out

    def records(self):
        """Every record from the position to the end of the files (replay)."""
        while True:
            chunk = self.read(ULOG_READ_BYTES)
            if not chunk:
                return
            self.offset -= sum(len(frame) for _, frame in chunk)
            for record, frame in chunk:
                self.offset += len(frame)
                yield record


def scan_ulog_file(path):
    """What a whole ulog file holds: (records, good byte ranges, damaged ranges).

    Ranges are (start, end) offsets; a damaged range runs from a record that
    cannot be read to the next good one (or the end of the file).
    """
    with open(path, "rb") as f:
        buf = f.read()
    records, good, damaged = 0, [], []
    pos = start = 0
    while pos < len(buf):
        try:
            found = read_record(buf, pos)
        except LogCorrupt:
            found = None
        if found is not None:
            records += 1
            pos = found[1]
            continue
        if start < pos:
            good.append((start, pos))
        resume = next_record_at(buf, pos + 1)
        damaged.append((pos, len(buf) if resume < 0 else resume))
        if resume < 0:
            return records, good, damaged
        pos = start = resume
    if start < pos:
        good.append((start, pos))
    return records, good, damaged


class UpdateLog:
    """The writer of the ulog directory (one per directory: it holds a lock).

    directory: where the .ulog files live (created). sync: one of
    SYNC_MODES. limit: bytes after which a new file is started. keep:
    rotated files kept besides the current one; retain: bytes of files kept
    past those for connected replicas (see prune). Call open() (after
    replaying with LogReader) before appending.
    """

    def __init__(self, directory, sync="everysec", limit=ULOG_LIMIT_DEFAULT,
                 keep=ULOG_KEEP_DEFAULT, retain=ULOG_RETAIN_DEFAULT):
        os.makedirs(directory, exist_ok=True)
        self.lock = self._lock(directory)  # held while open: one writer per log
        self.directory = directory   # holds the .ulog files
        self.sync_mode = sync        # always | everysec | no
        self.limit = limit           # rotate when the current file reaches this
        self.keep = keep             # rotated files to keep
        self.retain = retain         # ... and bytes more for replicas
        self.pending = []            # frame parts of the current batch's records
        self.last_batch = None       # (file name, offset, bytes) of the last batch written
        self.last_record = None      # (stamp, frame length) of its last record
        self.last_ts = 0             # the newest file's start: names keep increasing
        self.unsynced = False        # written since the last fsync
        self.fd = None               # current file, opened by open()
        self.name = None             # its name
        self.offset = 0              # its size: where the next record goes
        self.error = None            # the OSError of the last failed write or fsync,
                                     # until a write succeeds again
        self.retrying = False        # ... and since then the retry is under way
        self.retry_at = 0.0          # monotonic time when writes are tried again
        self.cut_to = None           # offset the file must be cut back to first
        self.failed_bytes = 0        # size of the write that failed

    def open(self):
        """Open the newest file (a new one if there is none) for appending."""
        names = ulog_names(self.directory)
        if names:
            self.last_ts = max(self.last_ts, int(names[-1][:-len(ULOG_SUFFIX)]))
        self._open_file(names[-1] if names else None)

    def cut(self, name, offset):
        """Cut a torn tail off file `name` at offset (before open())."""
        os.truncate(os.path.join(self.directory, name), offset)

    def append(self, *record):
        """Queue one Record, given as its fields, for this batch (written by flush()).

        Raises OUT_OF_SPACE or LOG_UNWRITABLE while the log cannot be written,
        so the caller changes nothing it could not log.
        """
        if self.error is not None and not self.retrying and not self._retry():
            raise self.refusal
        self.pending += record_frame(*record)

    def flush(self):
        """Write the batch with one write(); fsync under --sync always; rotate.

        True when the batch is in the log (and on disk, under always). False
        when it is not: the batch is dropped, what reached the file is cut
        back off, and writes are refused until the log can be written again;
        the caller must not acknowledge the batch.
        """
        if not self.pending:
            return True
        data, last = b"".join(self.pending), last_record_of(self.pending)
        self.pending.clear()
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
            if self.sync_mode == "always":
                os.fsync(self.fd)
        except OSError as err:
            self._fail(err, len(data), self.offset)
            return False
        self.last_batch, self.last_record = (self.name, self.offset, data), last
        self.offset += len(data)
        self.unsynced = self.sync_mode != "always"
        if self.error is not None:
            log.warning("update log %s: writable again", self.directory)
            self.error = None
            self.retrying = False
        if self.offset >= self.limit:
            self._rotate()
        return True

    def sync(self):
        """fsync the current file if anything was written since the last one."""
        if self.unsynced and self.fd is not None:
            try:
                os.fsync(self.fd)
            except OSError as err:
                self._fail(err, 0, None)
                return
            self.unsynced = False

    @property
    def position(self):
        """[file name, offset] just past the last record written."""
        return [self.name, self.offset]

    @property
    def refusal(self):
        """The ServerError that writes get while the log cannot be written."""
        if self.error is not None and self.error.errno in (errno.ENOSPC, errno.EDQUOT):
            return OUT_OF_SPACE
        return LOG_UNWRITABLE

    def read(self, position, max_bytes):
        """The records written from position on (by flush(): never the batch in
        progress), about max_bytes of them: ([(Record, its frame)], the position
        past them). Raises PositionLost for a position the log does not hold,
        LogDamaged for a record that does not read (see LogReader.read)."""
        reader = LogReader(self.directory, position)
        return reader.read(max_bytes, self.position), reader.position

    def distance(self, position):
        """Bytes the log holds past position (a position it holds). Raises OSError."""
        name, offset = position
        if name == self.name:
            return self.offset - offset
        later = [n for n in ulog_names(self.directory) if name < n < self.name]
        return (os.path.getsize(os.path.join(self.directory, name)) - offset + self.offset
                + sum(os.path.getsize(os.path.join(self.directory, n)) for n in later))

    def prune(self, position, needed=None):
        """Delete rotated files beyond `keep`, never one at or after `position`,
        nor, while they hold no more than `retain` bytes, one at or after
        `needed`.

        position: how far the store is checkpointed. needed: the oldest
        position a connected replica still reads (None: none); one that falls
        behind `retain` loses its files and gets a full copy.
        """
        names = ulog_names(self.directory)
        old = [n for n in names if n < position[0]]
        doomed = old[:max(0, len(old) - self.keep)]
        if needed is not None and doomed and needed[0] <= doomed[-1]:
            try:
                held = sum(os.path.getsize(os.path.join(self.directory, n))
                           for n in names if n >= needed[0])
            except OSError:
                held = self.retain + 1
            if held <= self.retain:
                doomed = [n for n in doomed if n < needed[0]]
            else:
                log.warning("update log %s: a replica reading %s is more than --ulog-retain "
                            "(%d bytes) behind; pruning its files, it will get a full copy",
                            self.directory, needed[0], self.retain)
        if not doomed:
            return
        try:
            marker = os.path.join(self.directory, ULOG_PRUNED)
            with open(marker + ".tmp", "w") as f:
                f.write(doomed[-1] + "\n")
            os.replace(marker + ".tmp", marker)
            for name in doomed:
                os.remove(os.path.join(self.directory, name))
        except OSError as err:
            log.warning("update log %s: cannot prune old files: %s", self.directory, err)

    def close(self):
        """Write and fsync what is queued, then release the directory.

        Returns flush()'s verdict on the last batch."""
        written = True
        if self.fd is not None:
            written = self.flush()
            self.sync()
            os.close(self.fd)
            self.fd = None
        self.lock.close()
        return written

    def _retry(self):
        """Has the time come to try writing again, and does it look possible?"""
        if time.monotonic() < self.retry_at:
            return False
        self.retry_at = time.monotonic() + ULOG_RETRY_SECONDS
        try:
            if self.cut_to is not None:
                os.ftruncate(self.fd, self.cut_to)
                self.cut_to = None
            if self.unsynced:
                os.fsync(self.fd)
                self.unsynced = False
            if self.error.errno in (errno.ENOSPC, errno.EDQUOT):
                room = os.statvfs(self.directory)
                if room.f_bavail * room.f_frsize < self.failed_bytes + ULOG_RETRY_ROOM:
                    return False
        except OSError:
            return False
        self.retrying = True
        return True

    def _fail(self, err, nbytes, cut_to):
        if self.error is None:
            log.error("update log %s: %s; refusing writes until it can be written "
                      "(retrying every %g s)", self.directory, err, ULOG_RETRY_SECONDS)
        self.error = err
        self.retrying = False
        self.failed_bytes = nbytes
        self.retry_at = time.monotonic() + ULOG_RETRY_SECONDS
        if cut_to is not None:
            self.cut_to = cut_to
            try:
                os.ftruncate(self.fd, cut_to)
                self.cut_to = None
            except OSError:
                pass   # _retry() cuts it before anything else is written

    def _rotate(self):
        """Start a new file; on failure keep appending to this one."""
        try:
            os.fsync(self.fd)
            self.unsynced = False
            old = self.fd
            self._open_file(None)
        except OSError as err:
            log.warning("update log %s: cannot start a new file: %s", self.directory, err)
            return
        os.close(old)

    @staticmethod
    def _lock(directory):
        """An exclusive flock on directory/LOCK; ConfigError when another process holds it."""
        lock = open(os.path.join(directory, "LOCK"), "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().strip() or "?"
            lock.close()
            raise ConfigError(f"{directory} is in use by another memtool (pid {owner})") from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        return lock

    def _open_file(self, name):
        if name is None:
            name = "%020d%s" % (max(int(time.time() * 1e6), self.last_ts + 1), ULOG_SUFFIX)
        fd = os.open(os.path.join(self.directory, name), os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                     0o644)
        self.fd, self.name, self.offset = fd, name, os.lseek(fd, 0, os.SEEK_END)


class MemoryBacklog:
    """The memory engine's stand-in for the update log, for its replicas: the
    newest records, whole batches of them, up to `limit` bytes
    (--repl-backlog). Positions and read() are the UpdateLog's; the file
    name is made from the start time, so a restarted server's positions
    are new ones and its replicas get a full copy."""

    def __init__(self, limit=REPL_BACKLOG_DEFAULT):
        self.limit = limit
        self.name = "%020d%s" % (time.time_ns() // 1000, BACKLOG_SUFFIX)
        self.batches = collections.deque()   # (offset, bytes) of each batch kept
        self.start = 0                       # offset of the oldest byte kept
        self.offset = 0                      # offset past the newest
        self.pending = []                    # frame parts of the batch in progress
        self.last_batch = None               # (name, offset, bytes) of the last batch
        self.last_record = None              # (stamp, frame length) of its last record

    @property
    def position(self):
        return [self.name, self.offset]

    def append(self, *record):
        self.pending += record_frame(*record)

    def flush(self):
        """End the batch; forget the oldest batches beyond the limit."""
        if not self.pending:
            return True
        data, self.last_record = b"".join(self.pending), last_record_of(self.pending)
        self.pending.clear()
        self.batches.append((self.offset, data))
        self.last_batch = (self.name, self.offset, data)
        self.offset += len(data)
        while self.offset - self.start > self.limit and len(self.batches) > 1:
            self.batches.popleft()
            self.start = self.batches[0][0]
        return True

    def distance(self, position):
        """As UpdateLog.distance."""
        return self.offset - position[1]

    def read(self, position, max_bytes):
        """As UpdateLog.read."""
        name, offset = position
        if name != self.name or not self.start <= offset <= self.offset:
            raise PositionLost(f"the memory backlog holds {self.name} offsets "
                               f"{self.start}-{self.offset}, not {name} {offset}")
        index = bisect.bisect_right(self.batches, (offset, b"\xff")) - 1
        out, size = [], 0
        while index < len(self.batches) and size < max_bytes:
            start, data = self.batches[index]
            pos = offset - start
            try:
                while pos < len(data) and size < max_bytes:
                    record, end = read_record(data, pos)
                    out.append((record, data[pos:end]))
                    size += end - pos
                    offset += end - pos
                    pos = end
            except (LogCorrupt, TypeError):    # not at a record: a position not from here
                raise PositionLost(f"no record at {name} {offset}") from None
            index += 1
        return out, [name, offset]


# ===== 7. Event loop and connections =========================================
#
# One selectors loop per process. A pass of the loop is: wait for events,
# let every ready connection read and handle what it got (handlers queue
# replies, they never send), run what was deferred to this pass (a
# connection that used up its share of a pass goes on here), run due
# timers, run the end-of-pass hooks (the server's group commit: one ulog
# write, fsync if asked, one store commit), then give every connection with
# queued replies one send(). Replies thus leave only after the changes they
# acknowledge are in the log, and a pipelined batch costs one system call
# each way. An exception from a callback is logged, never fatal.


class Timer:
    """A callback scheduled on an EventLoop; cancel() stops it."""

    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when, callback):
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


class EventLoop:
    """selectors loop with timers, end-of-pass hooks and signal handling."""

    def __init__(self):
        self.selector = selectors.DefaultSelector()
        self.timers = []             # heap of (when, seq, Timer)
        self.seq = itertools.count() # tie-breaker so Timers never compare
        self.ready_hooks = []        # called after each wait, before events are handled
        self.pass_hooks = []         # called at the end of every pass, before sends
        self.to_flush = []           # connections with replies queued this pass
        self.soon = []               # callbacks for the next pass (call_soon)
        self.running = False
        self.signal_handlers = {}    # signum -> callback
        self.wakeup = None           # (reader, writer) socketpair for signals

    def call_later(self, delay, callback):
        """Run callback() after `delay` seconds; returns a Timer."""
        timer = Timer(time.monotonic() + delay, callback)
        heapq.heappush(self.timers, (timer.when, next(self.seq), timer))
        return timer

    def call_every(self, interval, callback):
        """Run callback() every `interval` seconds until the loop stops."""
        def tick():
            self.call_later(interval, tick)
            callback()
        return self.call_later(interval, tick)

    def call_soon(self, callback):
        """Run callback() in the next pass, without waiting for events first."""
        self.soon.append(callback)

    def add_signal_handler(self, signum, callback):
        """Run callback() in the loop (not in the signal handler) when signum arrives."""
        if self.wakeup is None:
            self.wakeup = socket.socketpair()
            for sock in self.wakeup:
                sock.setblocking(False)
            signal.set_wakeup_fd(self.wakeup[1].fileno())
            self.selector.register(self.wakeup[0], selectors.EVENT_READ, self._on_signal)
        self.signal_handlers[signum] = callback
        signal.signal(signum, lambda *args: None)

    def run(self):
        """Run passes until stop() is called."""
        self.running = True
        select = self.selector.select
        while self.running:
            events = select(self._timeout())
            callbacks, self.soon = self.soon, []    # what events defer runs next pass
            for hook in self.ready_hooks:
                self._call(hook)
            for key, mask in events:
                try:
                    key.data(mask)
                except Exception:
                    log.exception("unexpected error in %r; going on", key.data)
            for callback in callbacks:
                self._call(callback)
            self._run_timers()
            self.end_pass()

    def end_pass(self):
        """Run the end-of-pass hooks, then send every queued reply."""
        for hook in self.pass_hooks:
            self._call(hook)
        if self.to_flush:
            connections, self.to_flush = self.to_flush, []
            for conn in connections:
                conn.flush()

    def stop(self):
        self.running = False

    def close(self):
        if self.wakeup is not None:
            signal.set_wakeup_fd(-1)
            for sock in self.wakeup:
                sock.close()
        self.selector.close()

    @staticmethod
    def _call(callback, *args):
        try:
            callback(*args)
        except Exception:
            log.exception("unexpected error in %r; going on", callback)

    def _timeout(self):
        if self.to_flush or self.soon:
            return 0   # replies queued outside a pass (e.g. before run()) go out now
        while self.timers and self.timers[0][2].cancelled:
            heapq.heappop(self.timers)
        if not self.timers:
            return None
        return max(0.0, self.timers[0][0] - time.monotonic())

    def _run_timers(self):
        current = time.monotonic()
        while self.timers and self.timers[0][0] <= current:
            timer = heapq.heappop(self.timers)[2]
            if not timer.cancelled:
                self._call(timer.callback)

    def _on_signal(self, mask):
        try:
            data = self.wakeup[0].recv(64)
        except (BlockingIOError, InterruptedError):
            return
        for signum in data:
            handler = self.signal_handlers.get(signum)
            if handler is not None:
                handler()


class Connection:
    """A non-blocking socket in an EventLoop: buffered replies, one send per pass.

    Subclasses implement data_received(data) and may override
    connection_lost() and resume(). write() queues bytes; they are sent at
    the end of the loop pass, joined into one send, or for a large batch
    handed to sendmsg() as they are, so queuing a big value many times costs
    no copies. When the peer does not read its replies and more than
    OUTPUT_HIGH_WATER bytes back up, reading stops until they drain. A
    subclass that stopped parsing for the same reason sets `paused`; resume()
    is then called on a later pass, once the replies have drained. One that
    used up its share of a pass calls hold(): reading stops and resume() is
    called in the next pass.
    """

    def __init__(self, loop, sock, addr, events=selectors.EVENT_READ):
        sock.setblocking(False)
        self.loop = loop             # the EventLoop we live in
        self.sock = sock             # the connected socket
        self.addr = addr             # peer address, for logs
        self.outbuf = []             # reply chunks queued this pass
        self.check_at = OUTPUT_CHECK_CHUNKS  # backed_up() sums outbuf past this many chunks
        self.unsent = collections.deque()  # chunks (or their tails) the kernel did not take
        self.unsent_bytes = 0        # ... and their total size
        self.paused = False          # stopped parsing until replies drain (see resume)
        self.held = False            # stopped reading until resume() in the next pass
        self.queued = False          # in loop.to_flush already
        self.closing = False         # close once everything is sent
        self.closed = False
        self.bytes_read = 0          # counters for stats, summed by the owner
        self.bytes_written = 0
        self.events = events         # what the selector watches for
        loop.selector.register(sock, events, self._on_event)

    def write(self, data):
        self.outbuf.append(data)
        if not self.queued:
            self._schedule()

    def writelines(self, chunks):
        self.outbuf.extend(chunks)
        if not self.queued:
            self._schedule()

    def backed_up(self):
        """Do the replies queued this pass and those unsent pass OUTPUT_HIGH_WATER?

        Sums sizes only once per OUTPUT_CHECK_CHUNKS new chunks, so a parser
        can ask before every command: `len(outbuf) > check_at and backed_up()`.
        """
        self.check_at = len(self.outbuf) + OUTPUT_CHECK_CHUNKS
        return sum(map(len, self.outbuf)) + self.unsent_bytes >= OUTPUT_HIGH_WATER

    def _schedule(self):
        """Have flush() called at the end of this loop pass."""
        self.queued = True
        self.loop.to_flush.append(self)

    def flush(self):
        """Send what write() queued, with one send() (or one sendmsg() for a large
        batch); keep what the kernel did not take for EVENT_WRITE."""
        self.queued = False
        if self.closed:
            return
        outbuf = self.outbuf
        if outbuf:
            if len(outbuf) > OUTPUT_CHECK_CHUNKS:
                self.check_at = OUTPUT_CHECK_CHUNKS
            # One reply (or one value and END) is sent as it is or joined; more
            # are joined only while small, else handed over without copies.
            if self.unsent or (len(outbuf) > 2
                               and sum(map(len, outbuf)) > SEND_JOIN_MAX_BYTES):
                self.unsent.extend(outbuf)
                self.unsent_bytes += sum(map(len, outbuf))
                outbuf.clear()
                self._drain()
                return
            data = outbuf[0] if len(outbuf) == 1 else b"".join(outbuf)
            outbuf.clear()
            sent = self._send(data)
            if sent == len(data):
                if not (self.closing or self.paused):
                    return   # the common case: all sent, still reading
            elif sent is None:
                return
            else:
                self.unsent.append(memoryview(data)[sent:])
                self.unsent_bytes += len(data) - sent
        self._update_events()

    def close_when_sent(self):
        """Close after the queued replies are sent (quit, shutdown, HTTP close)."""
        self.closing = True
        if not self.queued:
            self._schedule()

    def close(self):
        if self.closed:
            return
        self.closed = True
        try:
            self.loop.selector.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()
        self.connection_lost()

    def data_received(self, data):
        raise NotImplementedError

    def connection_lost(self):
        """Called once when the connection closes."""

    def _on_event(self, mask):
        try:
            if mask & selectors.EVENT_WRITE:
                self._drain()
            if mask & selectors.EVENT_READ and not self.closed:
                try:
                    data = self.sock.recv(RECV_BYTES)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    data = b""
                if not data:
                    self.close()
                    return
                self.bytes_read += len(data)
                self.data_received(data)
        except Disconnect:
            self.close()
        except Exception:
            log.exception("connection %s: unexpected error; closing it", self.addr)
            self.handle_error()

    def handle_error(self):
        """An unexpected exception while serving this connection: close it."""
        self.close()

    def resume(self):
        """Replies backed up and drained again, or the pass after hold(): a
        subclass that stopped parsing parses on."""

    def hold(self):
        """Stop reading; call resume() in the next pass (see the class docstring)."""
        if not self.held:
            self.held = True
            self.loop.call_soon(self._release)
            self._update_events()

    def stop_reading(self, stop):
        """Stop (True) or go on reading, for flow control between connections (the
        replication agent stops reading its source while its target is slow)."""
        self.held = stop
        self._update_events()

    def _release(self):
        self.held = False
        if not self.closed:
            self.resume()
            if not (self.held or self.closed):
                self._update_events()

    def _send(self, data, many=False):
        """sock.send(data), or sock.sendmsg(data) for a list of chunks (many):
        the bytes taken, or None when the connection closed."""
        try:
            sent = self.sock.sendmsg(data) if many else self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close()
            return None
        self.bytes_written += sent
        return sent

    def _drain(self):
        unsent = self.unsent
        if len(unsent) == 1:
            sent = self._send(unsent[0])
        else:
            sent = self._send(list(itertools.islice(unsent, SEND_CHUNKS_MAX)), True)
        if sent is None:
            return
        self.unsent_bytes -= sent
        while sent:
            head = unsent[0]
            if len(head) > sent:
                unsent[0] = memoryview(head)[sent:]
                break
            sent -= len(head)
            unsent.popleft()
        self._update_events()

    def _update_events(self):
        if self.closing and not self.unsent:
            if not self.outbuf:       # else flush() comes back here once it is sent
                self.close()
            return
        events = 0
        if self.unsent:
            events |= selectors.EVENT_WRITE
        backed_up = self.unsent_bytes >= OUTPUT_HIGH_WATER
        if not (backed_up or self.closing or self.held):
            events |= selectors.EVENT_READ
            if self.paused:
                self.paused = False
                self.loop.call_soon(self._release)
        if events != self.events:
            self.events = events
            self.loop.selector.modify(self.sock, events, self._on_event)


class Upstream(Connection):
    """The asking side of a connection: requests out, replies paired with them in
    order, since memcached replies carry no request id (twemproxy's out_q).

    Proxy backends, replication links and bench use it. address: (host, port),
    an IP address (resolve names beforehand): the connect does not block.
    send() may queue requests before the connection is up. on_reply(context,
    status, hits, raw) is called for each reply, in order: status is its last
    line (bytes; b"END", b"STORED", an error line...), hits the values it
    carried (read_reply), raw its bytes. after_replies(), if given, is called
    once after each read that completed replies. A request waits `timeout`
    seconds at most for its reply (None: forever; one timer per connection,
    for the oldest request), the connect `connect_timeout`. On any failure
    (a refused, dropped or timed-out connection, a reply that does not parse,
    bytes nobody asked for) fail(reason) closes the connection and calls
    on_reply(context, None, None, reason) for every request still waiting:
    reason is "connect", "disconnect", "timeout" or "parse", and `error`
    says more. A failed Upstream stays closed: make a new one.
    """

    def __init__(self, loop, address, on_reply, after_replies=None, timeout=None,
                 connect_timeout=None):
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = sock.connect_ex(address)
        super().__init__(loop, sock, address, selectors.EVENT_WRITE)
        self.on_reply = on_reply         # called for each reply (see above)
        self.after_replies = after_replies  # called after a read that completed replies
        self.timeout = timeout           # seconds a request may wait for its reply
        self.pending = collections.deque()  # (expect, context, deadline) per request sent
        self.inbuf = b""                 # bytes of an incomplete reply
        self.connected = False           # the connect has completed
        self.error = None                # why it failed, for logs and messages
        self.timer = None                # the deadline timer of the oldest request
        if code not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            loop.call_soon(lambda: self.fail("connect", os.strerror(code)))
        elif connect_timeout is not None:
            loop.call_later(connect_timeout, self._connect_expired)

    def send(self, data, expect, context=None):
        """Write a request; expect is its REPLY_* kind, None when no reply comes
        (noreply, meta q); context goes back to on_reply with the reply."""
        if expect is not None:
            if self.timeout is None:
                self.pending.append((expect, context, 0))
            else:
                self.pending.append((expect, context, time.monotonic() + self.timeout))
                if self.timer is None:
                    self._arm()
        self.write(data)

    def fail(self, reason, detail=None):
        """Close and answer every waiting request with the failure `reason`."""
        if self.error is None:
            self.error = f"{self.addr[0]}:{self.addr[1]}: {detail or reason}"
        pending, self.pending = self.pending, collections.deque()
        self.close()
        for _, context, _ in pending:
            self.on_reply(context, None, None, reason)

    def flush(self):
        if self.connected:
            super().flush()
        else:
            self.queued = False       # sent once the connect completes

    def data_received(self, data):
        buf = self.inbuf + data if self.inbuf else data
        pos = 0
        pending = self.pending
        try:
            while pending:
                expect, context, _ = pending[0]
                reply = read_reply(buf, pos, expect)
                if reply is None:
                    break
                end, status, hits = reply
                pending.popleft()
                self.on_reply(context, status, hits, buf[pos:end])
                pos = end
                if self.closed:
                    return
        except BadReply as err:
            self.fail("parse", str(err))
            return
        self.inbuf = buf[pos:]
        if self.inbuf and not pending:
            self.on_reply(None, None, None, "parse")
            self.fail("parse", "bytes nobody asked for")
            return
        if pos and self.after_replies is not None:
            self.after_replies()

    def connection_lost(self):
        if self.timer is not None:
            self.timer.cancel()
        if self.pending:
            self.fail("disconnect", "the server closed the connection")

    def _on_event(self, mask):
        if self.connected or self.closed:
            return super()._on_event(mask)
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self.fail("connect", os.strerror(code))
            return
        self.connected = True
        self.events = 0
        if self.outbuf:
            super().flush()
        self._update_events()

    def _connect_expired(self):
        if not (self.connected or self.closed):
            self.fail("connect", "connect timed out")

    def _arm(self):
        when = self.pending[0][2] - time.monotonic()
        self.timer = self.loop.call_later(max(when, 0.0), self._expire)

    def _expire(self):
        self.timer = None
        if not self.pending:
            return
        if self.pending[0][2] <= time.monotonic():
            self.fail("timeout", "no reply within %g s" % self.timeout)
        else:
            self._arm()


class Histogram:
    """Latency histogram in microseconds, log-linear like HdrHistogram.

    Values below 256 µs are exact; above, each power of two is cut into 128
    buckets, so a reported value is within 0.4 % of the true one (up to
    60 s; longer values are clamped). Two histograms merge by adding counts.
    """

    SUB_BUCKETS = 128
    MAX_US = 60 * 1000 * 1000
    BUCKETS = 2 * SUB_BUCKETS + (MAX_US.bit_length() - 8) * SUB_BUCKETS

    def __init__(self):
        self.counts = [0] * self.BUCKETS   # samples per bucket
        self.count = 0
        self.total = 0.0     # sum of samples, µs
        self.max = 0.0

    def record(self, microseconds):
        value = int(microseconds)
        if value < 256:
            index = value if value > 0 else 0
        else:
            if value > self.MAX_US:
                value = self.MAX_US
            shift = value.bit_length() - 8
            index = 128 + shift * 128 + (value >> shift) - 128
        self.counts[index] += 1
        self.count += 1
        self.total += microseconds
        if microseconds > self.max:
            self.max = microseconds

    def merge(self, other):
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)
        return self

    @property
    def mean(self):
        return self.total / self.count if self.count else 0.0

    def percentile(self, p):
        """The value (µs) at or below which p percent (0..100) of the samples fall."""
        if not self.count:
            return 0.0
        rank = max(1, -(-self.count * p // 100))
        seen = 0
        for index, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                return min(self._midpoint(index), self.max)
        return self.max

    def _midpoint(self, index):
        if index < 2 * self.SUB_BUCKETS:
            return float(index)
        shift = (index - 2 * self.SUB_BUCKETS) // self.SUB_BUCKETS + 1
        low = ((index - 2 * self.SUB_BUCKETS) % self.SUB_BUCKETS + 128) << shift
        return low + ((1 << shift) - 1) / 2


class Listener:
    """A listening TCP socket that calls factory(sock, addr) for each new client.

    The port is bound at once; clients wait in the backlog until the loop
    runs. When accept() fails for want of descriptors or memory (EMFILE,
    ENFILE, ENOBUFS, ENOMEM), accepting stops for ACCEPT_RETRY_SECONDS
    (memcached's listen_disabled_num counts these), instead of the
    listener staying readable and the loop spinning.
    """

    def __init__(self, loop, host, port, factory, backlog=1024):
        self.loop = loop
        self.factory = factory       # called with each accepted (sock, addr)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, port), family=family, backlog=backlog)
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()[:2]
        self.accepting = True        # registered for accepts (not paused, not closed)
        self.disabled = 0            # times accepting was paused
        self.disabled_seconds = 0.0  # ... and for how long in all
        loop.selector.register(self.sock, selectors.EVENT_READ, self._on_accept)

    def close(self):
        if self.sock is not None:
            if self.accepting:
                self.loop.selector.unregister(self.sock)
            self.sock.close()
            self.sock = None
            self.accepting = False

    def _on_accept(self, mask):
        for _ in range(64):   # bounded, so a connect storm cannot starve clients
            try:
                sock, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as err:
                if err.errno not in ACCEPT_EXHAUSTED:
                    log.warning("accept failed: %s", err)
                    return
                self._pause(err)
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.factory(sock, addr)

    def _pause(self, err):
        if not self.disabled:
            log.error("accept failed: %s; not accepting for %g s at a time until it "
                      "succeeds (stats: listen_disabled_num)", err, ACCEPT_RETRY_SECONDS)
        self.disabled += 1
        self.accepting = False
        self.loop.selector.unregister(self.sock)
        paused_at = time.monotonic()

        def resume():
            self.disabled_seconds += time.monotonic() - paused_at
            if self.sock is not None:
                self.accepting = True
                self.loop.selector.register(self.sock, selectors.EVENT_READ, self._on_accept)
        self.loop.call_later(ACCEPT_RETRY_SECONDS, resume)


# ===== 8. Server =============================================================
#
# ServerConnection turns command lines into Store calls through HANDLERS, a
# table of cmd_* methods (memcached's process_command_ascii as a dict). Each
# handler gets the tokens, the buffer and the offset just past the command
# line, and returns the offset where the next command starts, or None when
# its data block has not fully arrived. Errors are raised as ProtocolError
# and written in one place, unless the command said noreply.

STATUS_LINES = {ST_STORED: STORED, ST_NOT_STORED: NOT_STORED, ST_EXISTS: EXISTS,
                ST_NOT_FOUND: NOT_FOUND, ST_DELETED: DELETED}
META_STATUS = {ST_STORED: b"HD", ST_NOT_STORED: b"NS", ST_EXISTS: b"EX", ST_NOT_FOUND: b"NF"}
CAS_COUNTERS = {ST_STORED: "cas_hits", ST_EXISTS: "cas_badval", ST_NOT_FOUND: "cas_misses"}
HTTP_REASONS = {100: b"Continue", 200: b"OK", 201: b"Created", 400: b"Bad Request",
                403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed",
                409: b"Conflict", 412: b"Precondition Failed", 413: b"Payload Too Large",
                431: b"Request Header Fields Too Large", 501: b"Not Implemented",
                500: b"Internal Server Error", 502: b"Bad Gateway",
                503: b"Service Unavailable", 504: b"Gateway Timeout",
                505: b"HTTP Version Not Supported",
                507: b"Insufficient Storage"}
HTTP_METHODS = (b"GET", b"HEAD", b"PUT", b"POST", b"DELETE")
HTTP_ALLOW_ALL = b"Allow: GET, HEAD, PUT, POST, DELETE\r\n"
HTTP_ALLOW_ROOT = b"Allow: GET, HEAD\r\n"
HTTP_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
HTTP_EXPTIME = re.compile(rb"-?[0-9]{1,10}\Z")
PDMODES = {None: b"S", b"0": b"S", b"1": b"E", b"2": b"A"}  # Tokyo Tyrant X-TT-PDMODE
SERVER_COUNTERS = (
    "total_connections", "rejected_connections", "cmd_set", "cmd_flush",
    "cmd_touch", "cmd_meta", "get_hits", "get_misses", "delete_misses", "delete_hits",
    "incr_misses", "incr_hits", "decr_misses", "decr_hits", "cas_misses", "cas_hits", "cas_badval",
    "touch_hits", "touch_misses", "store_too_large", "store_no_memory", "bytes_read",
    "bytes_written", "conn_yields")
# `stats` as memcached 1.6.18 prints it, name for name and in its order, so that
# monitoring tools find what they expect; names memtool has no use for are 0.
MEMCACHED_STATS = (
    "pid uptime time version libevent pointer_size rusage_user rusage_system "
    "max_connections curr_connections total_connections rejected_connections "
    "connection_structures response_obj_oom response_obj_count response_obj_bytes "
    "read_buf_count read_buf_bytes read_buf_bytes_free read_buf_oom reserved_fds cmd_get "
    "cmd_set cmd_flush cmd_touch cmd_meta get_hits get_misses get_expired get_flushed "
    "delete_misses delete_hits incr_misses incr_hits decr_misses decr_hits cas_misses "
    "cas_hits cas_badval touch_hits touch_misses store_too_large store_no_memory auth_cmds "
    "auth_errors bytes_read bytes_written limit_maxbytes accepting_conns "
    "listen_disabled_num time_in_listen_disabled_us threads conn_yields hash_power_level "
    "hash_bytes hash_is_expanding slab_reassign_rescues slab_reassign_chunk_rescues "
    "slab_reassign_evictions_nomem slab_reassign_inline_reclaim slab_reassign_busy_items "
    "slab_reassign_busy_deletes slab_reassign_running slabs_moved lru_crawler_running "
    "lru_crawler_starts lru_maintainer_juggles malloc_fails log_worker_dropped "
    "log_worker_written log_watcher_skipped log_watcher_sent log_watchers "
    "unexpected_napi_ids round_robin_fallback bytes curr_items total_items "
    "slab_global_page_pool expired_unfetched evicted_unfetched evicted_active evictions "
    "reclaimed crawler_reclaimed crawler_items_checked lrutail_reflocked moves_to_cold "
    "moves_to_warm moves_within_lru direct_reclaims lru_bumps_dropped").split()


HttpRequest = collections.namedtuple("HttpRequest", "method key headers body close keep_alive")
HttpRequest.__doc__ = """A whole HTTP request: method and key (bytes; key None when
the target has no path), headers (lowercased names), body, close (the
connection closes after the response), keep_alive (an HTTP/1.0 request that
asked to stay open, which its response confirms)."""
HTTP_CLOSING = HttpRequest(b"", None, {}, b"", True, False)   # for errors that close


def http_item_headers(flags, exptime, cas):
    """The headers that carry an item's flags, exptime and cas unique."""
    return b'X-Memtool-Flags: %d\r\nX-Memtool-Exptime: %d\r\nETag: "%d"\r\n' % (
        flags, exptime, cas)


def http_response(request, status, body=None, content_type=b"text/plain", extra=b"",
                  detail=b""):
    """The chunks of one response to request (HEAD: no body). body None means the
    reason phrase as text, with detail after it."""
    if body is None:
        body = HTTP_REASONS[status] + (b": " + detail if detail else b"") + b"\n"
    if request.close:
        extra += b"Connection: close\r\n"
    elif request.keep_alive:
        extra += b"Connection: keep-alive\r\n"
    head = b"HTTP/1.1 %d %b\r\nContent-Type: %b\r\nContent-Length: %d\r\n%b\r\n" % (
        status, HTTP_REASONS[status], content_type, len(body), extra)
    return (head,) if request.method == b"HEAD" else (head, body)


class HttpParser:
    """HTTP/1.1 (RFC 9112) on a connection that switched to it at its first HTTP
    request line: frames each request with its Content-Length or chunked body
    (100-continue, the -I limit, the connection's share of a pass, incomplete
    bodies counted against -m) and hands it over whole, in order.

    conn is the connection (a ServerConnection or a ProxyConnection). The
    parser calls conn.http_request(HttpRequest) for each request,
    conn.http_error(status, detail) for a framing error (the connection then
    closes: where the next request starts is unknown) and conn.http_emit(chunks)
    for a 100 Continue; it uses conn's buffers and conn.server's limits.
    Requests that a web page could send (a foreign Origin; a foreign Host
    on loopback: DNS rebinding) are refused with 403.
    """

    def __init__(self, conn):
        self.conn = conn                 # the connection being parsed
        self.continued = False           # 100 Continue sent for the pending request
        self.pending = None              # (method, key, headers, close, keep_alive, minor,
                                         # ChunkedBody) of a chunked body still arriving

    def process(self, buf, pos=0):
        """Handle the complete requests in buf[pos:], up to this pass's share;
        return the offset of the rest."""
        conn = self.conn
        end = len(buf)
        conn.need = 0
        conn.share = conn.server.reqs_per_event
        while pos < end and not conn.done_reading:
            if len(conn.outbuf) > conn.check_at and conn.backed_up():
                return conn._pause(pos)
            conn.share -= 1
            if conn.share < 0:
                return conn._yield(pos)
            try:
                if self.pending is not None:
                    pos = self._chunks(buf, pos)
                    if self.pending is not None:
                        return pos
                    continue
                pos = HTTP_BLANK_LINES.match(buf, pos).end()   # allowed (RFC 9112 2.2)
                if pos == end:
                    break
                after = self._request(buf, pos)
            except HttpError as err:
                self.pending = None
                conn.server.release(conn)
                conn.http_error(err.status, err.detail)
                if err.status in (413, 507):
                    # The client may still be sending the body: closing now would
                    # reset the connection before it reads the reply. Drop what it
                    # sends until it closes, for HTTP_LINGER_SECONDS at most.
                    conn.process = self._discard
                    conn.loop.call_later(HTTP_LINGER_SECONDS, conn.close)
                else:
                    conn.close_when_sent()
                return end
            if after is None:
                return pos
            pos = after
        return end if conn.done_reading else pos

    @property
    def holding_body(self):
        """A chunked body is arriving (its parts count against -m)."""
        return self.pending is not None

    def _request(self, buf, pos):
        """Hand over the request at buf[pos:]; its end offset, or None until it is
        all in. A chunked body goes to _chunks, which may take it only in part."""
        conn = self.conn
        found = HTTP_HEAD_END.search(buf, pos, pos + HTTP_HEAD_MAX_BYTES)
        if found is None:
            if len(buf) - pos >= HTTP_HEAD_MAX_BYTES:
                raise HttpError(431)
            eol = buf.find(b"\n", pos)
            if eol >= 0:
                parse_http_head(buf[pos:eol + 1])   # a bad request line is 400 at once
            return None
        head_end = found.end()
        method, target, minor, headers = parse_http_head(buf[pos:head_end])
        self._check_origin(headers)
        connection = headers.get(b"connection", b"").lower()
        close = b"close" in connection or (minor == 0 and b"keep-alive" not in connection)
        keep_alive = minor == 0 and not close
        key = http_key(target)
        stores = method in (b"PUT", b"POST")
        limit = conn.server.item_size_max
        if stores and key:
            has_flags = headers.get(b"x-memtool-flags", b"0").strip(b"0") != b""
            limit -= item_total_size(key, has_flags, 0)
        chunked = headers.get(b"transfer-encoding")
        length = headers.get(b"content-length")
        body = b""
        if chunked is not None:
            if length is not None:
                raise HttpError(400, b"both Content-Length and Transfer-Encoding")
            if chunked.lower() != b"chunked":
                raise HttpError(501)
            self.pending = (method, key, headers, close, keep_alive, minor, ChunkedBody(limit))
            return self._chunks(buf, head_end)
        if length is None:
            length = b"0"
        if not length.isdigit() or len(length) > 18:
            raise HttpError(400, b"bad Content-Length")
        end = head_end + int(length)
        if stores:
            if end - head_end > limit:
                raise HttpError(413)
            if end > len(buf):
                if not conn.server.reserve(conn, end - head_end):
                    conn.stats["store_no_memory"] += 1
                    raise HttpError(507, NO_MEMORY.why)
                self._continue(headers, minor)
                conn.need = end - pos
                return None
            conn.server.release(conn)
            body = buf[head_end:end]
        self._complete(HttpRequest(method, key, headers, body, close, keep_alive))
        return conn._skip_block(buf, end)   # a body nobody stores is discarded unread

    def _chunks(self, buf, pos):
        """Feed buf[pos:] to the pending chunked body; hand the request over once
        it is complete. Returns the offset up to which buf was used."""
        conn = self.conn
        method, key, headers, close, keep_alive, minor, body = self.pending
        pos = body.feed(buf, pos)
        if body.done:
            self.pending = None
            conn.server.release(conn)
            self._complete(HttpRequest(method, key, headers, b"".join(body.parts), close,
                                       keep_alive))
        elif not conn.server.reserve(conn, body.total + max(body.wanted, len(buf) - pos)):
            conn.stats["store_no_memory"] += 1
            raise HttpError(507, NO_MEMORY.why)
        else:
            self._continue(headers, minor)
            conn.need = body.wanted
        return pos

    def _complete(self, request):
        self.continued = False
        self.conn.http_request(request)

    @staticmethod
    def _discard(buf, pos=0):
        return len(buf)

    def _check_origin(self, headers):
        server = self.conn.server
        origin = headers.get(b"origin")
        if origin is not None and origin not in server.http_origins:
            raise HttpError(403, b"Origin not allowed (--http-allow-origin)")
        host = headers.get(b"host")
        if server.http_hosts is not None and host is not None:
            name = host.rpartition(b":")[0] if host.count(b":") == 1 or b"]:" in host else host
            if name.lower() not in server.http_hosts:
                raise HttpError(403, b"Host not allowed (--http-host)")

    def _continue(self, headers, minor):
        """`Expect: 100-continue`: tell the client to send the body, once."""
        if (not self.continued and minor == 1
                and headers.get(b"expect", b"").lower() == b"100-continue"):
            self.continued = True
            self.conn.http_emit((HTTP_CONTINUE,))


class HeldInput:
    """The incomplete input (data blocks, long lines, HTTP bodies) that all the
    clients of a Server or a Proxy hold, bounded by held_limit() bytes: a
    connection reserves what it will buffer before reading it."""

    held_bytes = 0

    def reserve(self, conn, nbytes):
        """Count nbytes held for conn, in all; False, and nothing changed, when
        they do not fit."""
        more = nbytes - conn.reserved
        if more > 0 and self.held_bytes + more > self.held_limit():
            return False
        self.held_bytes += more
        conn.reserved = nbytes
        return True

    def release(self, conn):
        """conn no longer holds incomplete input."""
        self.held_bytes -= conn.reserved
        conn.reserved = 0


class ProtocolConnection(Connection):
    """A client of a memcached port (a server's or a proxy's): the input side that
    both share. Keeps what is incomplete (a line, a data block) and what a
    share of a pass left unparsed; swallows refused data blocks; switches to
    HTTP at an HTTP request line; closes at once on a binary-protocol request.

    owner: the Server or the Proxy, which gives reqs_per_event, http,
    http_origins, http_hosts, item_size_max, stats (a dict of counters) and
    reserve()/release() for incomplete input. Subclasses implement
    process(buf, pos) -> offset of the rest, and the HttpParser callbacks.
    """

    def __init__(self, owner, sock, addr):
        super().__init__(owner.loop, sock, addr)
        self.server = owner          # the Server or the Proxy
        self.stats = owner.stats     # its counters
        self.inbuf = b""             # bytes of an incomplete command
        self.backlog = None          # (buffer, offset): complete commands left unparsed
                                     # when the share of a pass ran out (hold, pause)
        self.need = 0                # don't parse until inbuf holds this many bytes
        self.swallow = 0             # bytes of a refused data block still to discard
        self.reserved = 0            # bytes of incomplete input counted by owner.reserve
        self.share = 0               # requests left in this pass's share (-R)
        self.noreply = False         # the current command said noreply
        self.process = self._sniff   # the parser for what arrives (process, HttpParser's)
        self.http = None             # the HttpParser, once the connection switched

    def data_received(self, data):
        start = 0
        if self.backlog is not None:
            held, start = self.backlog
            self.backlog = None
            if data:                 # read while paused: rare, so copying is fine
                data, start = held[start:] + data, 0
            else:
                data = held
        else:
            if self.swallow:
                skip = min(self.swallow, len(data))
                self.swallow -= skip
                data = data[skip:]
                if not data and not self.more_to_do():
                    return
            if self.inbuf:
                self.inbuf += data
                if len(self.inbuf) < self.need:
                    return
                data = bytes(self.inbuf)
        pos = self.parse(data, start)
        if pos >= len(data):
            self.inbuf = b""
            if self.reserved and not (self.http and self.http.holding_body):
                self.server.release(self)     # nothing incomplete is held any more
        elif self.held or self.paused:
            self.inbuf = b""
            self.backlog = (data, pos)
        else:
            self.inbuf = bytearray(data[pos:])

    def parse(self, data, start):
        """process() the input; subclasses wrap it."""
        return self.process(data, start)

    @property
    def done_reading(self):
        """No more requests are read (quit, a close after the replies owed)."""
        return self.closing

    def more_to_do(self):
        """Is there work left without new input (a multiget cut by the share)?"""
        return False

    def line_incomplete(self, buf, pos):
        """frame_request() found no whole line at buf[pos:]: wait for it (a long
        multiget line counts against -m); the offset to go on from."""
        end = len(buf)
        if end - pos > LINE_MAX_BYTES and not self.server.reserve(self, end - pos):
            self.write(LINE_NO_MEMORY.line)
            self.close_when_sent()
            return end
        self.need = 0
        return pos

    def _sniff(self, buf, pos=0):
        """The first bytes: a binary-protocol request (magic 0x80) is closed at
        once, since memtool does not speak it and the client would wait forever."""
        del self.process
        if buf[pos:pos + 1] == b"\x80":
            log.warning("%s: a memcached binary-protocol request; memtool speaks the text "
                        "and meta protocols only, closing", self.addr)
            raise Disconnect
        return self.process(buf, pos)

    def reply(self, line):
        if not self.noreply:
            self.write(line)

    def _pause(self, pos):
        """Replies to this read pass the high-water mark: keep the rest of the
        commands unparsed until they drain (memory stays bounded by what the
        client claims to want, not by what it sends)."""
        self.paused = True
        self.need = 0
        return pos

    def _yield(self, pos):
        """This pass's share (-R requests) is used up: go on in the next pass, so
        one busy client cannot keep the others waiting."""
        self.stats["conn_yields"] += 1
        self.need = 0
        self.hold()
        return pos

    def _skip_block(self, buf, end):
        """Discard a refused data block ending at `end`, which may not have arrived."""
        if end > len(buf):
            self.swallow = end - len(buf)
            return len(buf)
        return end

    def _switch_to_http(self, buf, pos):
        """An HTTP request line: the connection speaks HTTP from here on."""
        if not self.server.http:
            log.info("%s: HTTP request, but HTTP is off (--no-http); closing", self.addr)
            raise Disconnect
        self.http = HttpParser(self)
        self.process = self.http.process
        return self.process(buf, pos)

    def http_emit(self, chunks):
        self.writelines(chunks)

    def resume(self):
        if not self.closed:
            self.data_received(b"")

    def connection_lost(self):
        self.server.release(self)
        self.stats["bytes_read"] += self.bytes_read
        self.stats["bytes_written"] += self.bytes_written


class ServerConnection(ProtocolConnection):
    """One client of `serve`: memcached text and meta protocol in, replies out."""

    def __init__(self, server, sock, addr):
        super().__init__(server, sock, addr)
        self.store = server.store    # the Store every command works on
        self.continuation = None     # (keys, next index, exptime, with_cas) of a
                                     # multiget cut by the share
        self.batch_start = -1        # outbuf index of this pass's first logged write
        self.http_req = None         # the HTTP request being answered
        self.producer = None         # what writes to the connection instead of replies
                                     # (a replication stream): fill() when it drained
        self.handed_over = False     # process() is another parser's now (rapply)

    def parse(self, data, start):
        """process(), noting when its replies depend on the batch the log has yet
        to take: from the start of this read if it wrote or the batch was open
        (what it reads may be undone)."""
        if self.producer is not None:
            return self.producer.input(data, start)
        server = self.server
        if self.batch_start >= 0 or server.ulog is None:
            return self.process(data, start)
        first = len(self.outbuf)
        if server.store.undo is not None:
            server.track_batch(self, first)
            return self.process(data, start)
        pos = self.process(data, start)
        if server.store.undo is not None:
            server.track_batch(self, first)
        return pos

    def more_to_do(self):
        return self.continuation is not None

    def process(self, buf, pos=0):
        """Handle the complete commands in buf[pos:], up to this pass's share;
        return the offset of the rest."""
        end = len(buf)
        outbuf, check_at = self.outbuf, self.check_at
        share = self.server.reqs_per_event
        if self.continuation is not None:
            if self.backed_up():
                return self._pause(pos)
            try:
                self._retrieve_part(*self.continuation)
            except ProtocolError as err:
                self.continuation = None
                self.write(err.line)
            if self.continuation is not None:
                share = 0                      # the rest of it first, in the next pass
        store = self.store            # (methods called on objects, not bound once: at
        cache = store.cache           # pipeline 1 the binding costs more than it saves)
        now, flush_stamp = store.now, store.flush_stamp
        hits = misses = sets = 0
        while pos < end and not self.closing:
            if len(outbuf) > check_at:
                if self.backed_up():
                    pos = self._pause(pos)
                    break
                check_at = self.check_at
            share -= 1
            if share < 0:
                pos = self._yield(pos)
                break
            # `get <key>` and `set <key> <flags> <exptime> <bytes>`, most of the
            # traffic, without the general framing; anything unusual takes it
            eol = buf.find(b"\n", pos)
            stop = eol - 1 if eol > 0 and buf[eol - 1] == 13 else eol   # the line, no CR
            head = buf[pos:pos + 4]
            if head == b"get ":
                key = buf[pos + 4:stop]
                # (an int operand: `b" " in key` tries it as an int first, raising)
                if eol > 0 and 0 < len(key) <= KEY_MAX_LENGTH and 32 not in key and 0 not in key:
                    pos = eol + 1
                    item = cache.get(key)
                    # Store.get for an item without exptime that no flush killed
                    if item and not item.exptime and item.stamp >= flush_stamp:
                        item.atime = now
                    else:
                        try:
                            item = store.get(key)
                        except ProtocolError as err:      # the store cannot be read
                            outbuf.append(err.line)
                            continue
                        if item is None:
                            misses += 1
                            outbuf.append(END)
                            continue
                    hits += 1
                    outbuf.append(item.rendered)
                    outbuf.append(END)
                    continue
            elif head == b"set " and eol > 0 and not self.reserved:
                tokens = buf[pos + 4:stop].split(b" ")
                if len(tokens) == 4:
                    key, flags, exptime, nbytes = tokens
                    start = eol + 1
                    if (0 < len(key) <= KEY_MAX_LENGTH and 0 not in key
                            and len(flags) < 10 and len(exptime) < 10 and len(nbytes) < 8
                            and flags.isdigit() and exptime.isdigit() and nbytes.isdigit()):
                        flags, nbytes = int(flags), int(nbytes)
                        after = start + nbytes + 2
                        if (after <= end and buf[after - 2:after] == CRLF
                                and item_size_ok(key, flags, nbytes, self.server.item_size_max)):
                            pos = after
                            sets += 1
                            try:
                                store.set(key, flags, int(exptime), buf[start:after - 2])
                            except ProtocolError as err:  # the log refuses writes now
                                outbuf.append(err.line)
                                continue
                            outbuf.append(STORED)
                            continue
            framed = frame_request(buf, pos)
            if framed is None:
                pos = self.line_incomplete(buf, pos)
                break
            spec, tokens, start, after, args = framed
            if spec is HTTP_REQUEST:
                pos = self._switch_to_http(buf, pos)
                break
            self.noreply = False
            try:
                if spec is None:
                    raise UNKNOWN
                if after == start:
                    HANDLERS[spec.name](self, tokens)
                else:
                    after, value = self._data_block(spec, tokens, args, buf, start, after)
                    if after is None:
                        self.need = framed[3] - pos
                        break
                    if value is not None:
                        HANDLERS[spec.name](self, tokens, args, value)
            except ProtocolError as err:
                if not self.noreply:
                    self.write(err.line)
            pos = after
            flush_stamp = store.flush_stamp            # a flush_all may have moved it
            if self.continuation is not None or self.producer is not None or self.handed_over:
                share = 0                      # a multiget took the rest of the share, or
                                               # the connection was taken over (section 10)
        else:
            self.need = 0
            if self.continuation is not None and not self.closing:
                pos = self._yield(pos)
            elif self.closing:
                pos = end
        if hits:
            self.stats["get_hits"] += hits
        if misses:
            self.stats["get_misses"] += misses
        if sets:
            self.stats["cmd_set"] += sets
        if outbuf and not self.queued:
            self._schedule()
        return pos

    def batch_kept(self):
        """The log took this pass's batch: the replies may go."""
        self.batch_start = -1

    def resume(self):
        if self.producer is not None:
            self.producer.fill()
        else:
            super().resume()

    def refuse_batch(self, error):
        """The log could not take this pass's batch: answer with error (a
        ServerError class) in place of every reply since the batch began here
        (they may show what was not kept), drop everything unparsed, and close."""
        del self.outbuf[self.batch_start:]
        self.batch_start = -1
        self.continuation = self.backlog = None
        if self.http is not None:
            self.writelines(http_response(HTTP_CLOSING, 507 if error is OUT_OF_SPACE else 503,
                                          detail=error.why))
        else:
            self.write(error.line)
        self.close_when_sent()

    def connection_lost(self):
        self.server.connections.discard(self)
        if self.producer is not None:
            self.producer.stop()
        super().connection_lost()

    # -- retrieval -----------------------------------------------------------

    def cmd_get(self, tokens):
        if len(tokens) != 2:
            self._retrieve(tokens, 1, None, False)
            return
        if len(tokens[1]) > KEY_MAX_LENGTH:
            raise BAD_FORMAT
        self.get_one(tokens[1])

    def get_one(self, key):
        """`get <key>`, most of the traffic: _retrieve without the loops."""
        item = self.store.get(key)
        if item is None:
            self.stats["get_misses"] += 1
            self.write(END)
        else:
            self.stats["get_hits"] += 1
            self.writelines((item.rendered, END))

    def cmd_gets(self, tokens):
        self._retrieve(tokens, 1, None, True)

    def cmd_gat(self, tokens):
        self._retrieve(tokens, 2, self._exptime_arg(tokens, 1), False)

    def cmd_gats(self, tokens):
        self._retrieve(tokens, 2, self._exptime_arg(tokens, 1), True)

    def _retrieve(self, tokens, first, exptime, with_cas):
        """get/gets (exptime None) and gat/gats: VALUE blocks for the hits, then END."""
        if len(tokens) < 2:
            raise UNKNOWN
        keys = tokens[first:]
        if keys and max(map(len, keys)) > KEY_MAX_LENGTH:
            raise BAD_FORMAT
        self._retrieve_part(keys, 0, exptime, with_cas)

    def _retrieve_part(self, keys, start, exptime, with_cas):
        """VALUE blocks for keys[start:] as far as this pass's share goes (each
        MULTIGET_KEYS_PER_REQUEST keys count as a request) and OUTPUT_HIGH_WATER
        bytes of values; END after the last."""
        last = min(len(keys), start + self.server.reqs_per_event * MULTIGET_KEYS_PER_REQUEST)
        lookup = self.store.get if exptime is None else self.store.touch
        args = () if exptime is None else (exptime,)
        out = []
        stop, size = start, 0
        while stop < last and size < OUTPUT_HIGH_WATER:
            item = lookup(keys[stop], *args)
            stop += 1
            if item is not None:
                size += len(item.rendered)
                if with_cas:
                    out.extend(item.gets_block())
                else:
                    out.append(item.rendered)
        hits = len(out) // 2 if with_cas else len(out)
        looked_up = stop - start
        stats = self.stats
        if exptime is None:
            stats["get_hits"] += hits
            stats["get_misses"] += looked_up - hits
        else:
            stats["cmd_touch"] += looked_up
            stats["touch_hits"] += hits
            stats["touch_misses"] += looked_up - hits
        if stop < len(keys):
            self.continuation = (keys, stop, exptime, with_cas)
        else:
            self.continuation = None
            out.append(END)
        self.writelines(out)

    # -- storage -------------------------------------------------------------

    def cmd_set(self, tokens, args=None, value=None):
        self._storage(tokens, args, value, self.store.set)

    def cmd_add(self, tokens, args=None, value=None):
        self._storage(tokens, args, value, self.store.add)

    def cmd_replace(self, tokens, args=None, value=None):
        self._storage(tokens, args, value, self.store.replace)

    def cmd_append(self, tokens, args=None, value=None):
        self._storage(tokens, args, value, self.store.append)

    def cmd_prepend(self, tokens, args=None, value=None):
        self._storage(tokens, args, value, self.store.prepend)

    def cmd_cas(self, tokens, args=None, value=None):
        self._storage(tokens, args, value, self.store.cas)

    def _storage(self, tokens, args, value, method):
        """A storage command with its data (memcached process_update_command);
        args None: its line did not parse, so say why."""
        self.noreply = tokens[-1] == NOREPLY
        if args is None:
            parse_storage(tokens)            # raises the error memcached gives
        key, flags, exptime, nbytes, cas_unique = args
        with_cas = method == self.store.cas
        try:
            status = method(key, flags, exptime, value, *((cas_unique,) if with_cas else ()))
        except ProtocolError as err:      # the log or the store cannot take it now
            self.reply(err.line)
            return
        if with_cas:
            self.stats[CAS_COUNTERS[status]] += 1
        self.reply(STATUS_LINES[status])

    def _data_block(self, spec, tokens, args, buf, start, end):
        """(offset past the request, data) for a request whose data block is
        buf[start:end] (the data and its CRLF).

        The offset is None until the block has all arrived. data is None when
        the block is refused (ms flags that do not parse; too large for -I; no
        room to hold it while it arrives, as memcached's item allocation
        fails; not ended by CRLF): the reply is queued and a refused block is
        skipped without being held. For set and ms a refusal for size also
        deletes the key's current item, as memcached unlinks it.
        """
        self.noreply = spec.block == BLOCK_STORAGE and tokens[-1] == NOREPLY
        if spec.block == BLOCK_STORAGE:
            key, flags, nbytes = args[0], args[1], args[3]
        else:
            try:
                key, flags = self._ms_flags(tokens)
            except ClientError as err:       # memcached swallows the block
                self.write(err.line)
                return self._skip_block(buf, end), None
            flags, nbytes = flags.get(70, 0), args
        refusal = None
        if not item_size_ok(key, flags, nbytes, self.server.item_size_max):
            self.stats["store_too_large"] += 1
            refusal = TOO_LARGE
        elif end > len(buf) and self.reserved < nbytes and not self.server.reserve(self, nbytes):
            self.stats["store_no_memory"] += 1
            refusal = NO_MEMORY
        if refusal is not None:
            if spec.name in (b"set", b"ms"):
                try:
                    self.store.delete(key)
                except ProtocolError:
                    pass     # the log refuses writes: the old item stays
            self.reply(refusal.line)
            return self._skip_block(buf, end), None
        if end > len(buf):
            return None, None
        if self.reserved:
            self.server.release(self)
        self.stats["cmd_set"] += 1
        if buf[end - 2:end] != CRLF:
            self.reply(BAD_DATA_CHUNK.line)
            return end, None
        return end, buf[start:end - 2]

    # -- meta commands (memcached 1.6.18 proto_text.c process_m*_command) -----
    #
    # Replies are a two-letter code then return flags in request order. `q`
    # drops only the nominal reply (a hit's HD is still sent by mg); errors
    # are never quiet, so meta handlers leave self.noreply alone.

    def _meta_args(self, tokens, too_long, flag_error=None):
        """(key, flags) after memcached's checks in its order; flag_error replaces
        any flag error (md and ma say only `invalid or duplicate flag`)."""
        if len(tokens) < 2:
            raise UNKNOWN
        if len(tokens[1]) > KEY_MAX_LENGTH:
            raise BAD_FORMAT
        if len(tokens) > META_TOKENS_MAX:
            raise too_long
        try:
            key, flags = parse_meta_flags(tokens, 2)
        except ClientError:
            if flag_error is None:
                raise
            raise flag_error from None
        return key, flags

    def cmd_mg(self, tokens):
        key, flags = self._meta_args(tokens, MG_TOO_LONG)
        store, stats = self.store, self.stats
        item = store.get(key, False)
        created = False
        if item is None and 78 in flags:                     # N: vivify on miss
            item = store.vivify(key)
            created = True
        if item is None:
            stats["get_misses"] += 1
            echo = meta_echo(flags, key, 98 in flags)      # its errors are never quiet
            if 113 not in flags:                             # q
                self.write(b" ".join([b"EN"] + echo) + CRLF)
            return
        nbytes = item.nbytes
        out = [b"VA %d" % nbytes if 118 in flags else b"HD"]
        exptime = item.exptime
        won = touched = opaque_too_long = False
        for char, arg in flags.items():
            if char in MG_SILENT_FLAGS:
                continue
            if char == 107:                                  # k
                out.append(meta_key(key, echo_base64(item, key, 98 in flags)))
            elif char == 99:                                 # c
                out.append(b"c%d" % item.cas)
            elif char == 102:                                # f
                out.append(b"f%d" % item.flags)
            elif char == 116:                                # t
                out.append(meta_ttl(exptime, store.now))
            elif char == 115:                                # s
                out.append(b"s%d" % nbytes)
            elif char == 79:                                 # O
                if len(arg) > META_OPAQUE_MAX:
                    opaque_too_long = True   # memcached finds out here, after T
                    break
                out.append(arg)
            elif char == 84:                                 # T: touch
                exptime = store.absolute(arg)
                touched = True
            elif char == 78:                                 # N
                if created:
                    exptime = store.absolute(arg)
                    won = True
            elif char == 82:                                 # R: recache below this TTL
                if (not item.state & TOKEN_SENT and not created and exptime
                        and exptime < store.absolute(arg)):
                    won = True
            elif char == 108:                                # l
                out.append(b"l%d" % (int(store.now) - int(abs(item.atime))))
            elif char == 104:                                # h
                out.append(b"h1" if item.atime > 0 else b"h0")
        if opaque_too_long:
            if exptime != item.exptime:
                store.set_exptime(key, item, exptime)
            if not flags.keys() & MG_LOCKING_FLAGS and 117 not in flags:
                store.fetched(key, item)   # memcached bumped it before looking at O
            raise OPAQUE_TOO_LONG
        if item.state & TOKEN_SENT:
            out.append(b"Z")
        if item.state & STALE:
            out.append(b"X")
            won = won or not item.state & TOKEN_SENT
        if won:
            out.append(b"W")
            item.state |= TOKEN_SENT
        if exptime != item.exptime:
            store.set_exptime(key, item, exptime)
        if touched:   # a hit with T counts as a touch (a miss counts as a get)
            stats["cmd_touch"] += 1
            stats["touch_hits"] += 1
        else:
            stats["get_hits"] += 1
        if 117 not in flags:                                 # u: no LRU bump
            store.fetched(key, item)
        out = b" ".join(out) + CRLF
        self.writelines((out, memoryview(item.rendered)[item.vstart:]) if 118 in flags else (out,))

    @staticmethod
    def _ms_flags(tokens):
        """(key, flags) of an ms whose datalen parsed; ClientError as memcached checks them."""
        key, flags = parse_meta_flags(tokens, 3)
        if flags.get(77, b"S") not in MS_MODES:              # M
            raise INVALID_MS_MODE
        meta_echo(flags, key, False)                 # its opaque error, before the data
        return key, flags

    def cmd_ms(self, tokens, nbytes=None, value=None):
        if nbytes is None:
            parse_meta_length(tokens)        # raises the error memcached gives
        key, flags = self._ms_flags(tokens)
        mode = flags.get(77, b"S")
        client_flags = flags.get(70, 0)                      # F
        cas_unique = flags.get(67)                           # C
        binary = KEY_BINARY if 98 in flags else 0
        try:
            status, item = self.store.store(mode, key, client_flags, flags.get(84, 0), value,
                                            cas_unique, 73 in flags, binary)
        except ProtocolError as err:      # the log or the store cannot take it now
            self.write(err.line)
            return
        if cas_unique is not None and mode in b"SR":
            self.stats[CAS_COUNTERS[status]] += 1
        if status == ST_STORED and 113 in flags:             # q
            return
        out = [META_STATUS[status]] + meta_echo(flags, key, binary,
                                                item.cas if item is not None else 0)
        self.write(b" ".join(out) + CRLF)

    def cmd_md(self, tokens):
        key, flags = self._meta_args(tokens, META_TOO_LONG, INVALID_OR_DUPLICATE_FLAG)
        echo = meta_echo(flags, key, 98 in flags)          # memcached checks O before the delete
        store = self.store
        item = store.get(key, False)
        if item is None:
            status = ST_NOT_FOUND
        elif 67 in flags and flags[67] != item.cas:          # C
            status = ST_EXISTS
        elif 73 in flags:                                    # I: mark stale, keep it
            store.mark_stale(key, item, store.absolute(flags[84]) if 84 in flags
                             else item.exptime)
            status = ST_STORED
        else:
            store.delete(key)
            self.stats["delete_hits"] += 1
            status = ST_STORED
        if status != ST_STORED:
            self.stats["delete_misses"] += 1
        elif 113 in flags:
            return
        self.write(b" ".join([META_STATUS[status]] + echo) + CRLF)

    def cmd_ma(self, tokens):
        key, flags = self._meta_args(tokens, META_TOO_LONG, INVALID_OR_DUPLICATE_FLAG)
        mode = flags.get(77, b"I")                           # M
        if mode not in MA_MODES:
            raise INVALID_MA_MODE
        incr = mode in b"I+"
        store, stats = self.store, self.stats
        status, result, item = store.incr(key, flags.get(68, 1), incr, flags.get(67, 0))
        if status == ST_NON_NUMERIC:
            raise NON_NUMERIC_VALUE
        name = "incr" if incr else "decr"
        created = False
        if status == ST_STORED:
            stats[name + "_hits"] += 1
        elif status == ST_NOT_FOUND:
            if 78 in flags:                                  # N: create with J
                result = flags.get(74, 0)
                item = store.vivify(key, b"%d" % result)
                created = True
            else:
                stats[name + "_misses"] += 1
        if item is None:
            out = [META_STATUS[status]] + meta_echo(flags, key, 98 in flags)
            self.write(b" ".join(out) + CRLF)
            return
        digits = b"%d" % result
        out = [b"VA %d" % len(digits) if 118 in flags else b"HD"]
        exptime = item.exptime
        opaque_too_long = False
        for char, arg in flags.items():
            if char == 99:                                   # c
                out.append(b"c%d" % item.cas)
            elif char == 116:                                # t
                out.append(meta_ttl(exptime, store.now))
            elif char == 84:                                 # T
                exptime = store.absolute(arg)
            elif char == 78:                                 # N
                if created:
                    exptime = store.absolute(arg)
            elif char == 79:
                if len(arg) > META_OPAQUE_MAX:
                    opaque_too_long = True   # found after the change, as memcached does
                    break
                out.append(arg)
            elif char == 107:
                out.append(meta_key(key, 98 in flags))
        if exptime != item.exptime:
            store.set_exptime(key, item, exptime)
        if opaque_too_long:
            raise OPAQUE_TOO_LONG
        if 113 in flags and not created:                     # q: quiet success
            return
        out = b" ".join(out) + CRLF
        self.write(out + digits + CRLF if 118 in flags else out)

    def cmd_mn(self, tokens):
        self.write(b"MN\r\n")

    def cmd_me(self, tokens):
        """`me <key> [b]`: memcached's item debug line, with its slab class and size."""
        if len(tokens) < 2 or len(tokens[1]) > KEY_MAX_LENGTH:
            raise BAD_FORMAT
        key = tokens[1]
        decoded = len(tokens) > 2 and tokens[2] == b"b"
        if decoded:
            key = base64_key(key)
            if key is None:
                raise BAD_FORMAT
        self.stats["cmd_meta"] += 1
        item = self.store.get(key, False)
        if item is None:
            self.write(b"EN\r\n")
            return
        now_s = int(self.store.now)
        binary = echo_base64(item, key, decoded)
        shown = binascii.b2a_base64(key, newline=False) if binary else key
        size = item_total_size(key, item.flags, item.nbytes)
        self.write(b"ME %b exp=%d la=%d cas=%d fetch=%b cls=%d size=%d\r\n" % (
            shown, now_s - item.exptime if item.exptime else -1, now_s - int(abs(item.atime)),
            item.cas, b"yes" if item.atime > 0 else b"no", slab_class(size), size))

    # -- HTTP: the same items over HTTP/1.1 (README "HTTP") ---------------------
    #
    # A connection switches here at its first HTTP request line. Each
    # request is answered once its whole body is in; framing errors answer
    # and close, every other refusal keeps the connection.

    def http_request(self, request):
        """HttpParser: answer one whole request, then close if it asked to."""
        self.http_req = request
        try:
            self._http_route(request.method, request.key, request.headers, request.body)
        except ServerError as err:        # the log or the store cannot take it now
            self._http_reply(507 if isinstance(err, OUT_OF_SPACE) else 503, detail=err.why)
        if request.close:
            self.close_when_sent()

    def http_error(self, status, detail):
        """HttpParser: a request that cannot be framed; the connection closes."""
        self.writelines(http_response(HTTP_CLOSING, status, detail=detail))

    def _http_route(self, method, key, headers, body):
        if method not in HTTP_METHODS:
            return self._http_reply(405, extra=HTTP_ALLOW_ALL)
        if key is None:
            return self._http_reply(400, detail=b"request target is not a path")
        if len(key) > KEY_MAX_LENGTH:
            return self._http_reply(400, detail=b"key longer than 250 bytes")
        if not key:
            if method not in (b"GET", b"HEAD"):
                return self._http_reply(405, extra=HTTP_ALLOW_ROOT)
            stats = {name: _json_number(value) for name, value in self.server.general_stats()}
            return self._http_reply(200, json.dumps(stats).encode() + b"\n",
                                    b"application/json")
        if method in (b"GET", b"HEAD"):
            return self._http_get(key)
        if method == b"DELETE":
            return self._http_delete(key, headers)
        return self._http_put(key, headers, body)

    def _http_get(self, key):
        item = self.store.get(key)
        if item is None:
            self.stats["get_misses"] += 1
            return self._http_reply(404)
        self.stats["get_hits"] += 1
        return self._http_reply(200, memoryview(item.rendered)[item.vstart:-2],
                                b"application/octet-stream",
                                http_item_headers(item.flags, item.exptime, item.cas))

    def _http_precondition(self, key, headers):
        """(passes, cas unique to require or None) for the request's If-Match."""
        condition = headers.get(b"if-match")
        if condition is None:
            return True, None
        item = self.store.get(key, False)
        if not if_match(condition, item and item.cas):
            return False, None
        return True, item.cas

    def _http_delete(self, key, headers):
        passes, cas_unique = self._http_precondition(key, headers)
        if not passes:
            return self._http_reply(412)
        status = self.store.delete(key, cas_unique)
        self.stats["delete_hits" if status == ST_DELETED else "delete_misses"] += 1
        return self._http_reply(200 if status == ST_DELETED else 404)

    def _http_put(self, key, headers, body):
        """PUT/POST: set, or add/append by X-TT-PDMODE, or cas by If-Match."""
        flags = headers.get(b"x-memtool-flags", b"0")
        if not flags.isdigit() or len(flags) > 10 or int(flags) > UINT32_MASK:
            return self._http_reply(400, detail=b"bad X-Memtool-Flags")
        flags = int(flags)
        exptime = headers.get(b"x-memtool-exptime", b"0")
        if not HTTP_EXPTIME.match(exptime) or not -2**31 <= int(exptime) < 2**31:
            return self._http_reply(400, detail=b"bad X-Memtool-Exptime")
        exptime = int(exptime)
        mode = PDMODES.get(headers.get(b"x-tt-pdmode"))
        if mode is None:
            return self._http_reply(400, detail=b"bad X-TT-PDMODE")
        if not item_size_ok(key, flags, len(body), self.server.item_size_max):
            self.stats["store_too_large"] += 1
            return self._http_reply(413)
        passes, cas_unique = self._http_precondition(key, headers)
        if not passes:
            return self._http_reply(412)
        if mode == b"A" and self.store.get(key, False) is None:
            mode = b"S"                        # Tokyo Tyrant's concat creates the record
        state = KEY_BINARY if TEXT_KEY_UNSAFE.search(key) else 0
        self.stats["cmd_set"] += 1
        status, item = self.store.store(mode, key, flags, exptime, body, cas_unique, False,
                                        state)
        if status == ST_STORED:
            return self._http_reply(201, extra=b'ETag: "%d"\r\n' % item.cas)
        if mode == b"A":                       # the joined value would pass -I
            self.stats["store_too_large"] += 1
            return self._http_reply(413)
        return self._http_reply(409 if mode == b"E" else 412)

    def _http_reply(self, status, body=None, content_type=b"text/plain", extra=b"",
                    detail=b""):
        """Queue the response to the request being answered (http_response)."""
        self.writelines(http_response(self.http_req, status, body, content_type, extra, detail))

    # -- other commands ------------------------------------------------------

    def cmd_delete(self, tokens):
        ntokens = len(tokens)
        if not 2 <= ntokens <= 4:
            raise UNKNOWN
        if ntokens > 2:
            self.noreply = tokens[-1] == NOREPLY
            hold_is_zero = tokens[2] == b"0"
            if not ((ntokens == 3 and (hold_is_zero or self.noreply))
                    or (ntokens == 4 and hold_is_zero and self.noreply)):
                raise DELETE_USAGE
        key = self._key_arg(tokens)
        status = self.store.delete(key)
        self.stats["delete_hits" if status == ST_DELETED else "delete_misses"] += 1
        self.reply(STATUS_LINES[status])

    def cmd_incr(self, tokens):
        self._arith(tokens, True)

    def cmd_decr(self, tokens):
        self._arith(tokens, False)

    def _arith(self, tokens, incr):
        if len(tokens) not in (3, 4):
            raise UNKNOWN
        self.noreply = tokens[-1] == NOREPLY
        key = self._key_arg(tokens)
        delta = parse_uint64(tokens[2])
        if delta is None:
            raise INVALID_DELTA
        status, value, item = self.store.incr(key, delta, incr)
        if status == ST_NON_NUMERIC:
            raise NON_NUMERIC_VALUE
        name = "incr" if incr else "decr"
        self.stats[name + ("_misses" if status == ST_NOT_FOUND else "_hits")] += 1
        self.reply(NOT_FOUND if status == ST_NOT_FOUND else b"%d\r\n" % value)

    def cmd_touch(self, tokens):
        if len(tokens) not in (3, 4):
            raise UNKNOWN
        self.noreply = tokens[-1] == NOREPLY
        key = self._key_arg(tokens)
        item = self.store.touch(key, self._exptime_arg(tokens, 2))
        self.stats["cmd_touch"] += 1
        self.stats["touch_misses" if item is None else "touch_hits"] += 1
        self.reply(NOT_FOUND if item is None else TOUCHED)

    def cmd_flush_all(self, tokens):
        if len(tokens) > 3:
            raise UNKNOWN
        self.noreply = tokens[-1] == NOREPLY
        delay = 0
        if len(tokens) != (2 if self.noreply else 1):
            delay = self._exptime_arg(tokens, 1)
        self.stats["cmd_flush"] += 1
        self.store.flush_all(delay)
        self.reply(OK)

    def cmd_version(self, tokens):
        self.write(b"VERSION " + VERSION_STRING + CRLF)

    def cmd_verbosity(self, tokens):
        if len(tokens) not in (2, 3):
            raise UNKNOWN
        self.noreply = tokens[-1] == NOREPLY
        if parse_uint64(tokens[1]) is None:
            raise BAD_FORMAT
        self.reply(OK)

    def cmd_stats(self, tokens):
        self.write(stats_reply(tokens, self.server))

    def cmd_cache_memlimit(self, tokens):
        """`cache_memlimit <megabytes> [noreply]`: change -m at run time."""
        if len(tokens) not in (2, 3):
            raise UNKNOWN
        self.noreply = tokens[-1] == NOREPLY
        megabytes = parse_uint64(tokens[1])
        if megabytes is None or megabytes > UINT32_MASK:
            raise UNKNOWN
        if megabytes < 8:
            self.reply(b"MEMLIMIT_TOO_SMALL cannot set maxbytes to less than 8m\r\n")
        elif megabytes > 1000000000:
            self.reply(b"MEMLIMIT_ADJUST_FAILED input value is megabytes not bytes\r\n")
        else:
            self.store.set_memory_limit(megabytes << 20)
            self.reply(OK)

    def cmd_quit(self, tokens):
        self.close_when_sent()

    def cmd_shutdown(self, tokens):
        if not self.server.enable_shutdown:
            self.write(b"ERROR: shutdown not enabled\r\n")
        elif len(tokens) == 1 or (len(tokens) == 2 and tokens[1] == b"graceful"):
            self.close_when_sent()
            self.server.shutdown()
        else:
            raise ClientError(b"invalid shutdown mode")

    # -- argument helpers ----------------------------------------------------

    @staticmethod
    def _key_arg(tokens):
        key = tokens[1]
        if len(key) > KEY_MAX_LENGTH:
            raise BAD_FORMAT
        return key

    @staticmethod
    def _exptime_arg(tokens, index):
        if len(tokens) <= index:
            raise UNKNOWN
        exptime = parse_int32(tokens[index])
        if exptime is None:
            raise INVALID_EXPTIME
        return exptime


def echo_base64(item, key, decoded):
    """Echo an item's key in base64? As memcached does when it was stored with `b`;
    also when a decoded key holds bytes no text line can carry (memcached sends
    those raw, and they would break the reply stream)."""
    return bool(item.state & KEY_BINARY) or (decoded and TEXT_KEY_UNSAFE.search(key) is not None)


def _json_number(value):
    """A `stats` value for JSON: numbers as numbers, the rest as strings."""
    if isinstance(value, str) and re.match(r"-?[0-9]+(\.[0-9]+)?\Z", value):
        return float(value) if "." in value else int(value)
    return value


HANDLERS = {name[4:].encode(): method for name, method in vars(ServerConnection).items()
            if name.startswith("cmd_")}
HANDLERS[b"bget"] = ServerConnection.cmd_get


class Server(HeldInput):
    """`serve`: a Store and its UpdateLog behind a Listener, on an EventLoop.

    Construct with serve(); run() blocks until SIGTERM/SIGINT, `shutdown`
    (with enable_shutdown) or stop(), then closes everything cleanly.
    listener: a bound Listener on `loop` (serve() binds it before replaying
    the log, so a taken port is reported at once). http: answer HTTP on the
    port; http_origins: Origin values allowed; http_hosts: Host names
    allowed (None: any), see ServerConnection._http_check_origin.
    """

    def __init__(self, store, ulog, listener, max_conns=MAX_CONNS_DEFAULT,
                 enable_shutdown=False, settings=None, reqs_per_event=REQS_PER_EVENT_DEFAULT,
                 http=True, http_origins=(), http_hosts=None,
                 repl_backlog=REPL_BACKLOG_DEFAULT):
        self.store = store                   # the items
        self.ulog = ulog                     # the UpdateLog, None for the memory engine
        self.max_conns = max_conns           # -c
        self.enable_shutdown = enable_shutdown
        self.reqs_per_event = reqs_per_event  # -R: a client's share of a loop pass
        self.http = http                     # answer HTTP on the port
        self.http_origins = frozenset(o.encode() for o in http_origins)
        self.http_hosts = None if http_hosts is None else frozenset(
            h.lower().encode() for h in http_hosts)
        self.item_size_max = store.item_size_max
        self.extra_settings = settings or {}  # shown by `stats settings`
        self.stats = dict.fromkeys(SERVER_COUNTERS, 0)
        self.connections = set()             # open ServerConnections
        self.batch_conns = []                # connections whose replies wait on the batch
        self.recovered = (0, 0, 0.0)         # (records replayed, items, seconds) at start
        self.started = now()
        self.loop = listener.loop
        self.listener = listener
        self.address = listener.address
        self.feed = ulog                     # what replicas read: the ulog or a MemoryBacklog
        self.repl_backlog = repl_backlog     # bytes of such a MemoryBacklog
        self.followers = []                  # the replication streams served (section 10)
        self.pruned_after = None             # the checkpoint's file at the last prune
        self.links = []                      # the peers pulled from (section 10)
        self.stat_groups = {}                # `stats <name>` -> pairs(), added by sections below
        listener.factory = self._accept
        if ulog is not None:
            store.journal, store.undoable = ulog.append, True
        self.loop.ready_hooks.append(self._tick)
        self.loop.pass_hooks.append(self._group_commit)
        self.loop.call_every(SWEEP_INTERVAL_SECONDS, self._sweep)
        if ulog is not None and ulog.sync_mode == "everysec":
            self.loop.call_every(1.0, ulog.sync)

    def run(self):
        """Serve until stopped; then answer what is in flight and close."""
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self.loop.add_signal_handler(signum, self.shutdown)
        log.info("serving on %s:%d", *self.address)
        try:
            self.loop.run()
        finally:
            self.close()

    def shutdown(self):
        """Stop accepting and leave the loop after the current pass."""
        self.listener.close()
        self.loop.stop()

    def close(self):
        self.listener.close()
        self._group_commit()
        for conn in list(self.connections):
            conn.flush()
            conn.close()
        if self.ulog is not None:
            self.ulog.close()
        if not self.store.close():
            log.error("the store keeps its older log position; the next start replays "
                      "the update log from there")
        self.loop.close()
        log.info("stopped")

    def held_limit(self):
        """Incomplete input counts against -m (at least HELD_BYTES_MIN)."""
        return max(self.store.memory_limit, HELD_BYTES_MIN)

    def general_stats(self):
        """(name, value) pairs of `stats`: every name memcached 1.6.18 prints, in its
        order (0 where memtool has no such thing), then memtool's own."""
        t = now()
        times = os.times()
        counters = dict(self.stats)
        for conn in self.connections:
            counters["bytes_read"] += conn.bytes_read
            counters["bytes_written"] += conn.bytes_written
        store, listener = self.store, self.listener
        values = dict(counters, **{
            "cmd_get": counters["get_hits"] + counters["get_misses"],     # always so
            "pid": os.getpid(), "uptime": int(t - self.started), "time": int(t),
            "version": VERSION_STRING.decode(),
            "libevent": type(self.loop.selector).__name__,
            "pointer_size": struct.calcsize("P") * 8,
            "rusage_user": "%.6f" % times.user, "rusage_system": "%.6f" % times.system,
            "max_connections": self.max_conns, "curr_connections": len(self.connections),
            "connection_structures": len(self.connections) + 1,
            "reserved_fds": RESERVED_FDS, "limit_maxbytes": store.memory_limit,
            "accepting_conns": int(listener.accepting),
            "listen_disabled_num": listener.disabled,
            "time_in_listen_disabled_us": int(listener.disabled_seconds * 1e6),
            "threads": 1, "bytes": store.bytes, "curr_items": store.curr_items,
            **{name: getattr(store, name) for name in STORE_COUNTERS}})
        pairs = [(name, values.get(name, 0)) for name in MEMCACHED_STATS]
        if self.ulog is not None:
            pairs += [("ulog_file", self.ulog.name), ("ulog_offset", self.ulog.offset)]
        for group in self.stat_groups.values():
            pairs += group()
        return pairs

    def start_backlog(self):
        """The memory engine keeps its newest records for replicas from now on
        (the first replica to ask, or --peer, starts it)."""
        if self.feed is None:
            self.feed = MemoryBacklog(self.repl_backlog)
            self.store.journal = self.feed.append

    def settings(self):
        """(name, value) pairs of `stats settings`."""
        pairs = [("maxbytes", self.store.memory_limit), ("maxconns", self.max_conns),
                 ("tcpport", self.address[1]), ("udpport", 0), ("inter", self.address[0]),
                 ("num_threads", 1), ("evictions", "on"), ("item_size_max", self.item_size_max),
                 ("cas_enabled", "yes"), ("flush_enabled", "yes"),
                 ("reqs_per_event", self.reqs_per_event),
                 ("shutdown_command", "yes" if self.enable_shutdown else "no")]
        return pairs + sorted(self.extra_settings.items())

    def reset_stats(self):
        for name in SERVER_COUNTERS:
            self.stats[name] = 0
        for conn in self.connections:
            conn.bytes_read = conn.bytes_written = 0
        self.store.reset_counters()

    def _accept(self, sock, addr):
        if len(self.connections) >= self.max_conns:
            self.stats["rejected_connections"] += 1
            try:
                sock.send(b"ERROR Too many open connections\r\n")
            except OSError:
                pass
            sock.close()
            return
        self.stats["total_connections"] += 1
        self.connections.add(ServerConnection(self, sock, addr))

    def track_batch(self, conn, start):
        """conn's replies from outbuf index start on depend on the open batch:
        refuse them if the log cannot take it."""
        conn.batch_start = start
        self.batch_conns.append(conn)

    def _group_commit(self):
        """One ulog write (+fsync under --sync always) and one store commit per
        pass; when the log cannot take the batch, the store rolls it back and
        the clients that wrote get the log's refusal instead of their replies."""
        ulog = self.ulog
        if ulog is None:
            if self.feed is not None:
                self.feed.flush()
            for conn in self.batch_conns:
                conn.batch_kept()
        else:
            name = ulog.name
            if ulog.flush():
                self.store.commit(ulog.position, log_last=ulog.last_record)
                for conn in self.batch_conns:
                    conn.batch_kept()
                checkpoint = self.store.checkpoint_position
                if checkpoint and (ulog.name != name or checkpoint[0] != self.pruned_after):
                    self.pruned_after = checkpoint[0]      # a rotation or a checkpoint
                    ulog.prune(checkpoint, min(            # that moved to a later file
                        (f.position or f.copy_end for f in self.followers), default=None))
            else:
                try:
                    self.store.rollback()
                finally:
                    for conn in self.batch_conns:
                        conn.refuse_batch(ulog.refusal)
        self.batch_conns.clear()
        for follower in list(self.followers):
            try:
                follower.fill()
            except Exception:                 # one stream's fault ends that stream only
                log.exception("replication to %s: ending the stream", follower.conn.addr)
                follower.conn.close()

    def _tick(self):
        self.store.tick(now())

    def _sweep(self):
        self.store.sweep()


def recover(store, ulog, data_dir):
    """Replay the ulog records the store has not applied yet; returns their count.

    Checkpoints as it goes, so memory stays bounded by the read cache (-m)
    twice over. A torn tail of the newest file is cut. Raises
    ConfigError for any other damage, naming the file, the offset and the
    repair command.
    """
    count = held = 0
    reader = LogReader(ulog.directory, store.log_position)
    last = None                                 # the last record replayed
    try:
        for record in reader.records():
            store.tick(record.ts / 1e6)         # the log's clock: expiry, delayed flushes
            store.apply(record)
            count += 1
            held += len(record.value)
            last = record
            if len(store.pending) >= CHECKPOINT_ITEMS or held >= store.memory_limit:
                store.commit(reader.position, force=True, log_last=record_end(last))
                held = 0
    except LogDamaged as err:
        if not err.torn:
            raise ConfigError(f"update log {err.path} is damaged at offset {err.offset}, "
                              f"and records follow that cannot be skipped safely; "
                              f"`memtool.py check --data {data_dir} --fix` keeps every good "
                              f"record and moves the damaged file aside") from None
        log.warning("update log %s: cutting an unfinished record at offset %d (a write "
                    "cut short by a crash)", err.path, err.offset)
        ulog.cut(reader.name, reader.offset)
    ulog.open()
    if ulog.position == reader.position:     # a replica's position names it (section 10)
        ulog.last_record = store.log_last if last is None else record_end(last)
    store.tick(now())
    # Also when nothing was replayed: after a power loss the store may name an
    # offset past what the log kept, and appends would go below it.
    store.commit(ulog.position, force=True, log_last=ulog.last_record)
    return count


def raise_fd_limit(max_conns):
    """Raise the soft open-files limit to what max_conns clients need, as memcached
    does; ConfigError with memcached's message when the hard limit is too low."""
    need = max_conns + RESERVED_FDS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            raise ConfigError("failed to set rlimit for open files. Try starting as root or "
                              "requesting smaller maxconns value.")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def serve(host=DEFAULT_HOST, port=DEFAULT_PORT, data_dir=DEFAULT_DATA_DIR, engine="sqlite",
          item_size_max=ITEM_SIZE_MAX_DEFAULT, max_conns=MAX_CONNS_DEFAULT,
          memory_limit_mb=None, sync="everysec",
          ulog_limit=ULOG_LIMIT_DEFAULT, ulog_keep=ULOG_KEEP_DEFAULT, sid=1,
          enable_shutdown=False, reqs_per_event=REQS_PER_EVENT_DEFAULT, http=True,
          http_origins=(), http_hosts=(), tombstone_ttl=TOMBSTONE_TTL_DEFAULT,
          ulog_retain=ULOG_RETAIN_DEFAULT, repl_backlog=REPL_BACKLOG_DEFAULT, loop=None):
    """Bind the port, open (or create) the data directory, recover. Returns a Server.

    engine: one of ENGINES. item_size_max, ulog_limit, ulog_retain,
    repl_backlog: bytes. memory_limit_mb: megabytes (None:
    MEMORY_LIMIT_MB_DEFAULT for the memory engine, else
    READ_CACHE_MB_DEFAULT). sync: one of SYNC_MODES. sid: this server's id,
    in the stamps of its changes. tombstone_ttl: seconds. http_hosts: Host
    names allowed besides the listen address and localhost when listening
    on loopback. loop: an EventLoop to share (a new one if
    None). Raises ConfigError for a missing dbm module, a data directory that
    cannot be used (another engine's, damaged: the message says what to
    run) or too few file descriptors; OSError for an unusable address.
    """
    raise_fd_limit(max_conns)
    if memory_limit_mb is None:
        memory_limit_mb = MEMORY_LIMIT_MB_DEFAULT if engine == "memory" else READ_CACHE_MB_DEFAULT
    loop = loop or EventLoop()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):   # during recovery: noted, and
            loop.add_signal_handler(signum, loop.stop)    # obeyed once the loop runs
    listener = Listener(loop, host, port, None)
    started = time.monotonic()
    prepare_data_dir(data_dir, engine)
    ulog = None
    if engine != "memory":
        ulog = UpdateLog(os.path.join(data_dir, "ulog"), sync=sync, limit=ulog_limit,
                         keep=ulog_keep, retain=ulog_retain)
    try:
        store = Store(open_engine(engine, data_dir, memory_limit_mb << 20),
                      memory_limit_mb << 20, item_size_max, sid=sid,
                      tombstone_ttl=tombstone_ttl)
        count = recover(store, ulog, data_dir) if ulog is not None else 0
        store.start_writer()
    except BaseException:
        listener.close()
        if ulog is not None:
            ulog.close()
        raise
    hosts = None
    if ipaddress.ip_address(listener.address[0]).is_loopback or http_hosts:
        hosts = {listener.address[0], f"[{listener.address[0]}]", "localhost", *http_hosts}
    settings = {"engine": engine, "sync": sync, "sid": sid, "ulog_limit": ulog_limit,
                "tombstone_ttl": tombstone_ttl,
                "data_dir": os.path.abspath(data_dir) if ulog is not None else "-"}
    server = Server(store, ulog, listener, max_conns, enable_shutdown, settings,
                    reqs_per_event, http, http_origins, hosts, repl_backlog)
    server.recovered = (count, store.curr_items, time.monotonic() - started)
    return server


class DataCheck:
    """`memtool.py check`: verify a data directory, and with fix, repair it.

    Reports through `report` (one line per call). run() returns True when
    all is well (after the repairs, with fix). Repairs never delete: what
    they replace goes to <data>/aside/. A damaged ulog file is rewritten
    with every good record from before and after the damage; a store that
    cannot be read is rebuilt from the log; undecodable rows are dropped and
    the whole kept log is replayed over the store at the next start.
    """

    def __init__(self, data_dir, fix=False, report=print):
        self.data_dir = data_dir              # the directory checked
        self.fix = fix                        # repair what can be repaired
        self.report = report                  # takes one line of text
        self.ulog_dir = os.path.join(data_dir, "ulog")
        self.problems = 0                     # found and not repaired
        self.replay_all = False               # the store must replay the whole kept log

    def run(self):
        engine = self._engine()
        ulog = UpdateLog(self.ulog_dir)      # holds the lock: no server is running on it
        try:
            self.report(f"memtool check {self.data_dir} ({engine} engine)")
            for name in ulog_names(self.ulog_dir):
                self._check_log(name)
            self._check_store(engine, ulog)
        finally:
            ulog.close()
        self.report("all is well" if not self.problems else
                    f"{self.problems} problem(s)" + ("" if self.fix else "; --fix repairs them"))
        return not self.problems

    def convert(self, new_engine):
        """Copy every item into a store of new_engine (the log replayed first) and
        make it the directory's engine; the old store files go aside."""
        old_engine = self._engine()
        if new_engine in (old_engine, "memory"):
            raise ConfigError(f"cannot convert a {old_engine} store to {new_engine}")
        new_files = "store." + ("sqlite3" if new_engine == "sqlite" else new_engine)
        for name in store_files(self.data_dir):
            if name.startswith(new_files):
                self._move_aside(name)         # an old store of that engine: start empty
        ulog = UpdateLog(self.ulog_dir)
        try:
            store = Store(open_engine(old_engine, self.data_dir))
            recover(store, ulog, self.data_dir)
            target = open_engine(new_engine, self.data_dir)
            rows = self._copy_rows(store.engine, target)
            store.engine.close()
            target.close()
        finally:
            ulog.close()
        for name in store_files(self.data_dir):
            if not name.startswith(new_files):
                self._move_aside(name)
        record_engine(self.data_dir, new_engine)
        self.report(f"converted {rows} rows from {old_engine} to {new_engine}")

    # -- internals -----------------------------------------------------------

    def _engine(self):
        if os.path.exists(self.data_dir) and not os.path.isdir(self.data_dir):
            raise ConfigError(f"--data {self.data_dir}: not a directory")
        engine = recorded_engine(self.data_dir)
        if engine is None or not os.path.isdir(self.ulog_dir):
            raise ConfigError(f"{self.data_dir} holds no memtool data")
        return engine

    def _problem(self, text, repaired=None):
        if self.fix and repaired:
            self.report(f"{text}: repaired, {repaired}")
        else:
            self.problems += 1
            self.report(text)

    def _check_log(self, name):
        path = os.path.join(self.ulog_dir, name)
        records, good, damaged = scan_ulog_file(path)
        size = os.path.getsize(path)
        self.report(f"ulog/{name}: {records} records, {size} bytes")
        if not damaged:
            return
        newest = name == ulog_names(self.ulog_dir)[-1]
        if len(damaged) == 1 and damaged[0][1] == size and newest:
            with open(path, "rb") as f:
                buf = f.read()
            if _is_torn_tail(buf, damaged[0][0], True):
                self.report(f"ulog/{name}: an unfinished last record at offset "
                            f"{damaged[0][0]} (a write cut short; start-up cuts it)")
                if self.fix:
                    os.truncate(path, damaged[0][0])
                return
        ranges = ", ".join(f"{a}-{b}" for a, b in damaged)
        repaired = None
        if self.fix:
            self._rewrite_log(name, good)
            repaired = (f"kept {records} good records, the damaged file is in aside/")
        self._problem(f"ulog/{name}: damaged bytes {ranges}", repaired)

    def _rewrite_log(self, name, good):
        path = os.path.join(self.ulog_dir, name)
        with open(path, "rb") as f:
            buf = f.read()
        with open(path + ".tmp", "wb") as f:
            for start, end in good:
                f.write(buf[start:end])
            f.flush()
            os.fsync(f.fileno())
        self._move_aside(os.path.join("ulog", name), keep=True)
        os.replace(path + ".tmp", path)
        self.replay_all = True      # offsets in the rewritten file have moved

    def _check_store(self, engine, ulog):
        try:
            store = Store(open_engine(engine, self.data_dir))
        except StoreUnreadable as err:
            repaired = self._rebuild_store(engine, ulog) if self.fix else None
            self._problem(f"store: {err}", repaired)
            return
        rows, damaged = self._scan_rows(store.engine)
        self.report(f"store: {rows} rows, applied up to ulog/{store.log_position[0]} offset "
                    f"{store.log_position[1]}" if store.log_position else
                    f"store: {rows} rows, no log applied yet")
        if damaged:
            keys = ", ".join(repr(k) for k in damaged[:DAMAGED_KEYS_LOGGED])
            repaired = None
            if self.fix:
                store.engine.write([], damaged)
                store.curr_items -= len(damaged)
                self.replay_all = True
                repaired = "dropped them; the next start replays the whole kept log"
            self._problem(f"store: {len(damaged)} row(s) that do not decode: {keys}", repaired)
        if self.replay_all:
            store.log_position = None
            store.meta_dirty = True
            store.checkpoint()
        store.engine.close()

    def _scan_rows(self, engine):
        rows, damaged, after = 0, [], b""
        while True:
            batch = engine.scan(after, SWEEP_STEP_ITEMS, whole=True)
            for key, record in batch:
                if len(key) > KEY_MAX_LENGTH:
                    continue     # the meta record
                rows += 1
                try:
                    Item.from_record(key, record)
                except (struct.error, TypeError):
                    damaged.append(key)
            if len(batch) < SWEEP_STEP_ITEMS:
                return rows, damaged
            after = batch[-1][0]

    def _rebuild_store(self, engine, ulog):
        for name in store_files(self.data_dir):
            self._move_aside(name)
        store = Store(open_engine(engine, self.data_dir))
        records = recover(store, ulog, self.data_dir)
        store.close()
        lost = ""
        try:
            with open(os.path.join(self.ulog_dir, ULOG_PRUNED)) as f:
                lost = (f"; the log was pruned up to {f.read().strip()}, so items last "
                        f"changed before then are lost")
        except FileNotFoundError:
            pass
        return f"rebuilt from {records} log records, the old files are in aside/{lost}"

    def _copy_rows(self, source, target):
        rows, after = 0, b""
        while True:
            batch = source.scan(after, CHECKPOINT_ITEMS, whole=True)
            target.write(batch, [])
            rows += sum(1 for key, _ in batch if len(key) <= KEY_MAX_LENGTH)
            if len(batch) < CHECKPOINT_ITEMS:
                return rows
            after = batch[-1][0]

    def _move_aside(self, name, keep=False):
        """Move data_dir/name into aside/; with keep, link it there and leave it
        in place (it is about to be replaced: never a moment without it)."""
        aside = os.path.join(self.data_dir, "aside")
        os.makedirs(aside, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        (os.link if keep else os.replace)(
            os.path.join(self.data_dir, name),
            os.path.join(aside, f"{os.path.basename(name)}.{stamp}"))


# ===== 9. Proxy ==============================================================
#
# `memtool.py proxy`, twemproxy's model. A client's requests are framed by
# frame_request(), routed by the pool's continuum to a Backend and sent on
# one of its server_connections Upstreams, pipelined. Each request takes a
# reply slot on its client; replies come back in each Upstream's order, fill
# their slots, and slots leave in request order (nc_connection.c's picture):
#
#   client --requests--> ProxyConnection --route--> Backend (Upstream x n) --> server
#          <--slots, in order--'          <--replies, in order--'
#
# A multiget is split per backend and merged back in the client's key order.
# A quiet request (noreply, meta q) goes with an `mn` after it, so that
# whatever the server says for it comes back before an MN, and a connection
# never loses its place in the reply stream. Requests are validated by the
# backend, which answers exactly what memcached answers; only what cannot be
# routed (unknown commands, keys over 250 bytes in a multiget, lines too
# long) is answered here.
#
# Backups: every write also goes to the key's backup (the backups are a ring
# of their own). A primary that fails is taken out; its keys are answered by
# their backups and the keys written meanwhile are remembered. Probed back
# with `version`, it is synced (those keys copied from the backup, or it is
# flushed when there were more than --dirty-limit), then warms up for
# `warmup` seconds: a miss on it is asked of the backup and a hit copied in
# with add. Without backups, auto_eject_hosts rebuilds the ring from the
# live servers exactly as twemproxy does. Section 8's HttpParser answers
# HTTP on the proxy port, routed like get/set/delete.
#
# The configuration is an unmodified nutcracker.yml (a small YAML subset,
# read below) or command-line flags.

PROXY_VERSION = MEMCACHED_VERSION + b"-memtool-proxy-" + __version__.encode()
PROXY_IN_FLIGHT_MAX = 128           # requests a client may have waiting; more pause it
PROXY_IN_FLIGHT_BYTES = 4 << 20     # ... or bytes of them
PROXY_OWED_MAX = 16 << 20           # replies a client has not taken: past it, it is closed
PROXY_HELD_BYTES = 64 << 20         # incomplete requests held, all clients
PROBE_BACKOFF_MAX = 16              # a flapping server stays out up to this many retry times
DIRTY_LIMIT_DEFAULT = 100000        # keys remembered per primary while it is out
PROXY_CONNECT_SECONDS = 2.0         # a connect without the pool's timeout gives up after this
PROXY_COUNTERS = ("total_connections", "requests", "conn_yields", "store_no_memory",
                  "bytes_read", "bytes_written")
SYNC_BATCH_KEYS = 100               # dirty keys copied at a time when a primary returns
POOL_DEFAULTS = {"hash": "fnv1a_64", "hash_tag": None, "distribution": "ketama",
                 "timeout": None, "backlog": 512, "preconnect": False,
                 "auto_eject_hosts": False, "server_retry_timeout": 30000,
                 "server_failure_limit": 2, "server_connections": 1, "backups": [],
                 "warmup": 0}
CONF_NUMBERS = ("timeout", "backlog", "client_connections", "server_connections",
                "server_retry_timeout", "server_failure_limit")
CONF_BOOLS = ("preconnect", "auto_eject_hosts", "tcpkeepalive", "redis")
CONF_LISTS = ("servers", "backups")
CONF_KEYS = ("listen", "hash", "hash_tag", "distribution", "redis_auth", "redis_db",
             "warmup") + CONF_NUMBERS + CONF_BOOLS + CONF_LISTS
CONF_INT_MAX = 2 ** 31 - 1          # nutcracker keeps numbers in a C int
SERVER_FORMAT = '"hostname:port:weight [name]"'


class _YamlLines:
    """The lines of a nutcracker.yml, without comments and blank lines:
    (line number, indent, content). Refuses what the subset does not have."""

    def __init__(self, text, filename):
        self.filename = filename
        self.rows = []
        for number, raw in enumerate(text.lstrip("\ufeff").splitlines(), 1):
            content = raw.lstrip(" \t")
            if "\t" in re.match(r"[ \t]*(-[ \t]+)?", raw).group(0):
                raise self.error(number, "tab character used for indentation")
            if not content or content.startswith("#"):
                continue
            if re.match(r"(---|\.\.\.)(\s|$)|%", raw):
                raise self.error(number, "document markers and directives are not supported")
            self.rows.append((number, len(raw) - len(content), content))

    def error(self, number, why):
        return ConfigError(f"{self.filename}:{number}: {why}")

    def scalar(self, text, number):
        """A plain or quoted scalar (true/false become bools), comments stripped."""
        if text[:1] in ("'", '"'):
            quote = text[0]
            match = re.match(r"'((?:[^']|'')*)'" if quote == "'" else r'"((?:[^"\\]|\\.)*)"',
                             text)
            if not match:
                raise self.error(number, "unterminated quoted string")
            rest = text[match.end():].strip()
            if rest and not rest.startswith("#"):
                raise self.error(number, "unexpected text after a quoted value")
            value = match.group(1)
            return value.replace("''", "'") if quote == "'" else \
                value.encode("latin-1", "backslashreplace").decode("unicode_escape")
        if text[0] in "[]{},&*!|>%@`?":
            raise self.error(number, "flow collections, anchors, tags and block scalars are "
                                     "not supported")
        value = re.split(r"\s#", text, 1)[0].strip()
        if re.search(r":(\s|$)", value):
            raise self.error(number, "nested mappings are not supported (quote the value)")
        return {"true": True, "false": False}.get(value, value)

    def key_value(self, content, number):
        match = re.match(r"""([^\s:#'"][^:]*?|'[^']*'|"[^"]*")\s*:(\s+|$)(.*)""", content)
        if not match:
            raise self.error(number, "expected 'key: value'")
        key = match.group(1).strip("'\"")
        rest = match.group(3).strip()
        value = None if not rest or rest.startswith("#") else self.scalar(rest, number)
        if value == "":
            raise self.error(number, f'directive "{key}" has an empty value')
        return key, value

    def parse(self):
        """{pool: {key: scalar or [scalar]}} and {(pool[, key[, index]]): line}."""
        tree, lines, rows, i = {}, {}, self.rows, 0
        root = rows[0][1] if rows else 0
        while i < len(rows):
            number, indent, content = rows[i]
            if indent != root or content.startswith("-"):
                raise self.error(number, "expected 'pool_name:' at the top level")
            name, value = self.key_value(content, number)
            if value is not None:
                raise self.error(number, f"pool '{name}' must be a mapping of settings")
            if name in tree:
                raise self.error(number, f"duplicate pool name '{name}'")
            pool, lines[(name,)], i = tree.setdefault(name, {}), number, i + 1
            if i == len(rows) or rows[i][1] <= root:
                raise self.error(number, f"pool '{name}' has no settings")
            inner = rows[i][1]
            while i < len(rows) and rows[i][1] > root:
                number, indent, content = rows[i]
                if indent != inner or content.startswith("-"):
                    raise self.error(number, "inconsistent indentation")
                key, value = self.key_value(content, number)
                if key in pool:
                    raise self.error(number, f'duplicate key "{key}"')
                lines[(name, key)], i = number, i + 1
                if value is not None:
                    pool[key] = value
                    continue
                items = []
                while i < len(rows) and rows[i][1] >= inner and rows[i][2][:2] in ("- ", "-"):
                    number, _, content = rows[i]
                    item = content[1:].strip()
                    if not item or item.startswith("#"):
                        raise self.error(number, "empty list item")
                    lines[(name, key, len(items))], i = number, i + 1
                    items.append(self.scalar(item, number))
                if not items:
                    raise self.error(number, f'directive "{key}" has an empty value')
                pool[key] = items
        return tree, lines


def _conf_server(entry, bad):
    """'host:port:weight [name]' as nutcracker's conf_add_server reads it."""
    rest, sep, name = entry.rpartition(" ")
    rest, name = (rest, name) if sep else (entry, None)
    if entry.startswith("/"):
        bad("is a unix socket: memtool's proxy connects over TCP only")
    parts = rest.rsplit(":", 2)
    if len(parts) != 3:
        bad(f"has an invalid {SERVER_FORMAT} format string")
    host, port, weight = parts
    if not weight.isdigit() or int(weight) > CONF_INT_MAX:
        bad(f"has an invalid weight in {SERVER_FORMAT} format string")
    if int(weight) == 0:
        bad(f"has a zero weight in {SERVER_FORMAT} format string")
    if not (port.isdigit() and 0 < int(port) < 65536):
        bad(f"has an invalid port in {SERVER_FORMAT} format string")
    if not host or name == "":
        bad(f"has an empty {'name' if host else 'hostname'} in {SERVER_FORMAT} format string")
    return {"host": host.strip("[]"), "port": int(port), "weight": int(weight), "name": name}


def load_pools(text, filename):
    """The pools of a nutcracker.yml (twemproxy 0.5.0's keys and defaults, its
    checks and wording), in file order, as dicts with POOL_DEFAULTS' keys plus
    name, listen (host, port) and servers/backups ([{host, port, weight, name}]).

    backups and warmup are memtool's own keys. Keys only redis pools use are
    refused: memtool proxies the memcached protocol. Raises ConfigError
    "FILE:LINE: reason".
    """
    tree, lines = _YamlLines(text, filename).parse()
    if not tree:
        raise ConfigError(f"{filename}:1: no pools")
    pools, listens = [], {}
    for pname, conf in tree.items():
        def fail(why, *path, pname=pname):
            line = lines.get((pname,) + path, lines[(pname,)])
            raise ConfigError(f"{filename}:{line}: pool '{pname}': {why}")
        pool = dict(POOL_DEFAULTS, name=pname, listen=None, servers=[], backups=[])
        for key, value in conf.items():
            def bad(why, *index, key=key):
                fail(f'directive "{key}" {why}', key, *index)
            if key not in CONF_KEYS:
                bad("is unknown")
            if isinstance(value, list) != (key in CONF_LISTS):
                bad("must be a list of servers" if key in CONF_LISTS else "must be one value")
            if key in CONF_LISTS:
                for j, entry in enumerate(str(v) for v in value):
                    pool[key].append(_conf_server(entry, lambda why, j=j, e=entry:
                                                  bad(f"{why}: '{e}'", j)))
                continue
            text_value = value if isinstance(value, str) else str(value).lower()
            if key in ("redis_auth", "redis_db") or (key == "redis" and value is not False):
                bad("is not supported: memtool proxies the memcached protocol only")
            if key in CONF_NUMBERS:
                if not text_value.isdigit() or int(text_value) > CONF_INT_MAX:
                    bad("is not a number")
                pool[key] = int(text_value)
            elif key in CONF_BOOLS:
                if not isinstance(value, bool):
                    bad('is not "true" or "false"')
                pool[key] = value
            elif key == "hash" and text_value not in HASHES:
                bad("is not a valid hash")
            elif key == "distribution" and text_value not in DISTRIBUTIONS:
                bad("is not a valid distribution")
            elif key == "hash_tag" and len(text_value.encode()) != 2:
                bad("is not a valid hash tag string with two characters")
            elif key == "warmup":
                if not re.fullmatch(r"[0-9]+(\.[0-9]+)?", text_value):
                    bad("is not a number of seconds")
                pool[key] = float(text_value)
            elif key == "listen":
                try:
                    pool[key] = parse_address(text_value)
                except ValueError:
                    bad('has an invalid "hostname:port" format string')
            else:
                pool[key] = text_value
        for key in ("redis", "client_connections", "tcpkeepalive"):
            pool.pop(key, None)        # nutcracker ignores these for memcached pools
        pool["timeout"] = pool["timeout"] or None   # nutcracker: timeout <= 0 means none
        if pool["listen"] is None:
            fail('directive "listen:" is missing')
        if not pool["servers"]:
            fail("has no servers")
        if pool["server_connections"] == 0:
            fail('directive "server_connections:" cannot be 0', "server_connections")
        check_pool_servers(pool, lambda why, *path: fail(why, *path))
        if pool["listen"] in listens:
            fail(f"has the same listen address as pool '{listens[pool['listen']]}'", "listen")
        listens[pool["listen"]] = pname
        pools.append(pool)
    return pools


def check_pool_servers(pool, fail):
    """No two servers (or backups) with one name; no backup that is a primary."""
    for key in CONF_LISTS:
        seen = set()
        for j, srv in enumerate(pool[key]):
            name = server_name(srv["host"], srv["port"], srv["name"])
            if name in seen:
                fail(f"has {key} with same name '{name}'", key, j)
            seen.add(name)
    primaries = {(s["host"], s["port"]) for s in pool["servers"]}
    for j, srv in enumerate(pool["backups"]):
        if (srv["host"], srv["port"]) in primaries:
            fail(f"backup {srv['host']}:{srv['port']} is also one of its servers", "backups", j)


def flag_pool(listen, servers, backups=(), **options):
    """A pool from command-line flags: servers and backups are 'host:port[:weight]'."""
    def server(text, what):
        match = re.fullmatch(r"(\[[^\]]+\]|[^:\s]+):(\d+)(?::(\d+))?", text)
        if not match or not 0 < int(match.group(2)) < 65536 or match.group(3) == "0":
            raise ConfigError(f"{what} {text!r}: not HOST:PORT[:WEIGHT]")
        return {"host": match.group(1).strip("[]"), "port": int(match.group(2)),
                "weight": int(match.group(3) or 1), "name": None}
    pool = dict(POOL_DEFAULTS, name="proxy", listen=parse_address(listen),
                servers=[server(s, "-s") for s in servers],
                backups=[server(s, "--backup") for s in backups])
    pool.update((k, v) for k, v in options.items() if v is not None)

    def fail(why, *path):
        raise ConfigError(why)
    check_pool_servers(pool, fail)
    return pool


def config_ring(config, specs):
    """The Continuum of server specs ({host, port, weight, name}) under a pool
    config's hash, distribution and hash_tag."""
    return Continuum([(server_name(s["host"], s["port"], s["name"]), s["weight"])
                      for s in specs], config["hash"], config["distribution"],
                     config["hash_tag"] and config["hash_tag"].encode())


def resolve(host, port):
    """(ip, port) of host:port, resolved once (at start and reload, not per request)."""
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][:2]
    except (OSError, UnicodeError) as err:
        raise ConfigError(f"cannot resolve {host}:{port}: {err}") from None


class Backend:
    """One server of a pool (twemproxy's struct server): its connections, its
    health and its figures.

    spec: {host, port, weight, name} from the configuration; role "primary" or
    "backup". state: "up"; "out" (failed or ejected; probed with `version`
    after server_retry_timeout, longer each time it fails again, up to
    PROBE_BACKOFF_MAX times); "syncing" (back, the keys written while it was
    out being copied from their backups: no reads yet); "warming" (back: a
    miss is asked of the backup, for the pool's warmup seconds).
    """

    def __init__(self, pool, spec, role):
        self.pool = pool                 # the Pool it serves
        self.spec = spec                 # its configuration entry
        self.label = f"{spec['host']}:{spec['port']}"   # for stats and logs
        self.name = server_name(spec["host"], spec["port"], spec["name"])   # on the ring
        self.weight = spec["weight"]
        self.role = role                 # "primary" or "backup"
        self.address = resolve(spec["host"], spec["port"])
        self.upstreams = [None] * pool.config["server_connections"]  # made when needed
        self.turn = 0                    # the next upstream to use
        self.state = "up"
        self.failures = 0                # consecutive failed requests
        self.backoff = 1                 # multiplier of the retry timeout
        self.since = time.monotonic()    # when it entered its state
        self.warm_until = 0.0            # monotonic end of its warm-up
        self.dirty = set()               # keys written or deleted while it was out
        self.overflow = False            # ... more than the dirty limit: flush it
        self.requests = self.errors = self.timeouts = self.ejections = 0
        self.latency = Histogram()       # µs from request to reply

    def send(self, data, expect, slot, role=None):
        """Send a request; slot.on_reply(self, role, status, hits, raw) gets the reply
        (status None and raw the reason on failure)."""
        i = self.turn
        self.turn = (i + 1) % len(self.upstreams)
        upstream = self.upstreams[i]
        if upstream is None or upstream.closed:
            upstream = self.upstreams[i] = self.connect(self._on_reply)
        self.requests += 1
        upstream.send(data, expect, (slot, role, time.perf_counter()))

    def connect(self, on_reply):
        timeout = self.pool.timeout
        return Upstream(self.pool.proxy.loop, self.address, on_reply, None, timeout,
                        timeout or PROXY_CONNECT_SECONDS)

    @property
    def serves_reads(self):
        if self.state == "warming" and time.monotonic() >= self.warm_until:
            self.state = "up"
        return self.state in ("up", "warming")

    @property
    def warming(self):
        return self.serves_reads and self.state == "warming"

    def figures(self):
        """(field, value) pairs for stats."""
        return [("state", self.state), ("requests", self.requests), ("errors", self.errors),
                ("timeouts", self.timeouts), ("ejections", self.ejections),
                ("dirty_keys", -1 if self.overflow else len(self.dirty)),
                ("latency_p50_us", int(self.latency.percentile(50))),
                ("latency_p99_us", int(self.latency.percentile(99)))]

    def close(self):
        for upstream in self.upstreams:
            if upstream is not None:
                upstream.close()

    def _on_reply(self, context, status, hits, raw):
        if context is None:
            return                       # bytes nobody asked for: the Upstream fails
        slot, role, sent_at = context
        if status is None:
            self.errors += 1
            self.timeouts += raw == "timeout"
            self.pool.failed(self, raw)
        else:
            self.failures = 0
            self.latency.record((time.perf_counter() - sent_at) * 1e6)
        slot.on_reply(self, role, status, hits, raw)


class Pool:
    """A pool of a proxy: its backends and backups, their continuums, its listener.

    config: a dict from load_pools() or flag_pool(). Raises ConfigError when a
    server name does not resolve.
    """

    def __init__(self, proxy, config, old=None):
        self.proxy = proxy               # the Proxy
        self.config = config             # load_pools() entry
        self.name = config["name"]
        self.timeout = config["timeout"] / 1000 if config["timeout"] else None
        self.retry = config["server_retry_timeout"] / 1000
        kept = {} if old is None else {(b.spec["host"], b.spec["port"], b.name, b.weight, b.role):
                                       b for b in old.servers + old.backups}
        self.servers = [self._backend(s, "primary", kept) for s in config["servers"]]
        self.backups = [self._backend(s, "backup", kept) for s in config["backups"]]
        self.ring = self.backup_ring = None   # Continuums, built by rebuild()
        self.ring_servers = []           # the servers self.ring places keys on
        self.listener = None             # set by the Proxy
        self.rebuild()
        self.backup_ring = self.backups and self._continuum(self.backups)
        if old is None:
            for backend in self.servers:
                backend.warm_until = time.monotonic() + config["warmup"]
                if config["warmup"] and self.backups:
                    backend.state = "warming"

    def primary(self, key):
        """The Backend that owns key (None when no server is live)."""
        servers = self.ring_servers
        if not servers:
            return None
        return servers[self.ring.index(key)] if len(servers) > 1 else servers[0]

    def backup(self, key):
        """The backup that keeps a copy of key, or None."""
        if not self.backups:
            return None
        return self.backups[self.backup_ring.index(key)]

    def failed(self, backend, reason):
        """A request to backend failed: count it, and take the backend out when
        twemproxy would eject it, or at once when it is a primary with backups."""
        backend.failures += 1
        if backend.state not in ("up", "warming"):
            return
        if self.backups and backend.role == "primary" or (
                self.config["auto_eject_hosts"]
                and backend.failures >= self.config["server_failure_limit"]):
            self.take_out(backend, reason)

    def take_out(self, backend, reason):
        now_ = time.monotonic()
        if backend.state in ("up", "warming") and now_ - backend.since > 2 * self.retry:
            backend.backoff = 1          # it had been well for a while: not flapping
        delay = self.retry * backend.backoff
        backend.backoff = min(backend.backoff * 2, PROBE_BACKOFF_MAX)
        if backend.state != "out":
            backend.ejections += 1
            log.warning("pool %s: %s %s is out (%s); probing it again in %g s", self.name,
                        backend.role, backend.label, reason, delay)
        backend.state, backend.since = "out", now_
        self.rebuild()
        self.proxy.loop.call_later(delay, lambda: self._probe(backend))

    def mark_dirty(self, backend, key):
        """backend (a primary that is out) missed a write to key."""
        if backend.overflow or backend.role != "primary" or not self.backups:
            return
        backend.dirty.add(key)
        if len(backend.dirty) > self.proxy.dirty_limit:
            backend.overflow = True
            backend.dirty.clear()

    def forget(self, key):
        """Delete key on its primary and backup, reading no reply."""
        line = b"md %s b q\r\nmn\r\n" % b64(key)
        for backend in (self.primary(key), self.backup(key)):
            if backend is not None and backend.state != "out":
                backend.send(line, REPLY_META_BATCH, _Ignore())
            elif backend is not None:
                self.mark_dirty(backend, key)

    def rebuild(self):
        """The continuum of the live servers (all of them, unless the pool ejects
        without backups), twemproxy's server ordering and point counts."""
        servers = self.servers
        if self.config["auto_eject_hosts"] and not self.backups:
            servers = [b for b in servers if b.state != "out"]
        self.ring_servers = servers
        self.ring = self._continuum(servers) if servers else None

    def figures(self):
        return [(f"{self.name}:{b.label}:{field}", value)
                for b in self.servers + self.backups for field, value in b.figures()]

    def close(self):
        if self.listener is not None:
            self.listener.close()
        for backend in self.servers + self.backups:
            backend.close()

    def _backend(self, spec, role, kept):
        backend = kept.get((spec["host"], spec["port"],
                            server_name(spec["host"], spec["port"], spec["name"]),
                            spec["weight"], role))
        if backend is None:
            return Backend(self, spec, role)
        backend.pool = self
        return backend

    def _continuum(self, servers):
        return config_ring(self.config, [b.spec for b in servers])

    def _probe(self, backend):
        if backend.state != "out" or backend.pool is not self:
            return

        def answered(context, status, hits, raw):
            probe.close()
            if status is not None and status.startswith(b"VERSION"):
                self._back(backend)
            else:
                self.take_out(backend, raw if status is None else status.decode("latin-1"))
        probe = backend.connect(answered)
        probe.send(b"version\r\n", REPLY_LINE)

    def _back(self, backend):
        backend.failures = 0
        if backend.role == "primary" and (backend.dirty or backend.overflow):
            backend.state, backend.since = "syncing", time.monotonic()
            log.warning("pool %s: %s is back; copying %s from the backups first", self.name,
                        backend.label, "nothing (it is flushed: too many keys changed)"
                        if backend.overflow else f"{len(backend.dirty)} keys")
            Sync(self, backend).start()
        else:
            self.readmit(backend)

    def readmit(self, backend):
        """backend takes keys again (and warms up, with backups)."""
        warm = backend.role == "primary" and self.backups and self.config["warmup"]
        backend.state = "warming" if warm else "up"
        backend.since = time.monotonic()
        backend.warm_until = backend.since + self.config["warmup"]
        log.warning("pool %s: %s %s is back in service", self.name, backend.role, backend.label)
        self.rebuild()


class Slot:
    """A client's place in the order of replies: filled by finish(), sent when
    every slot before it has been (nc_connection.c's out-of-order replies
    waiting their turn). close: close the connection after it."""

    __slots__ = ("conn", "data", "close", "size")

    def __init__(self, conn, data=None, close=False, size=0):
        self.conn = conn                 # the ProxyConnection
        self.data = data                 # the reply's chunks, None until known
        self.close = close
        self.size = size                 # bytes of the request, while in flight

    def finish(self, data):
        self.data = data
        self.conn.owed += sum(map(len, data))
        self.conn.slot_done()

    def on_reply(self, backend, role, status, hits, raw):
        """A backend's reply to a request of this slot (see Backend.send)."""
        raise NotImplementedError


def server_error(backend, reason):
    return b"SERVER_ERROR %s %s\r\n" % (reason.encode() if isinstance(reason, str)
                                          else reason, backend.label.encode())


def b64(key):
    """key in base64, as meta commands carry any key with their b flag."""
    return binascii.b2a_base64(key, newline=False)


class KeySlot(Slot):
    """A request with one key: a write goes to the key's primary and backup, the
    primary's reply wins (the backup's when the primary is out or fails); a
    read goes to the primary, else (out, failed) to the backup, and a miss on a
    warming primary is asked of the backup and copied in with add."""

    __slots__ = ("pool", "key", "raw", "expect", "quiet", "writes", "meta", "render",
                 "primary", "backup_reply", "primary_failed")

    def __init__(self, conn, key, raw, spec, quiet, render=None):
        super().__init__(conn, size=len(raw))
        self.pool = conn.pool
        self.key = key                   # the routing key
        self.raw = raw + b"mn\r\n" if quiet else raw   # quiet: MN ends what comes back
        self.expect = REPLY_META_BATCH if quiet else spec.reply
        self.quiet = quiet
        self.writes = spec.writes
        self.meta = spec.reply == REPLY_META
        self.render = render             # turns the final reply into the client's bytes
        self.primary = None
        self.backup_reply = None         # a write's backup reply, until the primary's
        self.primary_failed = None       # why the primary did not answer

    def start(self):
        pool, key = self.pool, self.key
        primary, backup = pool.primary(key), pool.backup(key)
        self.primary = primary
        if self.writes:
            if backup is not None:
                backup.send(self.raw, self.expect, self, "backup")
            if primary is not None and primary.state != "out":
                primary.send(self.raw, self.expect, self, "primary")
                return
            if primary is not None:
                pool.mark_dirty(primary, key)
            self.primary_failed = "out"
            if backup is None:
                self.finish_error(primary, "out")
        elif primary is not None and primary.serves_reads:
            primary.send(self.raw, self.expect, self, "primary")
        elif backup is not None:
            backup.send(self.raw, self.expect, self, "read")
        else:
            self.finish_error(primary, "out")

    def on_reply(self, backend, role, status, hits, raw):
        if self.data is not None:
            return
        if role == "backup":                    # a write's copy
            if self.primary_failed is not None:
                self.done(status, raw, backend)
            else:
                self.backup_reply = (status, raw, backend)
            return
        if role == "primary" and status is None:
            backup = self.pool.backup(self.key)
            self.primary_failed = raw
            if self.writes:
                self.pool.mark_dirty(backend, self.key)
                if self.backup_reply is not None:
                    self.done(*self.backup_reply)
                elif backup is None:
                    self.finish_error(backend, raw)
            elif backup is not None:
                backup.send(self.raw, self.expect, self, "read")
            else:
                self.finish_error(backend, raw)
            return
        if role == "primary" and not self.writes and backend.warming and self.missed(raw):
            backup = self.pool.backup(self.key)
            if backup is not None:
                backup.send(self.raw, self.expect, self, "read")
                warm_copy(self.pool, backend, backup, self.key)
                return
        self.done(status, raw, backend)

    def missed(self, raw):
        """Is raw (the reply to this read) a miss?"""
        return raw in (END, b"EN\r\n", b"MN\r\n", b"EN\r\nMN\r\n")

    def done(self, status, raw, backend):
        if status is None:
            self.finish_error(backend, raw)
            return
        if self.quiet:
            raw = raw[:-4]                       # the MN that only the proxy asked for
        self.finish((self.render(status, raw),) if self.render else (raw,))

    def finish_error(self, backend, reason):
        line = server_error(backend, reason) if backend else b"SERVER_ERROR no server\r\n"
        self.finish((self.render(line[:-2], None),) if self.render else (line,))


class MultiSlot(Slot):
    """get/gets/gat/gats of several keys: one request per primary, merged back in
    the client's key order. A primary that fails (or is out) has its keys asked
    of their backups, or answered as misses; a warming primary's misses are
    asked of the backups too (and copied in)."""

    __slots__ = ("pool", "command", "keys", "parts", "waiting", "found", "with_cas")

    def __init__(self, conn, tokens, spec):
        first = spec.key
        super().__init__(conn, size=sum(map(len, tokens)))
        self.pool = conn.pool
        self.command = b" ".join(tokens[:first])      # get | gat <exptime>
        self.keys = tokens[first:]
        self.with_cas = tokens[0] in (b"gets", b"gats")
        self.parts = []                  # [backend, keys, hits-by-key or None]
        self.waiting = 0                 # parts and backup lookups still out
        self.found = {}                  # key -> VALUE blocks found, in order

    def start(self):
        pool = self.pool
        by_backend = {}
        for key in self.keys:
            primary = pool.primary(key)
            reader = primary if primary is not None and primary.serves_reads else None
            if reader is None:
                reader = pool.backup(key)
            part = by_backend.get(reader)
            if part is None:
                part = by_backend[reader] = [reader, []]
                self.parts.append(part)
            part[1].append(key)
            if self.command.startswith(b"gat"):
                backup = pool.backup(key)
                if backup is not None and backup is not reader:
                    backup.send(b"%s %s\r\n" % (self.command, key), REPLY_VALUES, self,
                                "ignore")
        for index, (backend, keys) in enumerate(self.parts):
            self.waiting += 1
            if backend is None:
                self.on_reply(None, index, None, None, "out")
            else:
                backend.send(b"%s %s\r\n" % (self.command, b" ".join(keys)), REPLY_VALUES,
                             self, index)

    def on_reply(self, backend, role, status, hits, raw):
        if role == "ignore":
            return
        if isinstance(role, tuple):            # a lookup of one key on a backup
            self.warm_found(role[1], status, hits, raw)
            return
        keys = self.parts[role][1]
        if status is None or status != b"END":
            self.refetch(keys, role)
        else:
            got = set()
            for key, flags, data, start, end in hits:
                self.found.setdefault(key, []).append(raw[start:end])
                got.add(key)
            if backend.role == "primary" and backend.warming:
                self.warm([k for k in keys if k not in got], backend)
        self.part_done()

    def refetch(self, keys, role):
        """Keys whose server did not answer: ask their backups, one lookup each."""
        for key in keys:
            backup = self.pool.backup(key)
            if backup is not None and self.parts[role][0] is not backup:
                self.waiting += 1
                backup.send(b"mg %s b v f t c\r\n" % b64(key), REPLY_META, self,
                            ("warm", key))

    def warm(self, missed, primary):
        for key in missed:
            backup = self.pool.backup(key)
            if backup is not None:
                self.waiting += 1
                backup.send(b"mg %s b v f t c\r\n" % b64(key), REPLY_META, self,
                            ("warm", key))
                warm_copy(self.pool, primary, backup, key)

    def warm_found(self, key, status, hits, raw):
        if status == b"VA" and hits:
            returned = meta_return_flags(raw)
            data = hits[0][2]
            head = b"VALUE %s %s %d" % (key, returned.get(b"f", b"0"), len(data))
            self.found.setdefault(key, []).append(
                head + (b" %s\r\n" % returned.get(b"c", b"0") if self.with_cas else CRLF)
                + data + CRLF)
        self.part_done()

    def part_done(self):
        self.waiting -= 1
        if self.waiting:
            return
        out, taken = [], {}
        for key in self.keys:
            blocks = self.found.get(key)
            i = taken.get(key, 0)
            if blocks and i < len(blocks):
                out.append(blocks[i])
                taken[key] = i + 1
        out.append(END)
        self.finish(out)


def meta_return_flags(raw):
    """{flag letter: value} of the first line of a meta reply (VA 5 f3 t-1 -> f, t)."""
    return {token[:1]: token[1:] for token in raw[:raw.find(b"\r\n")].split(b" ")[1:]
            if token[:1].isalpha()}


class BroadcastSlot(Slot):
    """flush_all, verbosity, cache_memlimit: to every server (backups too); the
    first server's reply, or the first error."""

    __slots__ = ("raw", "waiting", "reply", "quiet")

    def __init__(self, conn, raw, quiet):
        super().__init__(conn, size=len(raw))
        self.raw = raw
        self.quiet = quiet
        self.reply = None
        self.waiting = 0

    def start(self):
        raw, quiet = self.raw, self.quiet
        pool = self.conn.pool
        backends = [b for b in pool.servers + pool.backups if b.state != "out"]
        if raw.startswith(b"flush_all") and pool.backups:
            for backend in pool.servers:      # out now: flushed when it is back
                backend.overflow = backend.overflow or backend.state == "out"
        self.waiting = len(backends)
        if not backends:
            self.finish((b"SERVER_ERROR no server\r\n",))
        data = raw + b"mn\r\n" if quiet else raw
        for backend in backends:
            backend.send(data, REPLY_META_BATCH if quiet else REPLY_LINE, self)

    def on_reply(self, backend, role, status, hits, raw):
        if status is None:
            raw = server_error(backend, raw)
        elif self.quiet:
            raw = raw[:-4]
        if self.reply is None or (raw.startswith(ERROR_PREFIXES)
                                  and not self.reply.startswith(ERROR_PREFIXES)):
            self.reply = raw
        self.waiting -= 1
        if not self.waiting:
            self.finish((self.reply,))


class _Ignore:
    """A slot for requests whose replies nobody reads (copies, deletes, flushes)."""

    def __init__(self, then=None):
        self.then = then

    def on_reply(self, backend, role, status, hits, raw):
        if self.then is not None:
            self.then(status, hits, raw)


def warm_copy(pool, primary, backup, key, mode=b"E", then=None):
    """Copy key from backup to primary with its flags and remaining TTL: add (mode
    E) keeps a newer value the primary got meanwhile. then(copied) after."""
    def fetched(status, hits, raw):
        if status == b"VA" and hits:
            returned = meta_return_flags(raw)
            ttl = int(returned.get(b"t", b"-1"))
            data = hits[0][2]
            primary.send(b"ms %s %d b F%s T%d M%s\r\n%s\r\n" % (
                b64(key), len(data), returned.get(b"f", b"0"),
                0 if ttl < 0 else max(ttl, 1), mode, data), REPLY_META, _Ignore(
                    None if then is None else lambda *reply: then(reply[0] is not None)))
        elif then is not None:
            then(status is not None)
    backup.send(b"mg %s b v f t\r\n" % b64(key), REPLY_META, _Ignore(fetched))


class Sync:
    """Bring a returning primary up to date: every key written while it was out
    is deleted on it, then copied from its backup with add, SYNC_BATCH_KEYS at
    a time (a write that lands meanwhile wins); a primary that missed more
    than the dirty limit is flushed instead. Then it takes reads again."""

    def __init__(self, pool, primary):
        self.pool = pool
        self.primary = primary
        self.waiting = 0

    def start(self):
        primary = self.primary
        if primary.overflow:
            primary.send(b"flush_all\r\n", REPLY_LINE, _Ignore(self._flushed))
        else:
            self._next()

    def _flushed(self, status, hits, raw):
        if status != b"OK":
            self.pool.take_out(self.primary, "flush_all failed while syncing")
            return
        self.primary.overflow = False
        self.pool.readmit(self.primary)

    def _next(self):
        primary, pool = self.primary, self.pool
        if primary.state != "syncing":
            return
        batch = [primary.dirty.pop() for _ in range(min(SYNC_BATCH_KEYS, len(primary.dirty)))]
        if not batch:
            pool.readmit(primary)
            return
        self.waiting = len(batch)
        for key in batch:
            backup = pool.backup(key)
            primary.send(b"md %s b\r\n" % b64(key), REPLY_META, _Ignore(
                lambda status, hits, raw, key=key, backup=backup:
                    self._deleted(key, backup, status)))

    def _deleted(self, key, backup, status):
        if status is None:
            self._failed(key)
            return
        warm_copy(self.pool, self.primary, backup, key,
                  then=lambda copied, key=key: self._copied(key, copied))

    def _copied(self, key, copied):
        if not copied:
            self._failed(key)
            return
        self.waiting -= 1
        if not self.waiting:
            self._next()

    def _failed(self, key):
        self.primary.dirty.add(key)
        if self.primary.state == "syncing":
            self.pool.take_out(self.primary, "failed while syncing")


class ProxyConnection(ProtocolConnection):
    """A client of a pool: its requests framed, routed and answered in order."""

    def __init__(self, pool, sock, addr):
        super().__init__(pool.proxy, sock, addr)
        self.pool = pool                 # where its requests go (the newest on reload)
        self.slots = collections.deque()  # replies owed, in request order
        self.in_flight = 0               # bytes of the requests they answer
        self.ending = False              # quit (or HTTP close): read no more, close
                                         # once the replies owed are sent
        self.owed = 0                    # bytes of replies made for it, in all

    def process(self, buf, pos=0):
        """Route the complete requests in buf[pos:], up to this pass's share;
        return the offset of the rest."""
        end = len(buf)
        self.share = self.server.reqs_per_event
        while pos < end and not self.done_reading:
            if self.crowded():
                return self._pause(pos)
            self.share -= 1
            if self.share < 0:
                return self._yield(pos)
            framed = frame_request(buf, pos)
            if framed is None:
                return self.line_incomplete(buf, pos)
            spec, tokens, start, after, args = framed
            if spec is HTTP_REQUEST:
                return self._switch_to_http(buf, pos)
            self.server.stats["requests"] += 1
            if after > start:
                resume = self._block(spec, tokens, args, buf, pos, after)
                if resume is None:
                    self.need = after - pos
                    return pos
                pos = resume
                continue
            self.route(spec, tokens, buf[pos:after])
            pos = after
        self.need = 0
        return end if self.done_reading else pos

    @property
    def done_reading(self):
        return self.closing or self.ending

    def route(self, spec, tokens, raw):
        """Send one framed request where it goes; its slot keeps its place."""
        if spec is None:
            self.answer(UNKNOWN.line)
        elif spec.route == ROUTE_LOCAL:
            self._local(spec, tokens)
        elif spec.route == ROUTE_ALL:
            self.start_slot(BroadcastSlot(self, raw, tokens[-1] == NOREPLY))
        elif spec.route == ROUTE_KEYS and len(tokens) > spec.key + 1:
            if max(map(len, tokens[spec.key:])) > KEY_MAX_LENGTH:
                self.answer(BAD_FORMAT.line)   # memcached drops the whole multiget
            else:
                self.start_slot(MultiSlot(self, tokens, spec))
        else:
            key = tokens[spec.key] if len(tokens) > spec.key else b""
            quiet = tokens[-1] == NOREPLY or (spec.reply == REPLY_META and b"q" in tokens[2:])
            if spec.reply == REPLY_META and b"b" in tokens[2:]:
                key = base64_key(key) or key
            self.start_slot(KeySlot(self, key, raw, spec, quiet))

    def answer(self, data, close=False):
        """A reply the proxy gives itself, in its turn."""
        self.slots.append(Slot(self, (data,), close))
        self.owed += len(data)
        self.slot_done()

    def start_slot(self, slot):
        self.slots.append(slot)
        self.in_flight += slot.size
        slot.start()

    def slot_done(self):
        """Send the replies that are ready, in order; go on parsing once the
        requests in flight are few enough again."""
        slots = self.slots
        while slots and slots[0].data is not None:
            slot = slots.popleft()
            self.in_flight -= slot.size
            if not self.closed:
                self.writelines(slot.data)
                if slot.close:
                    self.close_when_sent()
        held = self.owed - self.bytes_written     # replies not yet taken by the socket
        if held > PROXY_OWED_MAX and not self.closed:
            log.warning("%s: closing a client that does not read its replies (%d MB owed)",
                        self.addr, held >> 20)
            self.close()
            return
        if self.paused and not self.crowded() and not self.closed:
            self.paused = False
            self.loop.call_soon(self._release)

    def crowded(self):
        return (len(self.slots) >= PROXY_IN_FLIGHT_MAX or self.in_flight > PROXY_IN_FLIGHT_BYTES
                or self.unsent_bytes >= OUTPUT_HIGH_WATER
                or (len(self.outbuf) > self.check_at and self.backed_up()))

    def close_when_sent(self):
        self.ending = True
        if self.slots:
            self.slots[-1].close = True   # after the replies still owed
        else:
            super().close_when_sent()

    def connection_lost(self):
        self.pool.connections.discard(self)
        super().connection_lost()

    # -- HTTP: the serve port's HTTP, each request routed as one meta command ----

    def http_request(self, request):
        method, key = request.method, request.key
        if method not in HTTP_METHODS:
            return self._http_local(request, 405, extra=HTTP_ALLOW_ALL)
        if key is None or len(key) > KEY_MAX_LENGTH:
            return self._http_local(request, 400, detail=b"request target is not a path"
                                    if key is None else b"key longer than 250 bytes")
        if not key:
            if method not in (b"GET", b"HEAD"):
                return self._http_local(request, 405, extra=HTTP_ALLOW_ROOT)
            stats = {name: _json_number(value) for name, value in self.server.general_stats()}
            return self._http_local(request, 200, json.dumps(stats).encode() + b"\n",
                                    b"application/json")
        try:
            line, render = http_as_meta(request)
        except HttpError as err:
            return self._http_local(request, err.status, detail=err.detail)
        slot = KeySlot(self, key, line, COMMANDS[line[:2]], False, render)
        slot.close = request.close
        self.ending = request.close
        self.start_slot(slot)

    def http_error(self, status, detail):
        self.answer(b"".join(http_response(HTTP_CLOSING, status, detail=detail)))

    def http_emit(self, chunks):
        self.answer(b"".join(chunks))

    def _http_local(self, request, status, body=None, content_type=b"text/plain", extra=b"",
                    detail=b""):
        self.answer(b"".join(http_response(request, status, body, content_type, extra,
                                           detail)), request.close)

    # -- internals -----------------------------------------------------------

    def _local(self, spec, tokens):
        name = spec.name
        if name == b"version":
            self.answer(b"VERSION " + PROXY_VERSION + CRLF)
        elif name == b"mn":
            self.answer(b"MN\r\n")
        elif name == b"quit":
            self.ending = True
            self.answer(b"", close=True)
        elif name == b"stats":
            try:
                self.answer(stats_reply(tokens, self.server))
            except ProtocolError as err:
                self.answer(err.line)
        else:
            self.answer(b"ERROR: shutdown not enabled\r\n" if name == b"shutdown"
                        else UNKNOWN.line)

    def _block(self, spec, tokens, args, buf, pos, end):
        """A request with a data block at buf[pos:end]: route it once it is all
        in; refuse it (and swallow it) when it is too large or cannot be held.
        Returns the offset to go on from, or None to wait for the rest."""
        key = tokens[1]
        nbytes = args[3] if spec.block == BLOCK_STORAGE else args
        refusal = None
        if not item_size_ok(key, args[1] if spec.block == BLOCK_STORAGE else 0, nbytes,
                            self.server.item_size_max):
            refusal = TOO_LARGE
        elif end > len(buf) and self.reserved < nbytes and not self.server.reserve(self,
                                                                                  nbytes):
            refusal = NO_MEMORY
        if refusal is not None:
            if spec.name in (b"set", b"ms"):      # memcached unlinks the old value
                self.pool.forget(key)
            self.answer(b"" if tokens[-1] == NOREPLY else refusal.line)
            return self._skip_block(buf, end)
        if end > len(buf):
            return None
        self.server.release(self)
        self.route(spec, tokens, buf[pos:end])
        return end


def http_as_meta(request):
    """(meta command, render(status, raw) -> response bytes) for an HTTP request
    on a proxy port: GET/HEAD -> mg, PUT/POST -> ms (X-TT-PDMODE 1 adds, 2
    appends and creates; If-Match -> C), DELETE -> md. Raises HttpError 400
    for a bad header value."""
    method, key, headers = request.method, request.key, request.headers
    args = b64(key)
    condition = headers.get(b"if-match")
    cas = b""
    if condition is not None:
        tags = [t.strip(b' \t"') for t in condition.split(b",")]
        number = next((t for t in tags if t.isdigit()), None)
        cas = b" C" + number if number else b""
    if method in (b"GET", b"HEAD"):
        def render(status, raw):
            if raw is None or status != b"VA":
                return http_render(request, status, raw, {b"EN": 404})
            returned = meta_return_flags(raw)
            ttl = int(returned.get(b"t", b"-1"))
            exptime = 0 if ttl < 0 else int(now()) + ttl
            return b"".join(http_response(
                request, 200, raw[raw.find(b"\r\n") + 2:-2], b"application/octet-stream",
                http_item_headers(int(returned.get(b"f", b"0")), exptime,
                                  int(returned.get(b"c", b"0")))))
        return b"mg %s b v f t c\r\n" % args, render
    if method == b"DELETE":
        return b"md %s b%s\r\n" % (args, cas), lambda status, raw: http_render(
            request, status, raw, {b"HD": 200, b"NF": 412 if condition else 404, b"EX": 412})
    flags = headers.get(b"x-memtool-flags", b"0")
    exptime = headers.get(b"x-memtool-exptime", b"0")
    mode = {None: b"", b"0": b"", b"1": b" ME", b"2": b" MA N0"}.get(
        headers.get(b"x-tt-pdmode"), None)
    if not flags.isdigit() or len(flags) > 10 or int(flags) > UINT32_MASK:
        raise HttpError(400, b"bad X-Memtool-Flags")
    if not HTTP_EXPTIME.match(exptime):
        raise HttpError(400, b"bad X-Memtool-Exptime")
    if mode is None:
        raise HttpError(400, b"bad X-TT-PDMODE")
    if cas and mode:
        mode = b""
    body = request.body

    def render(status, raw):
        if status[:2] == b"HD":
            cas_unique = meta_return_flags(raw).get(b"c", b"0")
            return b"".join(http_response(request, 201, extra=b'ETag: "%s"\r\n' % cas_unique))
        return http_render(request, status, raw,
                           {b"NS": 409 if mode == b" ME" else 413, b"EX": 412, b"NF": 412})
    return (b"ms %s %d b F%s T%s c%s%s\r\n%s\r\n" % (args, len(body), flags, exptime, cas,
                                                     mode, body), render)


def http_render(request, status, raw, statuses):
    """The HTTP response for a meta reply status (bytes) through statuses; a
    SERVER_ERROR is 502 (504 for a timeout), anything else 500."""
    code = statuses.get(status[:2]) if raw is not None else None
    if code is not None:
        return b"".join(http_response(request, code))
    detail = status or b""
    if detail.startswith(b"SERVER_ERROR"):
        code = 504 if b"timeout" in detail else 507 if b"out of space" in detail else 502
    return b"".join(http_response(request, code or 500, detail=detail))


class Proxy(HeldInput):
    """`proxy`: pools on one EventLoop, built from load_pools()/flag_pool() configs.

    path: the nutcracker.yml they came from (SIGHUP reads it again), or None.
    item_size_max: bytes (-I), the largest item routed; dirty_limit: keys
    remembered per primary that is out. Raises ConfigError for a server that
    does not resolve, OSError for a listen address that cannot be bound.
    """

    def __init__(self, configs, path=None, item_size_max=ITEM_SIZE_MAX_DEFAULT,
                 dirty_limit=DIRTY_LIMIT_DEFAULT, reqs_per_event=REQS_PER_EVENT_DEFAULT,
                 http=True, http_origins=(), http_hosts=(), loop=None):
        self.loop = loop or EventLoop()
        self.path = path                 # the config file, for SIGHUP
        self.item_size_max = item_size_max
        self.dirty_limit = dirty_limit
        self.reqs_per_event = reqs_per_event
        self.http = http
        self.http_origins = frozenset(o.encode() for o in http_origins)
        self.extra_hosts = list(http_hosts)  # --http-host names
        self.http_hosts = None           # Host names allowed (set per listener below)
        self.stats = dict.fromkeys(PROXY_COUNTERS, 0)
        self.started = now()
        self.pools = {}                  # name -> Pool
        self.apply(configs)

    def run(self):
        """Serve until SIGTERM/SIGINT; SIGHUP reloads the configuration."""
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self.loop.add_signal_handler(signum, self.loop.stop)
            self.loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            self.loop.run()
        finally:
            self.close()

    def apply(self, configs):
        """Make the pools what configs say: servers kept where they did not change
        (with their state), listeners kept where the address did not."""
        old = self.pools
        pools = {}
        try:
            for config in configs:
                pools[config["name"]] = Pool(self, config, old.get(config["name"]))
            for name, pool in pools.items():
                previous = old.get(name)
                if previous is not None and previous.config["listen"] == pool.config["listen"]:
                    pool.listener, previous.listener = previous.listener, None
                    pool.listener.factory = self._accepter(pool)
                    pool.connections = previous.connections
                    for conn in pool.connections:
                        conn.pool = pool
                else:
                    pool.listener = Listener(self.loop, *pool.config["listen"],
                                             self._accepter(pool), pool.config["backlog"])
                    pool.connections = set()
        except BaseException:
            for name, pool in pools.items():
                if old.get(name) is None or old[name].listener is not None:
                    if pool.listener is not None and (name not in old or
                                                      pool.listener is not old[name].listener):
                        pool.listener.close()
            raise
        for name, pool in old.items():
            if name not in pools:
                pool.close()
            elif pool.listener is not None:
                pool.listener.close()
        self.pools = pools
        hosts = {"localhost", *self.extra_hosts}
        for pool in pools.values():
            host = pool.listener.address[0]
            hosts |= {host, f"[{host}]"}
        loopback = all(ipaddress.ip_address(p.listener.address[0]).is_loopback
                       for p in pools.values())
        self.http_hosts = (frozenset(h.lower().encode() for h in hosts)
                           if loopback or self.extra_hosts else None)

    def reload(self):
        """SIGHUP: read the configuration again; keep the old one if it is bad."""
        if self.path is None:
            log.warning("SIGHUP: no configuration file to reload (flags were used)")
            return
        try:
            with open(self.path) as f:
                configs = load_pools(f.read(), self.path)
            self.apply(configs)
        except (ConfigError, OSError) as err:
            log.error("reload of %s failed, keeping the running configuration: %s",
                      self.path, err)
            return
        log.warning("reloaded %s: pools %s", self.path, ", ".join(self.pools))

    def held_limit(self):
        return PROXY_HELD_BYTES

    def settings(self):
        """(name, value) pairs of `stats settings`."""
        return [("item_size_max", self.item_size_max), ("reqs_per_event", self.reqs_per_event),
                ("dirty_limit", self.dirty_limit), ("conf_file", self.path or "-"),
                ("pools", " ".join(self.pools))]

    def general_stats(self):
        """(name, value) pairs of the proxy's `stats`: its own counters, then
        <pool>:<server>:<field> per backend (state up/out/syncing/warming,
        requests, errors, timeouts, ejections, dirty_keys, latency p50/p99 µs)."""
        t = now()
        times = os.times()
        pairs = [("pid", os.getpid()), ("uptime", int(t - self.started)), ("time", int(t)),
                 ("version", PROXY_VERSION.decode()), ("pointer_size", struct.calcsize("P") * 8),
                 ("rusage_user", "%.6f" % times.user), ("rusage_system", "%.6f" % times.system),
                 ("curr_connections", sum(len(p.connections) for p in self.pools.values()))]
        pairs += [(name, self.stats[name]) for name in PROXY_COUNTERS]
        for pool in self.pools.values():
            pairs += pool.figures()
        return pairs

    def reset_stats(self):
        for name in ("requests", "conn_yields", "store_no_memory"):
            self.stats[name] = 0
        for pool in self.pools.values():
            for backend in pool.servers + pool.backups:
                backend.requests = backend.errors = backend.timeouts = backend.ejections = 0
                backend.latency = Histogram()

    def close(self):
        for pool in self.pools.values():
            pool.close()
            for conn in list(pool.connections):
                conn.flush()
                conn.close()
        self.loop.close()

    def _accepter(self, pool):
        def accept(sock, addr):
            self.stats["total_connections"] += 1
            pool.connections.add(ProxyConnection(pool, sock, addr))
        return accept


def explain_key(configs, key):
    """Lines that say where key goes in each pool: its hash value, the ring point
    (or modula slot) it lands on, the server and the backup."""
    lines = []
    for config in configs:
        ring = config_ring(config, config["servers"])
        value = ring.key_hash(key)
        server = config["servers"][ring.at(value)]
        name = server_name(server["host"], server["port"], server["name"])
        line = (f"pool {config['name']}: key {key!r} hash {config['hash']} {value}, "
                f"{config['distribution']} point {ring.point(value)} -> "
                f"{server['host']}:{server['port']} (ring name {name})")
        if config["backups"]:
            backup = config["backups"][config_ring(config, config["backups"]).index(key)]
            line += f", backup {backup['host']}:{backup['port']}"
        lines.append(line)
    return lines


def placement_diff(old_configs, new_configs, keys=100000):
    """Lines that say which fraction of `keys` sample keys move from each server
    to another, per pool present in both configurations."""
    lines = []
    new_by_name = {c["name"]: c for c in new_configs}
    sample = [b"key:%d" % i for i in range(keys)]
    for old in old_configs:
        new = new_by_name.get(old["name"])
        if new is None:
            lines.append(f"pool {old['name']}: removed")
            continue
        moves = collections.Counter()
        before, after = config_ring(old, old["servers"]), config_ring(new, new["servers"])
        for key in sample:
            a = old["servers"][before.index(key)]
            b = new["servers"][after.index(key)]
            moves[(f"{a['host']}:{a['port']}", f"{b['host']}:{b['port']}")] += 1
        moved = sum(n for (a, b), n in moves.items() if a != b)
        lines.append(f"pool {old['name']}: {moved / keys:.2%} of {keys} keys move")
        for (a, b), n in sorted(moves.items(), key=lambda item: -item[1]):
            if a != b:
                lines.append(f"  {a} -> {b}: {n / keys:.2%}")
    for name in new_by_name:
        if name not in {c["name"] for c in old_configs}:
            lines.append(f"pool {name}: new")
    return lines


# ===== 10. Replication =======================================================
#
# A replica pulls each source's log over an ordinary connection to the
# source's port (Tokyo Tyrant's -mhost/-mport, repcached's -x). It sends one
# line:
#
#     repl <replica sid> <lost after> <lost before> <rts>\r\n
#
# the rts being "<source sid> <file> <offset> [<stamp> <length>]" for this
# source ("- - 0" when it has none). The lost window (µs; "0 0": none) is
# the replica's clock when its start had recovered its store and the time
# it started: a change of its own stamped between them is one it lost
# (restored from a backup, a log tail cut by a crash); those come back. It
# keeps the window (store meta "lost") until every peer has caught up once.
# The source answers one line, then frames until either side closes:
#
#     REPL <source sid>\r\n           the stream follows
#     SERVER_ERROR <why>\r\n          refused (the same sid, a bad request); closed
#
# A record is a ulog frame (section 6), byte for byte as the source's log
# holds it; the records whose origin is the replica (no echo; but for its
# lost window) and OP_RTS records are left out. Control frames go between them:
#
#     magic u8 0xCA, kind u8, length u32, crc32 u32 (zlib) of the body, body
#
#     'C'  a full copy follows (body: why, text). Until the next 'P' the
#          records are the source's flush_all state (OP_FLUSH), live items
#          (OP_SET) and tombstones (OP_DELETE), with their stamps, in no order.
#     'P'  body "<file> <offset> [<stamp> <length>]": every record of the
#          source's log before that position has been sent; the last of them
#          has that stamp and frame length (absent at the start of a
#          file, or for a log from before stamps). The replica's new rts.
#     'H'  heartbeat, every REPL_HEARTBEAT_SECONDS, struct <QQQ>: the source's
#          time (µs), bytes of its log not yet sent, records not yet sent
#          (estimated from the bytes while the stream catches up).
#     'E'  body: why the source ends the stream (text); it closes after it.
#
# The replica applies records by the stamp rule (Store.apply_remote), which
# journals each one it applies with its origin stamp, and after each 'P' an
# OP_RTS record with that position: the rts is in the replica's own log with
# the records it covers, as durable as they are under its --sync. Records
# after the last durable 'P' come again after a reconnect, which changes
# nothing (they are effects, and equal stamps lose). A position the source
# no longer holds (pruned past --ulog-retain, out of the memory backlog,
# another server's, or one whose last record is not there with its stamp
# and length: a log restored from a backup, or one that lost its tail to a
# crash, has since written other records at that offset; Tokyo Tyrant
# would skip them) gets a full copy: it starts at the
# log's end P0, sends every item, then 'P' P0 and the log from P0, so the
# writes made during the copy arrive too. The source sends about
# REPL_FILL_BYTES per loop pass, and only as fast as the socket drains, so
# its clients are served meanwhile and its memory stays bounded.
#
# `replicate --from S --to T` is the same pull, by a process of its own: to a
# memtool T it forwards the frames over a `rapply` connection, which answers
# `OK <P body>` for each 'P' once T's log holds what came before it,
# and the rts goes to --rts FILE after that; to any other memcached it sends
# set/delete/touch/flush_all with the remaining TTL, and `version` as the
# barrier before each rts. `replicate --check A B` compares two memtools by
# `rdigest` (digests of live items per bucket of crc32(key), then the keys
# of the buckets that differ) and `rfetch` (a key's current Record).

REPL_MAGIC = 0xCA
REPL_FRAME = struct.Struct("<BBII")     # magic, kind, length, crc32 of the body
REPL_HEARTBEAT = struct.Struct("<QQQ")  # source time µs, bytes behind, records behind
REPL_COPY, REPL_POSITION, REPL_HEARTBEAT_KIND, REPL_ERROR = b"CPHE"
REPL_CONTROL_MAX = 4096                 # a control frame's body is short
REPL_HEARTBEAT_SECONDS = 1.0
REPL_TIMEOUT_SECONDS = 5.0              # a link that hears nothing this long is dropped
REPL_RETRY_MIN_SECONDS = 0.2            # reconnects back off from this
REPL_RETRY_MAX_SECONDS = 5.0            # ... to this
REPL_FILL_BYTES = 1 << 20               # a stream sends about this much per loop pass
REPL_COPY_ITEMS = 500                   # a full copy or a digest reads this many per step
REPL_RECORD_SLACK = 1024                # a record may exceed -I by its key and header
NO_RTS = "- - 0"                        # the rts of a replica that has none
REPL_RTS_SLACK_BYTES = 1 << 20          # with nothing applied, the rts is journaled
                                        # once it moved this far
DIGEST_BITS = 12                        # `replicate --check`: buckets of the first level
DIGEST_ENTRIES_MAX = 1 << 15            # prefixes << bits an rdigest may ask for
DIGEST_KEYS_MAX_BYTES = 16 << 20        # an `rdigest keys` answer's bound
DIGEST_ENTRY = struct.Struct("<IQ")     # per bucket: live items, sum of their digests
DIGEST_KEY = struct.Struct("<QIBQH")    # per key: stamp (µs, sid), is a tombstone, digest,
                                        # key length
CHECK_KEYS_PER_LEAF = 64                # a differing bucket with more keys is opened further
CHECK_PREFIXES_PER_REQUEST = 100        # prefixes (or keys) per rdigest/rfetch line
CHECK_TIMEOUT_SECONDS = 60.0            # a digest of a large store takes a while


def control_frame(kind, body=b""):
    """The bytes of a control frame (see above)."""
    return REPL_FRAME.pack(REPL_MAGIC, kind, len(body), zlib.crc32(body)) + body


def read_frame(buf, pos, record_max):
    """The frame of a replication stream at buf[pos:]: None while it has not all
    arrived, else (kind, content, end): kind 0 for a record (content the
    Record), else the control kind (content its body). Raises LogCorrupt for
    bytes that are no frame, and for a record longer than record_max bytes,
    so that a peer cannot make us hold more."""
    if pos >= len(buf):
        return None
    if buf[pos] == ULOG_MAGIC:
        if len(buf) - pos >= ULOG_FRAME.size and \
                ULOG_FRAME.unpack_from(buf, pos)[1] > record_max:
            raise LogCorrupt("a record longer than the largest item")
        found = read_record(buf, pos)
        return None if found is None else (0, found[0], found[1])
    if buf[pos] != REPL_MAGIC:
        raise LogCorrupt(f"a byte 0x{buf[pos]:02x} where a frame starts")
    if len(buf) - pos < REPL_FRAME.size:
        return None
    _, kind, length, crc = REPL_FRAME.unpack_from(buf, pos)
    if kind not in (REPL_COPY, REPL_POSITION, REPL_HEARTBEAT_KIND, REPL_ERROR) \
            or length > REPL_CONTROL_MAX:
        raise LogCorrupt("a bad control frame")
    start = pos + REPL_FRAME.size
    if start + length > len(buf):
        return None
    body = bytes(buf[start:start + length])
    if zlib.crc32(body) != crc:
        raise LogCorrupt("crc32 mismatch in a control frame")
    return kind, body, start + length


def parse_rts(text):
    """An rts "<sid> <file> <offset> [<stamp> <length>]" (section 10's 'P') as
    (source sid or None, [file, offset] or None, (stamp, length) of the
    record before the offset, or None). Raises ValueError."""
    sid, name, offset, *last = (text or NO_RTS).split()
    if name == "-":
        return None, None, None
    position = [name, int(offset)]
    if position[1] < 0:
        raise ValueError(text)
    if not last:
        return int(sid), position, None
    stamp, length = map(int, last)
    if not 0 < length <= position[1]:
        raise ValueError(text)
    return int(sid), position, (stamp, length)


def position_body(position, last=None):
    """A 'P' frame's body: position [file, offset]; last: (stamp, frame length)
    of the record that ends there."""
    if last is None:
        return b"%s %d" % (position[0].encode(), position[1])
    return b"%s %d %d %d" % (position[0].encode(), position[1], *last)


def format_stamp(stamp):
    """A stamp for people: `<unix seconds>.<µs>/<sid>`, `-` for none."""
    if not stamp:
        return "-"
    ts = stamp >> STAMP_SID_BITS
    return "%d.%06d/%d" % (ts // 1000000, ts % 1000000, stamp & UINT32_MASK)


def item_record(key, item):
    """The Record that recreates an Item (or a tombstone) on another server."""
    if item.state & TOMBSTONE:
        return Record(item.stamp, OP_DELETE, key, 0, 0, 0, b"")
    return Record(item.stamp, OP_SET | (item.state & PERSISTED_STATE) << 4, key, item.flags,
                  item.exptime, item.cas, item.value)


def item_digest(key, item):
    """64 bits of md5 over what two servers must agree on: key, flags, exptime, data."""
    return int.from_bytes(hashlib.md5(b"%b %d %d %b" % (key, item.flags, item.exptime,
                                                        item.value)).digest()[:8], "little")


class ReplStream:
    """The source side of one replication stream (see above): this server's log,
    or a full copy and then the log, written to a replica's connection.

    fill() sends the next part, about REPL_FILL_BYTES, unless the connection
    is backed up (then it is called again once it drained) or a batch is
    open (the server's group commit calls it after every batch). position:
    where the next record is, None while copying.
    """

    def __init__(self, server, conn, replica_sid, lost, position, last, why_copy):
        self.server = server
        self.conn = conn
        self.replica_sid = replica_sid   # its records are not sent back,
        self.lost = lost                 # but for those stamped in (after, before) µs
        self.position = position         # [file, offset] in server.feed
        self.last = last                 # (stamp, length) the replica saw end there
        self.verified = False            # a read from the replica's position worked
        self.scan = None                 # the StoreScan of a full copy
        self.copy_end = None             # ... and the position the log resumes at
        self.copy_last = None            # ... and (stamp, length) of the record before
        self.copied = 0                  # items sent by the copy
        self.copy_started = 0.0
        self.records = self.bytes = 0    # records (and bytes) of the log gone past
        self.timer = server.loop.call_later(REPL_HEARTBEAT_SECONDS, self._heartbeat)
        server.followers.append(self)
        conn.producer = self
        if why_copy:
            self._start_copy(why_copy, logging.INFO)
        self.fill()

    def input(self, data, start):
        """A replica sends nothing after its request: drop what comes."""
        return len(data)

    def fill(self):
        conn = self.conn
        if conn.closed or self.server.store.undo is not None:
            return
        budget = REPL_FILL_BYTES
        while budget > 0:
            if conn.backed_up():
                conn.paused = True           # resume() fills again once it drained
                return
            if self.scan is not None:
                self._copy_step()
                break                        # one step per pass: the clients come first
            sent = self._log_step()
            if not sent:
                return
            budget -= sent
        self.server.loop.call_soon(self.fill)

    def stop(self):
        """The connection closed."""
        self.timer.cancel()
        if self in self.server.followers:
            self.server.followers.remove(self)

    def _log_step(self):
        """Send the records from position on (that the log has written); returns
        the bytes sent, 0 when there were none."""
        feed, position = self.server.feed, self.position
        if not self.verified and self.last is not None:
            why = self._not_there(feed, position)
            if why:
                self._start_copy(f"its position {position[0]} {position[1]} {why}",
                                 logging.WARNING)
                return 1
        last = feed.last_batch
        if last is not None and position == [last[0], last[1]]:
            data, pairs, pos = last[2], [], 0      # the batch just written: no read
            while pos < len(data):
                record, end = read_record(data, pos)
                pairs.append((record, data[pos:end]))
                pos = end
            end_position = [last[0], last[1] + len(data)]
        elif position == feed.position:
            return 0
        else:
            try:
                pairs, end_position = feed.read(position, REPL_FILL_BYTES)
            except (PositionLost, LogDamaged) as err:
                if not self.verified or isinstance(err, PositionLost):
                    self._start_copy(f"the log does not hold its position {position[0]} "
                                     f"{position[1]}: {err}", logging.WARNING)
                    return 1
                log.error("replication to %s: %s; ending the stream", self.conn.addr, err)
                self.conn.write(control_frame(REPL_ERROR, str(err).encode()))
                self.conn.close_when_sent()
                return 0
        self.verified = True
        self.position = end_position
        if not pairs:
            return 0
        sid, (after, before) = self.replica_sid, self.lost
        frames = [frame for record, frame in pairs
                  if (record.stamp & UINT32_MASK != sid or after < record.ts < before)
                  and record.op & 0x0F != OP_RTS]
        record, frame = pairs[-1]
        frames.append(control_frame(REPL_POSITION, position_body(
            end_position, (record.stamp, len(frame)) if end_position[1] >= len(frame) else None)))
        self.conn.writelines(frames)
        self.records += len(pairs)
        size = sum(len(frame) for _, frame in pairs)
        self.bytes += size
        return size

    def _not_there(self, feed, position):
        """Why the record before position is not the one the replica applied
        (None: it is): the log was restored or lost its tail and wrote others."""
        stamp, length = self.last
        try:
            pairs, end = feed.read([position[0], position[1] - length], length)
        except (PositionLost, LogDamaged) as err:
            return f"is not in this log ({err})"
        if not pairs or end != position or pairs[0][0].stamp != stamp:
            return ("follows other records than it applied (this log was restored or "
                    "lost its tail since)")
        return None

    def _start_copy(self, why, level):
        """Begin a full copy; `level`: WARNING when a replica lost its place."""
        store = self.server.store
        self.scan = StoreScan(store)
        feed = self.server.feed
        self.copy_end, self.position, self.last = feed.position, None, None
        self.copy_last = feed.last_record if self.copy_end[1] else None
        self.copied, self.copy_started = 0, time.monotonic()
        log.log(level, "replication to %s (sid %d): a full copy, because %s", self.conn.addr,
                self.replica_sid, why)
        parts = [control_frame(REPL_COPY, why.encode())]
        if store.flush_stamp:
            parts += record_frame(store.flush_stamp, OP_FLUSH, b"", 0, 0, 0, b"")
        if store.flush_pending:
            stamp, deadline = store.flush_pending
            parts += record_frame(stamp, OP_FLUSH, b"", 0, deadline, 0, b"")
        self.conn.writelines(parts)

    def _copy_step(self):
        chunk = self.scan.chunk(REPL_COPY_ITEMS, REPL_FILL_BYTES)
        if not chunk and self.scan.ended:
            self.scan, self.position = None, self.copy_end
            log.info("replication to %s: the full copy is sent (%d items in %.1f s)",
                     self.conn.addr, self.copied, time.monotonic() - self.copy_started)
            self.conn.write(control_frame(REPL_POSITION, position_body(self.position,
                                                                       self.copy_last)))
            return
        parts = []
        for key, item in chunk:
            parts += record_frame(*item_record(key, item))
        self.copied += len(chunk)
        self.conn.writelines(parts)

    def _heartbeat(self):
        self.timer = self.server.loop.call_later(REPL_HEARTBEAT_SECONDS, self._heartbeat)
        if self.conn.closed or self.conn.backed_up():
            return
        behind = 0
        if self.position is not None:
            try:
                behind = self.server.feed.distance(self.position)
            except OSError:
                behind = 0
        average = self.bytes / self.records if self.records else 100
        self.conn.write(control_frame(REPL_HEARTBEAT_KIND, REPL_HEARTBEAT.pack(
            time.time_ns() // 1000, behind, round(behind / average))))


def _ignore(buf, pos=0):
    return len(buf)


def cmd_repl(conn, tokens):
    """`repl <replica sid> <lost after> <lost before> <rts>`: this connection
    becomes a ReplStream (the section's comment). The same sid on both sides is refused."""
    server, store = conn.server, conn.server.store
    try:
        if len(tokens) not in (7, 9):
            raise ValueError
        replica_sid, *lost = map(int, tokens[1:4])
        rts_sid, position, last = parse_rts(b" ".join(tokens[4:]).decode())
        if not 0 <= replica_sid <= UINT32_MASK:
            raise ValueError
    except (ValueError, UnicodeError):
        raise ClientError(b"usage: repl <replica sid> <lost after> <lost before> <source sid> "
                          b"<file> <offset> [<stamp> <length>]") from None
    if replica_sid == store.sid:
        log.error("replication: %s asks for our log with our own sid %d; refusing (give each "
                  "server its own --sid)", conn.addr, store.sid)
        conn.write(b"SERVER_ERROR replica has the same sid %d as this server\r\n" % store.sid)
        conn.close_when_sent()
        return
    server.start_backlog()
    why = None
    if position is None:
        why = "it has no position"
    elif rts_sid != store.sid:
        why = f"its position is in the log of sid {rts_sid}, not ours ({store.sid})"
    conn.write(b"REPL %d\r\n" % store.sid)
    ReplStream(server, conn, replica_sid, lost, position, last, why)


class RapplyInput:
    """`rapply`: this connection brings a replication stream from `replicate`
    (frames as a source sends them) into the store; each 'P' is answered
    `OK <P body>` once the log holds the records before it (the
    server's group commit holds replies until then)."""

    def __init__(self, conn):
        self.conn = conn
        self.store = conn.server.store
        self.record_max = conn.server.item_size_max + REPL_RECORD_SLACK

    def process(self, buf, pos=0):
        conn = self.conn
        try:
            while True:
                found = read_frame(buf, pos, self.record_max)
                if found is None:
                    return pos
                kind, content, pos = found
                if not kind:
                    self.store.apply_remote(content)
                elif kind == REPL_POSITION:
                    conn.write(b"OK %b\r\n" % content)
        except LogCorrupt as err:
            conn.write(b"SERVER_ERROR %s\r\n" % str(err).encode())
        except ProtocolError as err:         # the log refuses writes
            conn.write(err.line)
        conn.close_when_sent()
        return len(buf)


def cmd_rapply(conn, tokens):
    """`rapply`: see RapplyInput; answers `RAPPLY <sid>` first."""
    conn.write(b"RAPPLY %d\r\n" % conn.server.store.sid)
    conn.process = RapplyInput(conn).process
    conn.handed_over = True                   # what follows in this read is frames


class DigestJob:
    """`rdigest <bits> <prefix>...` and `rdigest keys <prefix>...`: what
    `replicate --check` compares, computed a StoreScan chunk per loop pass.

    A prefix is `<length>:<value>`: the keys whose crc32 starts with those
    bits (`0:0`: all). The first form answers, for each prefix, 2**bits
    DIGEST_ENTRY (live items, sum of their item_digest mod 2**64) of its
    sub-buckets; the second, a DIGEST_KEY and the key for each item and
    tombstone in the prefixes. Either as one `VALUE digest 0 <n>` block
    then END.
    """

    def __init__(self, conn, bits, prefixes):
        self.conn = conn
        self.bits = bits                     # None: list keys
        self.prefixes = prefixes             # [(length, value)]
        self.scan = StoreScan(conn.server.store)
        self.entries = [0] * (2 ** bits * 2 * len(prefixes)) if bits is not None else None
        self.keys = []
        self.size = 0                        # bytes of keys
        conn.producer = self
        conn.server.loop.call_soon(self.fill)

    def input(self, data, start):
        """The requests after this one wait until it is answered."""
        self.conn.paused = True
        return start

    def fill(self):
        conn = self.conn
        if conn.closed or conn.producer is not self:
            return
        try:
            chunk = self.scan.chunk(REPL_COPY_ITEMS, REPL_FILL_BYTES)
        except ProtocolError as err:          # the store cannot be read
            self._answer(err.line)
            return
        for key, item in chunk:
            index = self._bucket(zlib.crc32(key))
            if index is None:
                continue
            tombstone = bool(item.state & TOMBSTONE)
            digest = 0 if tombstone else item_digest(key, item)
            if self.entries is None:
                self.keys.append(DIGEST_KEY.pack(item.stamp >> STAMP_SID_BITS,
                                                 item.stamp & UINT32_MASK, tombstone, digest,
                                                 len(key)) + key)
                self.size += DIGEST_KEY.size + len(key)
                if self.size > DIGEST_KEYS_MAX_BYTES:
                    self._answer(b"SERVER_ERROR more than %d bytes of keys; ask for narrower "
                                 b"prefixes\r\n" % DIGEST_KEYS_MAX_BYTES)
                    return
            elif not tombstone:
                self.entries[2 * index] += 1
                self.entries[2 * index + 1] = (self.entries[2 * index + 1] + digest) & UINT64_MASK
        if not self.scan.ended:
            conn.server.loop.call_soon(self.fill)
            return
        if self.entries is None:
            data = b"".join(self.keys)
        else:
            data = b"".join(DIGEST_ENTRY.pack(self.entries[i], self.entries[i + 1])
                            for i in range(0, len(self.entries), 2))
        self._answer(b"VALUE digest 0 %d\r\n%b\r\nEND\r\n" % (len(data), data))

    def _answer(self, reply):
        """Send the reply; the requests after this one are parsed again."""
        conn = self.conn
        conn.write(reply)
        conn.producer = None
        conn.paused = False
        conn.resume()

    def stop(self):
        """The connection closed."""

    def _bucket(self, h):
        """Index of h's bucket among the answer's entries, None if in no prefix."""
        for number, (length, value) in enumerate(self.prefixes):
            if length == 0 or h >> (32 - length) == value:
                if self.bits is None:
                    return number
                return number << self.bits | (h >> (32 - length - self.bits)
                                              & ((1 << self.bits) - 1))
        return None


def cmd_rdigest(conn, tokens):
    """`rdigest <bits>|keys <length>:<value>...`: see DigestJob."""
    try:
        bits = None if tokens[1] == b"keys" else int(tokens[1])
        prefixes = list(dict.fromkeys(tuple(int(n) for n in t.split(b":"))
                                      for t in tokens[2:]))
        if not prefixes or (bits is not None and not 0 <= bits <= 16) or any(
                len(p) != 2 or not 0 <= p[0] <= 32 - (bits or 0) or not 0 <= p[1] < 2 ** p[0]
                for p in prefixes) or len(prefixes) << (bits or 0) > DIGEST_ENTRIES_MAX:
            raise ValueError
    except (ValueError, IndexError):
        raise ClientError(b"usage: rdigest <bits>|keys <length>:<value>... (at most %d "
                          b"entries)" % DIGEST_ENTRIES_MAX) from None
    DigestJob(conn, bits, prefixes)


def cmd_rfetch(conn, tokens):
    """`rfetch <key>...`: a `VALUE <key> 0 <n>` block per key the store holds (an item
    or a tombstone), its data the key's Record as a ulog frame; then END."""
    store = conn.server.store
    keys = list(dict.fromkeys(tokens[1:]))
    if len(keys) > CHECK_PREFIXES_PER_REQUEST:
        raise ClientError(b"at most %d keys per rfetch" % CHECK_PREFIXES_PER_REQUEST)
    out = []
    for key in keys:
        stamp = store.stamp_of(key)
        item = store.get(key, False)
        if item is not None:
            frame = b"".join(record_frame(*item_record(key, item)))
        elif stamp:
            frame = b"".join(record_frame(stamp, OP_DELETE, key, 0, 0, 0, b""))
        else:
            continue
        out += (b"VALUE %b 0 %d\r\n" % (key, len(frame)), frame, CRLF)
    out.append(END)
    conn.writelines(out)


REPL_HANDLERS = {b"repl": cmd_repl, b"rapply": cmd_rapply, b"rdigest": cmd_rdigest,
                 b"rfetch": cmd_rfetch}
HANDLERS.update(REPL_HANDLERS)
COMMANDS.update((name, CommandSpec(name, 0, BLOCK_NONE, REPLY_LINE, ROUTE_LOCAL, False))
                for name in REPL_HANDLERS)


class _LinkConnection(Upstream):
    """The connection of a SourceLink: bytes go to the link, not to replies."""

    def __init__(self, link, address):
        super().__init__(link.loop, address, None, connect_timeout=REPL_TIMEOUT_SECONDS)
        self.link = link

    def data_received(self, data):
        self.link.received(data)

    def connection_lost(self):
        super().connection_lost()
        self.link.lost(self, self.error or "the source closed the connection")


class SourceLink:
    """The pulling side of a replication stream: connects to a source, asks for
    its log from the rts, checks the greeting, splits what comes into frames
    (frame() takes each), and when anything goes wrong (a refused connect, a
    bad frame, no heartbeat for REPL_TIMEOUT_SECONDS) logs why, drops the
    connection and tries again with backoff. Subclasses give sid (this
    side's), rts() (the request's rts), lost_window() and frame(kind,
    content, start, end): each record and control frame but heartbeats, at
    self.buf[start:end].

    state: connecting, copying, streaming or down; stats() the `stats` lines.
    """

    def __init__(self, loop, host, port):
        self.loop = loop
        self.host, self.port = host, port
        self.name = f"{host}:{port}"
        self.state = "down"
        self.conn = None
        self.greeted = False
        self.buf = bytearray()
        self.source_sid = None
        self.retry = REPL_RETRY_MIN_SECONDS
        self.reason = None               # why the link last failed (logged once)
        self.heard = time.monotonic()
        self.applied = 0                 # records applied
        self.bytes_behind = self.lag_records = 0
        self.lag_seconds = 0.0
        self.last_ts = 0                 # ts of the newest record received
        self.copied = 0                  # records of the current full copy
        loop.call_every(REPL_HEARTBEAT_SECONDS, self._watch)

    def lost_window(self):
        """(after, before) µs: changes of our own the source should send back."""
        return 0, 0

    def caught_up(self):
        """The source said it has nothing more to send (a heartbeat)."""

    def connect(self):
        self.state, self.greeted = "connecting", False
        self.buf.clear()
        self.heard = time.monotonic()
        try:
            address = resolve(self.host, self.port)
        except ConfigError as err:
            self.conn = None
            self._failed(str(err))
            return
        self.conn = _LinkConnection(self, address)
        self.conn.write(b"repl %d %d %d %s\r\n" % (self.sid, *self.lost_window(),
                                                   self.rts().encode()))

    def received(self, data):
        self.heard = time.monotonic()
        buf = self.buf
        buf += data
        pos = 0
        try:
            if not self.greeted:
                eol = buf.find(b"\n")
                if eol < 0:
                    if len(buf) > REPLY_LINE_MAX_BYTES:
                        raise LogCorrupt("no greeting line")
                    return
                self._greet(bytes(buf[:eol]).rstrip(b"\r"))
                pos = eol + 1
            while True:
                found = read_frame(buf, pos, ULOG_RECORD_MAX)
                if found is None:
                    break
                kind, content, end = found
                start, pos = pos, end
                if not kind:
                    self.last_ts = content.ts
                elif kind == REPL_HEARTBEAT_KIND:
                    if len(content) != REPL_HEARTBEAT.size:
                        raise LogCorrupt(f"a heartbeat of {len(content)} bytes")
                    now_us, self.bytes_behind, self.lag_records = REPL_HEARTBEAT.unpack(content)
                    if not self.bytes_behind and self.state == "streaming":
                        self.caught_up()
                    self.lag_seconds = max(0, now_us - self.last_ts) / 1e6 \
                        if self.bytes_behind else 0.0
                    continue
                elif kind == REPL_ERROR:
                    raise LogCorrupt("the source ends the stream: " +
                                     content.decode("utf-8", "replace"))
                elif kind == REPL_COPY:
                    self.state, self.copied = "copying", 0
                    lost = parse_rts(self.rts())[1] is not None   # it had a place
                    log.log(logging.WARNING if lost else logging.INFO,
                            "replication from %s: a full copy begins (%s)", self.name,
                            content.decode("utf-8", "replace"))
                else:                         # 'P': the rts to come
                    try:
                        parse_rts(f"{self.source_sid} {bytes(content).decode()}")
                    except (ValueError, UnicodeError):
                        raise LogCorrupt(f"a bad position {bytes(content[:80])!r}") from None
                    self.retry = REPL_RETRY_MIN_SECONDS       # the link works
                    if self.state == "copying":
                        log.info("replication from %s: the full copy is in (%d records)",
                                 self.name, self.copied)
                        self.state = "streaming"
                self.frame(kind, content, start, end)
                if self.conn is None or self.conn.closed:
                    return
        except (LogCorrupt, ProtocolError) as err:
            del buf[:]
            self.drop(str(err))
            return
        del buf[:pos]

    def drop(self, why):
        """Give up this connection (and reconnect later)."""
        if self.conn is not None and not self.conn.closed:
            self.conn.fail("parse", why)

    def lost(self, conn, why):
        """The connection closed: say why (once), come back after the backoff."""
        if conn is self.conn:
            self.conn = None
            self._failed(why)

    def stats(self):
        prefix = f"repl:{self.name}:"
        return [(prefix + "state", self.state), (prefix + "applied", self.applied),
                (prefix + "lag_records", self.lag_records),
                (prefix + "lag_seconds", "%.3f" % self.lag_seconds),
                (prefix + "bytes_behind", self.bytes_behind)]

    def _greet(self, line):
        parts = line.split()
        if len(parts) == 2 and parts[0] == b"REPL" and parts[1].isdigit():
            self.source_sid = int(parts[1])
            if self.source_sid == self.sid:
                raise LogCorrupt(f"the source has our sid {self.sid}; give each server its "
                                 f"own --sid")
        elif line.startswith(b"SERVER_ERROR "):
            raise LogCorrupt("the source refuses: " + line[13:].decode("utf-8", "replace"))
        else:
            raise LogCorrupt(f"not a memtool with replication (it answers {line[:60]!r})")
        self.greeted = True
        self.state = "streaming"
        if self.reason is not None:
            log.warning("replication from %s: connected again", self.name)
        self.reason = None

    def _failed(self, why):
        self.state = "down"
        if why != self.reason:
            log.warning("replication from %s: %s; retrying", self.name, why)
            self.reason = why
        self.loop.call_later(self.retry, self.connect)
        self.retry = min(self.retry * 2, REPL_RETRY_MAX_SECONDS)

    def _watch(self):
        conn = self.conn
        if conn is not None and conn.held:       # not read while the target drains
            self.heard = time.monotonic()
        elif conn is not None and not conn.closed and \
                time.monotonic() - self.heard > REPL_TIMEOUT_SECONDS:
            conn.fail("timeout", f"nothing heard for {REPL_TIMEOUT_SECONDS:g} s")


class PeerLink(SourceLink):
    """`serve --peer HOST:PORT`: this server pulls that source's log into its store
    by the stamp rule; its rts is journaled (Store.note_rts) under the name
    host:port, with the source's sid to tell its log from another's."""

    def __init__(self, server, host, port):
        super().__init__(server.loop, host, port)
        self.server = server
        self.store = server.store
        self.served = False          # it caught up once since our start (caught_up())
        self.batch_start = -1        # tracked in the server's open batch
        self.applied_since = False   # records applied since the rts was journaled
        self.connect()

    @property
    def sid(self):
        return self.store.sid

    def rts(self):
        return self.store.rts.get(self.name, NO_RTS)

    def lost_window(self):
        return self.store.lost or (0, 0)

    def caught_up(self):
        """Every peer has sent what its log held when we asked: our lost window is
        served (and forgotten at the next checkpoint)."""
        self.served = True
        if self.store.lost is not None and all(link.served for link in self.server.links):
            self.store.lost = None
            self.store.meta_dirty = True

    def frame(self, kind, content, start, end):
        store = self.store
        if not kind:
            if self.batch_start < 0 and store.undoable:
                self.server.track_batch(self, 0)
            if store.apply_remote(content):
                self.applied += 1
                self.applied_since = True
            if self.state == "copying":
                self.copied += 1
        elif kind == REPL_POSITION:
            rts = f"{self.source_sid} {content.decode()}"
            if self.applied_since or self._far(rts):
                if self.batch_start < 0 and store.undoable:
                    self.server.track_batch(self, 0)
                store.note_rts(self.name, rts)
                self.applied_since = False

    def _far(self, rts):
        """Is rts far enough past the one journaled to be worth a record, with
        no record applied since? (Two peers would otherwise log each other's
        rts records back and forth.)"""
        old_sid, old, _ = parse_rts(self.store.rts.get(self.name))
        new_sid, new, _ = parse_rts(rts)
        return old is None or old_sid != new_sid or old[0] != new[0] or \
            new[1] - old[1] >= REPL_RTS_SLACK_BYTES

    def batch_kept(self):
        self.batch_start = -1

    def refuse_batch(self, error):
        """The log could not take what was applied: the store rolled it back
        (the rts too), so ask again from there."""
        self.batch_start = -1
        self.drop(f"our log cannot take the records ({error.why.decode()})")


def repl_stats(server):
    """The `stats repl` lines: this server's role and each peer's link."""
    role = "+".join(name for name, present in (("source", server.followers),
                                                 ("replica", server.links)) if present)
    pairs = [("repl_role", role or "none"), ("repl_replicas", len(server.followers))]
    for link in server.links:
        pairs += link.stats()
    return pairs


def start_peers(server, peers):
    """Pull from each `host:port` of peers (serve --peer); `stats repl` from now on.
    Call it once the store is recovered: the lost window (section 10's
    comment) runs from the recovered clock (or the start of a window not yet
    served by every peer) to now."""
    server.stat_groups["repl"] = lambda: repl_stats(server)
    if peers:
        store = server.store
        after = store.clock if store.lost is None else min(store.lost[0], store.clock)
        store.lost = [after, store.stamp_now() >> STAMP_SID_BITS]
        store.meta_dirty = True
        server.start_backlog()
    for text in peers:
        server.links.append(PeerLink(server, *parse_address(text)))


class _TargetConnection(Upstream):
    """The agent's connection to its target: when its replies back up, the
    source is not read until they drain."""

    def __init__(self, agent, address):
        super().__init__(agent.loop, address, agent.target_reply,
                         connect_timeout=REPL_TIMEOUT_SECONDS, timeout=REPL_TIMEOUT_SECONDS * 6)
        self.agent = agent

    def resume(self):
        self.agent.target_drained()

    def connection_lost(self):
        super().connection_lost()
        self.agent.target_lost(self.error or "the target closed the connection")


class ReplicateAgent(SourceLink):
    """`memtool.py replicate --from SOURCE --to TARGET [--rts FILE]`: pulls SOURCE's
    log (a full copy first when needed) and applies it to TARGET: a memtool
    through `rapply` (records keep their stamps, as with --peer), any other
    memcached as set/delete/touch/flush_all with the remaining TTL. The rts
    is written to FILE (atomically, fsynced) once the target has applied
    what it covers: after a restart nothing is skipped. Runs until stopped.
    """

    def __init__(self, loop, source, target, rts_path=None):
        super().__init__(loop, *source)
        self.target_address = target         # (host, port)
        self.target_name = f"{target[0]}:{target[1]}"
        self.rts_path = rts_path
        self.current = NO_RTS                 # the rts the target has applied
        if rts_path is not None and os.path.exists(rts_path):
            with open(rts_path) as f:
                self.current = f.read().strip() or NO_RTS
            try:
                parse_rts(self.current)
            except ValueError:
                raise ConfigError(f"{rts_path}: not an rts (\"<sid> <file> <offset> "
                                  f"[<stamp> <length>]\"): {self.current[:80]!r}; remove "
                                  "it to start with a full copy") from None
        self.target = None                    # its _TargetConnection
        self.target_sid = None                # None: a plain memcached
        self.connect_target()

    @property
    def sid(self):
        return self.target_sid or 0

    def rts(self):
        return self.current

    def connect_target(self):
        try:
            address = resolve(*self.target_address)
        except ConfigError as err:
            self.target_lost(str(err))
            return
        self.target = _TargetConnection(self, address)
        self.target.send(b"rapply\r\n", REPLY_LINE, "hello")

    def target_reply(self, context, status, hits, raw):
        if status is None:
            return                            # target_lost() follows
        if context == "hello":
            if status.startswith(b"RAPPLY ") and status[7:].isdigit():
                self.target_sid = int(status[7:])
            elif status == b"ERROR":
                self.target_sid = None        # not a memtool: plain commands
            else:
                self.target.fail("parse", f"unexpected greeting {status[:60]!r}")
                return
            log.info("replicate: %s -> %s (%s)", self.name, self.target_name,
                     "a memtool, sid %d" % self.target_sid if self.target_sid
                     else "a memcached")
            self.connect()
        elif status.startswith(b"OK ") or status.startswith(b"VERSION"):
            self._save(context)
        else:
            self.target.fail("parse", f"the target answers {status[:80]!r}")

    def target_drained(self):
        if self.conn is not None and not self.conn.closed:
            self.conn.stop_reading(False)

    def target_lost(self, why):
        log.warning("replicate: the target %s: %s; retrying", self.target_name, why)
        self.target = None
        if self.conn is not None:
            self.drop("the target is down")
        self.loop.call_later(REPL_RETRY_MAX_SECONDS, self.connect_target)

    def connect(self):
        if self.target is not None and self.target.connected:
            super().connect()

    def _failed(self, why):
        if self.target is None:
            self.state = "down"               # connect_target() reconnects both
            return
        super()._failed(why)

    def received(self, data):
        super().received(data)
        target = self.target
        if target is not None and target.backed_up() and self.conn is not None:
            target.paused = True              # target_drained() reads on
            self.conn.stop_reading(True)

    def frame(self, kind, content, start, end):
        target = self.target
        if target is None or kind == REPL_COPY:
            return
        if not kind:
            self.applied += 1
            if self.state == "copying":
                self.copied += 1
            target.send(bytes(self.buf[start:end]) if self.target_sid else
                        memcached_command(content, now()), None)
        else:                                 # 'P': the target says when it has all before
            rts = f"{self.source_sid} {content.decode()}"
            target.send(bytes(self.buf[start:end]) if self.target_sid else b"version\r\n",
                        REPLY_LINE, rts)

    def _save(self, rts):
        self.current = rts
        if self.rts_path is None:
            return
        tmp = self.rts_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(rts + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.rts_path)
        fd = os.open(os.path.dirname(os.path.abspath(self.rts_path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)



def memcached_command(record, now_s):
    """The memcached text command (noreply) that has a plain memcached do what
    record did: exptimes become the remaining TTL (absolute past 30 days);
    a record already expired becomes a delete. Keys that are not text go
    as meta commands with base64 keys."""
    op, key = record.op & 0x0F, record.key
    binary = bool(record.op >> 4 & KEY_BINARY) or TEXT_KEY_UNSAFE.search(key) is not None
    if op == OP_FLUSH:
        delay = record.exptime - int(now_s) if record.exptime else 0
        return b"flush_all %d noreply\r\n" % max(delay, 0)
    ttl = 0
    if record.exptime:
        ttl = record.exptime - int(now_s)
        if ttl <= 0:
            op = OP_DELETE
        elif ttl > REALTIME_MAXDELTA:
            ttl = record.exptime
    if binary:
        key = binascii.b2a_base64(key, newline=False)
        if op == OP_SET:
            return b"ms %b %d b F%d T%d q\r\n%b\r\n" % (key, len(record.value), record.flags,
                                                        ttl, record.value)
        return b"md %b b q\r\n" % key if op == OP_DELETE else b"mg %b b T%d q\r\n" % (key, ttl)
    if op == OP_SET:
        return b"set %b %d %d %d noreply\r\n%b\r\n" % (key, record.flags, ttl,
                                                       len(record.value), record.value)
    if op == OP_DELETE:
        return b"delete %b noreply\r\n" % key
    return b"touch %b %d noreply\r\n" % (key, ttl)


class CheckClient:
    """A blocking connection for `replicate --check`, a short command-line run."""

    def __init__(self, text):
        self.name = text
        self.sock = socket.create_connection(parse_address(text), timeout=CHECK_TIMEOUT_SECONDS)
        self.buf = b""

    def call(self, request, expect):
        """Send request, return (status, [(key, data)]) of its reply (read_reply)."""
        self.sock.sendall(request)
        while True:
            reply = read_reply(self.buf, 0, expect)
            if reply is not None:
                end, status, hits = reply
                found = [(key, data) for key, _, data, _, _ in hits]
                self.buf = self.buf[end:]
                if status.startswith(ERROR_PREFIXES):
                    raise BadReply(f"{self.name} answers {status.decode(errors='replace')}")
                return status, found
            data = self.sock.recv(RECV_BYTES)
            if not data:
                raise BadReply(f"{self.name} closed the connection")
            self.buf += data

    def digests(self, bits, prefixes):
        """rdigest: per prefix, per sub-bucket (items, digest sum)."""
        out = []
        for i in range(0, len(prefixes), CHECK_PREFIXES_PER_REQUEST):
            chunk = prefixes[i:i + CHECK_PREFIXES_PER_REQUEST]
            line = b"rdigest %s %s\r\n" % (b"keys" if bits is None else b"%d" % bits,
                                            b" ".join(b"%d:%d" % p for p in chunk))
            out.append(self.call(line, REPLY_VALUES)[1][0][1])
        return b"".join(out)

    def keys(self, prefixes):
        """{key: (stamp, is a tombstone, digest)} of the items and tombstones in prefixes."""
        data, pos, found = self.digests(None, prefixes), 0, {}
        while pos < len(data):
            ts, sid, tombstone, digest, length = DIGEST_KEY.unpack_from(data, pos)
            pos += DIGEST_KEY.size
            found[data[pos:pos + length]] = (ts << STAMP_SID_BITS | sid, bool(tombstone), digest)
            pos += length
        return found


def check_pair(a, b, repair=False, report=print):
    """`replicate --check A B [--repair]`: compare two memtools (`host:port`) by
    digests, Merkle-style: DIGEST_BITS buckets of crc32(key), then only the
    buckets that differ, opened further while they hold many keys, then
    their keys. Reports each differing key with both sides' stamps; with
    repair, sends each the winning version (by the stamp rule) to the other
    side and compares again. Returns the number of differing keys (0:
    identical). Raises OSError, BadReply when a server cannot be asked."""
    clients = [CheckClient(a), CheckClient(b)]
    prefixes, bits, leaves = [(0, 0)], DIGEST_BITS, []
    while prefixes:
        sides = [c.digests(bits, prefixes) for c in clients]
        deeper = []
        for n, (length, value) in enumerate(prefixes):
            for j in range(1 << bits):
                at = (n << bits | j) * DIGEST_ENTRY.size
                entries = [DIGEST_ENTRY.unpack_from(side, at) for side in sides]
                if entries[0] == entries[1]:
                    continue
                child = (length + bits, value << bits | j)
                if max(e[0] for e in entries) > CHECK_KEYS_PER_LEAF and child[0] + 8 <= 32:
                    deeper.append(child)
                else:
                    leaves.append(child)
        prefixes, bits = deeper, 8
    found = [c.keys(leaves) for c in clients] if leaves else [{}, {}]
    differ = []
    for key in sorted(set(found[0]) | set(found[1])):
        facts = [side.get(key, (0, True, 0)) for side in found]
        live = [None if tombstone else digest for _, tombstone, digest in facts]
        if live[0] != live[1]:
            differ.append((key, facts))
    for key, facts in differ:
        report("%s  %s: %s %s  %s: %s %s" % (
            key.decode("utf-8", "backslashreplace"),
            *(x for (stamp, tombstone, _), name in zip(facts, (a, b))
              for x in (name, format_stamp(stamp), "deleted" if stamp and tombstone
                        else "absent" if tombstone else "live"))))
    report(f"{len(differ)} key(s) differ" if differ else "identical")
    if repair and differ:
        _repair(clients, differ, report)
        return check_pair(a, b, False, report)
    return len(differ)


def _repair(clients, differ, report):
    """Send each differing key's winning version to the side that lost."""
    moves = ([], [])                     # keys to copy from side 0 to 1, from 1 to 0
    for key, facts in differ:
        if facts[0][0] != facts[1][0]:
            moves[0 if facts[0][0] > facts[1][0] else 1].append(key)
        else:
            report(f"{key!r}: the same stamp on both sides; not repaired")
    for winner, keys in enumerate(moves):
        frames = []
        for i in range(0, len(keys), CHECK_PREFIXES_PER_REQUEST):
            frames += [data for _, data in clients[winner].call(
                b"rfetch %s\r\n" % b" ".join(keys[i:i + CHECK_PREFIXES_PER_REQUEST]),
                REPLY_VALUES)[1]]
        if frames:
            loser = clients[1 - winner]
            loser.call(b"rapply\r\n", REPLY_LINE)
            loser.call(b"".join(frames) + control_frame(REPL_POSITION, position_body(["-", 0])),
                       REPLY_LINE)
            report(f"repaired {len(frames)} key(s) on {loser.name}")
            loser.sock.close()
            clients[1 - winner] = CheckClient(loser.name)


# ===== 11. Bench ============================================================
#
# A load generator in the spirit of memtier_benchmark, for any server that
# speaks the memcached text or meta protocol. Each process runs one
# EventLoop; each logical client holds one connection per server, keeps up
# to `pipeline` requests in flight and picks each key's server with the
# Continuum, as a client pool does. Client g of G (over all processes) owns
# the keys whose index is g modulo G, so every write to a key travels one
# connection in order and --verify knows which write was last. Values are
# derived from the key and a per-client version, so a stale or damaged value
# is told apart from the right one.

BENCH_DEFAULTS = dict(
    servers=(), clients=50, pipeline=1, ratio=(1, 10), data_size=32, data_size_range=None,
    key_prefix="memtier-", key_minimum=0, key_maximum=10000000, key_pattern="R", multiget=1,
    requests=10000, test_time=None, protocol="text", seed=None, processes=1,
    hash="fnv1a_64", distribution="ketama", timeout=5.0, prefill=False, verify=False,
    verify_on=(), vs=None, rounds=3, json=None)
BENCH_ERROR_KINDS = ("server_error", "client_error", "error", "parse", "disconnect",
                     "timeout", "connect")
SET_REPLIES = (b"STORED", b"NOT_STORED", b"EXISTS", b"NOT_FOUND", b"HD", b"NS", b"EX", b"NF")
PREFILL_PIPELINE = 64
VERIFY_BATCH_KEYS = 100
VERIFY_RETRY_SECONDS = 0.2      # --verify-on reads what a replica lacks again after this


class OpStats:
    """Counters and latencies of one operation type (sets or gets)."""

    def __init__(self):
        self.ops = self.hits = self.misses = self.bytes = 0
        self.latency = Histogram()

    def merge(self, other):
        self.ops += other.ops
        self.hits += other.hits
        self.misses += other.misses
        self.bytes += other.bytes
        self.latency.merge(other.latency)
        return self


def make_value(key, version, size):
    """The value a bench write stores: version and key, repeated to `size` bytes."""
    seed = b"%x:%b:" % (version, key)
    return (seed * (size // len(seed) + 1))[:size]


class BenchClient:
    """A logical client: one connection per server, `pipeline` requests in flight."""

    def __init__(self, run, number):
        self.run = run                  # the BenchRun
        self.number = number            # global client number g of G
        self.keys = len(range(run.key_minimum + number, run.key_maximum + 1, run.clients_total))
        self.rng = random.Random(None if run.seed is None else run.seed * 1000003 + number)
        self.connections = [None] * len(run.addresses)   # an Upstream per server, once used
        self.in_flight = 0
        self.issued = 0                 # requests sent
        self.step = 0                   # position in the set:get cycle
        self.sequence = 0               # next key for the S pattern
        self.version = 0                # of this client's writes
        self.done = False
        self.queue = None               # fixed request list (prefill, verify) or None

    def start(self, queue=None):
        self.queue = queue
        self.fill()

    def fill(self):
        """Send requests until `pipeline` are in flight; finish when none are left.

        The requests leave at once, not at the end of the loop pass: a load
        generator wants the server busy while it parses the other replies.
        """
        while not self.done and self.in_flight < self.run.pipeline:
            request = self._take_request()
            if request is None:
                if self.in_flight == 0:
                    self.finish()
                break
            self._send(*request)
        for conn in self.connections:
            if conn is not None and conn.outbuf:
                conn.flush()

    def complete(self, context, status, hits, raw):
        """Upstream.on_reply: count the reply (or failure) to one request."""
        run = self.run
        if context is None:                     # bytes nobody asked for
            run.errors[raw] += 1
            return
        kind, sent_at, keys, versions, nbytes, server_index = context
        self.in_flight -= 1
        if status is not None and kind == "set" and status not in SET_REPLIES \
                and not status.startswith(ERROR_PREFIXES):
            self.connections[server_index].fail("parse", f"{status[:80]!r} is no reply to a set")
            status, raw = None, "parse"
        if status is None:                      # the request failed: raw says how
            run.errors[raw] += 1
            if raw == "connect":
                run.connect_error = self.connections[server_index].error
                self.finish()
            elif not self.done:
                run.loop.call_soon(self.fill)  # the connection is gone: go on with a new one
            return
        stats = run.sets if kind == "set" else run.gets
        nbytes += len(raw)
        if status.startswith(ERROR_PREFIXES):
            run.errors[status.split(b" ", 1)[0].lower().decode()] += 1
        elif run.recording:
            stats.ops += 1
            stats.bytes += nbytes
            stats.latency.record((time.perf_counter() - sent_at) * 1e6)
            if kind == "get":
                stats.hits += len(hits)
                stats.misses += len(keys) - len(hits)
        elif kind == "set" and not run.recording:
            run.prefilled += 1
        if kind == "set":
            if status in (b"STORED", b"HD") and run.written is not None:
                run.written[keys[0]] = versions
        elif kind == "verify":
            run.check(keys, hits)

    def finish(self):
        if not self.done:
            self.done = True
            self.run.client_done()

    def _take_request(self):
        """(kind, key indexes, versions) of the next request, or None when done."""
        run = self.run
        if self.queue is not None:
            return self.queue.pop() if self.queue else None
        if run.stopping or (run.requests and self.issued >= run.requests):
            return None
        return self._next_request()

    def _next_request(self):
        run = self.run
        set_steps, get_steps = run.ratio
        is_set = self.step % (set_steps + get_steps) < set_steps
        self.step += 1
        self.issued += 1
        if is_set:
            index = self._next_index()
            self.version += 1
            return "set", [index], (self.version, run.value_size(self.rng))
        if run.multiget == 1:
            return "get", [self._next_index()], None
        return "get", [self._next_index() for _ in range(run.multiget)], None

    def _next_index(self):
        run = self.run
        if run.key_pattern == "S":
            j = self.sequence % self.keys
            self.sequence += 1
        elif run.key_pattern == "G":
            span = run.key_maximum - run.key_minimum + 1
            x = self.rng.gauss(span / 2, span / 6)
            j = min(max(int(x) // run.clients_total, 0), self.keys - 1)
        else:
            j = int(self.rng.random() * self.keys)
        return run.key_minimum + self.number + j * run.clients_total

    def _send(self, kind, indexes, versions):
        """One request per server that owns some of the keys."""
        run = self.run
        if len(self.connections) == 1:
            groups = ((0, indexes),)
        else:
            owners = {}
            for index in indexes:
                owners.setdefault(run.continuum.index(run.key(index)), []).append(index)
            groups = owners.items()
        for server_index, group in groups:
            conn = self.connections[server_index]
            if conn is None or conn.closed:
                conn = self.connections[server_index] = Upstream(
                    run.loop, run.addresses[server_index], self.complete, self.fill,
                    run.timeout, run.timeout)
            data, expect = run.encode(kind, group, versions)
            conn.send(data, expect,
                      (kind, time.perf_counter(), group, versions, len(data), server_index))
            self.in_flight += 1


class BenchRun:
    """One timed run of the workload in this process (worker `worker` of `workers`)."""

    def __init__(self, options, worker=0, workers=1, progress=None):
        self.loop = EventLoop()
        self.continuum_hash, self.continuum_distribution = options["hash"], \
            options["distribution"]
        self.addresses = self.continuum = None
        self.clients_list = []
        self._use_servers(options["servers"])
        for name in ("clients", "pipeline", "ratio", "data_size", "data_size_range",
                     "key_minimum", "key_maximum", "key_pattern", "multiget", "requests",
                     "test_time", "protocol", "seed", "timeout", "prefill", "verify",
                     "verify_on"):
            setattr(self, name, options[name])
        self.verify = self.verify or bool(self.verify_on)
        self.prefix = options["key_prefix"].encode()
        if self.test_time:
            self.requests = 0
        self.clients_total = self.clients * workers
        self.progress = progress        # shared array slot for ops so far, or None
        self.worker = worker
        self.sets, self.gets = OpStats(), OpStats()
        self.errors = dict.fromkeys(BENCH_ERROR_KINDS, 0)
        self.written = {} if self.verify else None   # key index -> (version, size) last stored
        self.failed = {}                # key index -> "missing" or "wrong", by a verify read
        self.prefilled = 0
        self.recording = False
        self.stopping = False
        self.connect_error = None
        self.active = 0
        self.clients_list = [BenchClient(self, worker * self.clients + i)
                             for i in range(self.clients)]
        if progress is not None:
            self.loop.call_every(0.25, self._report_progress)

    def key(self, index):
        return b"%b%d" % (self.prefix, index)

    def value_size(self, rng):
        if self.data_size_range:
            return rng.randint(*self.data_size_range)
        return self.data_size

    def encode(self, kind, indexes, versions):
        """(request bytes, REPLY_* kind) for a set of one key or a get of keys."""
        meta = self.protocol == "meta"
        if kind == "get" and not meta and len(indexes) == 1:   # the usual request
            return b"get %b%d\r\n" % (self.prefix, indexes[0]), REPLY_VALUES
        keys = [self.key(i) for i in indexes]
        if kind == "set":
            value = make_value(keys[0], *versions)
            if meta:
                return b"ms %b %d\r\n%b\r\n" % (keys[0], len(value), value), REPLY_META
            return b"set %b 0 0 %d\r\n%b\r\n" % (keys[0], len(value), value), REPLY_LINE
        if not meta:
            return b"get " + b" ".join(keys) + CRLF, REPLY_VALUES
        if len(keys) == 1:
            return b"mg %b k v\r\n" % keys[0], REPLY_META
        return b"".join(b"mg %b k v q\r\n" % k for k in keys) + b"mn\r\n", REPLY_META_BATCH

    def run(self):
        """Prefill if asked, run the timed workload, verify if asked; returns a result dict."""
        if self.prefill:
            self._phase(lambda c: [("set", [i], (0, self.value_size(c.rng)))
                                   for i in self._own_keys(c)], pipeline=PREFILL_PIPELINE)
        self.recording = True
        started = time.perf_counter()
        if self.test_time:
            self.loop.call_later(self.test_time, self._stop)
        self._phase(None)
        elapsed = time.perf_counter() - started
        self.recording = False
        verified = None
        if self.verify:
            verified = self._verify()
        self._close_connections()
        self.loop.close()
        if self.connect_error:
            raise BackendUnavailable(self.connect_error)
        return {"seconds": elapsed, "sets": self.sets, "gets": self.gets,
                "errors": self.errors, "prefill": self.prefilled, "verify": verified}

    def check(self, indexes, hits):
        """Compare the values a verify read got with what was written last."""
        found = {hit[0]: hit[2] for hit in hits}
        for index in indexes:
            version, size = self.written[index]
            key = self.key(index)
            if key not in found:
                self.failed[index] = "missing"
            elif found[key] != make_value(key, version, size):
                self.failed[index] = "wrong"
            else:
                self.failed.pop(index, None)

    def _verify(self):
        """Read back every key written; from --verify-on servers (replicas) the
        keys missing or wrong are read again until they catch up, for up to
        `timeout` seconds. Returns the counts."""
        if self.verify_on:
            self._close_connections()
            self._use_servers(self.verify_on)
        keys, deadline = set(self.written), time.monotonic() + self.timeout
        while True:
            self._phase(lambda c: [("verify", chunk, None) for chunk in self._chunks(c, keys)],
                        pipeline=PREFILL_PIPELINE)
            keys = set(self.failed)
            if not (keys and self.verify_on) or time.monotonic() > deadline \
                    or self.connect_error:
                break
            time.sleep(VERIFY_RETRY_SECONDS)
        kinds = list(self.failed.values())
        return {"checked": len(self.written), "missing": kinds.count("missing"),
                "wrong": kinds.count("wrong")}

    def _use_servers(self, servers):
        self.addresses = [parse_address(s) for s in servers]
        self.continuum = Continuum([(server_name(h, p), 1) for h, p in self.addresses],
                                   self.continuum_hash, self.continuum_distribution)
        for client in self.clients_list:
            client.connections = [None] * len(self.addresses)

    def _close_connections(self):
        for client in self.clients_list:
            for conn in client.connections:
                if conn is not None:
                    conn.pending.clear()      # a phase that ended owes no replies
                    conn.close()

    def client_done(self):
        self.active -= 1
        if self.active <= 0:
            self.loop.stop()

    def _phase(self, make_queue, pipeline=None):
        saved = self.pipeline
        self.pipeline = pipeline or saved
        self.stopping = False
        self.active = len(self.clients_list)
        for client in self.clients_list:
            client.done = False
            client.start(None if make_queue is None else make_queue(client)[::-1])
        if self.active > 0:
            self.loop.run()
        self.pipeline = saved

    def _own_keys(self, client):
        return range(self.key_minimum + client.number, self.key_maximum + 1, self.clients_total)

    def _chunks(self, client, keys):
        owned = sorted(i for i in keys if (i - self.key_minimum) % self.clients_total
                       == client.number)
        return [owned[i:i + VERIFY_BATCH_KEYS] for i in range(0, len(owned), VERIFY_BATCH_KEYS)]

    def _stop(self):
        self.stopping = True
        for client in self.clients_list:
            client.fill()

    def _report_progress(self):
        self.progress(self.worker, self.sets.ops + self.gets.ops)


class ProgressLine:
    """`ops/s so far, elapsed` on one stderr line, only when stderr is a terminal."""

    def __init__(self, workers):
        self.enabled = sys.stderr.isatty()
        self.ops = [0] * workers
        self.started = time.monotonic()
        self.shown = 0.0

    def __call__(self, worker, ops):
        self.ops[worker] = ops
        elapsed = time.monotonic() - self.started
        if self.enabled and elapsed - self.shown >= 1.0:
            self.shown = elapsed
            sys.stderr.write(f"\r[{elapsed:5.0f} s] {sum(self.ops):>12,} ops "
                             f"{sum(self.ops) / elapsed:>12,.0f} ops/s ")
            sys.stderr.flush()

    def close(self):
        if self.enabled and self.shown:
            sys.stderr.write("\n")


def _bench_worker(options, worker, workers, results, progress):
    try:
        report = lambda w, ops: progress.__setitem__(w, ops)
        results.put(("ok", BenchRun(options, worker, workers, report).run()))
    except MemtoolError as err:
        results.put(("error", str(err)))


def run_workload(options):
    """Run the workload on options["processes"] processes; returns the summary dict.

    Raises BackendUnavailable when a server cannot be reached.
    """
    workers = options["processes"]
    progress = ProgressLine(workers)
    if workers == 1:
        results = [BenchRun(options, progress=progress).run()]
    else:
        context = multiprocessing.get_context()
        shared = context.Array("q", workers, lock=False)
        results_queue = context.Queue()
        processes = [context.Process(target=_bench_worker,
                                     args=(options, w, workers, results_queue, shared), daemon=True)
                     for w in range(workers)]
        for process in processes:
            process.start()
        results = []
        while len(results) < workers:
            try:
                status, result = results_queue.get(timeout=1.0)
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in processes):
                    raise MemtoolError("a bench process died; run with -v to see why")
                for w in range(workers):
                    progress(w, shared[w])
                continue
            if status == "error":
                raise BackendUnavailable(result)
            results.append(result)
        for process in processes:
            process.join()
    progress.close()
    return summarize(options, results)


def summarize(options, results):
    """Merge per-process results into the report dict (see format_report)."""
    seconds = max(r["seconds"] for r in results) or 1e-9
    sets, gets = OpStats(), OpStats()
    errors = dict.fromkeys(BENCH_ERROR_KINDS, 0)
    verify = None
    for r in results:
        sets.merge(r["sets"])
        gets.merge(r["gets"])
        for kind, n in r["errors"].items():
            errors[kind] += n
        if r["verify"] is not None:
            verify = verify or dict.fromkeys(r["verify"], 0)
            for name, n in r["verify"].items():
                verify[name] += n
    totals = OpStats().merge(sets).merge(gets)

    def figures(s):
        lat = s.latency
        return {"ops": s.ops, "ops_per_sec": s.ops / seconds, "hits": s.hits,
                "misses": s.misses, "hits_per_sec": s.hits / seconds,
                "misses_per_sec": s.misses / seconds, "kb_per_sec": s.bytes / 1024 / seconds,
                "latency_ms": {"avg": lat.mean / 1000, "p50": lat.percentile(50) / 1000,
                               "p90": lat.percentile(90) / 1000, "p99": lat.percentile(99) / 1000,
                               "p99.9": lat.percentile(99.9) / 1000, "max": lat.max / 1000}}

    return {"config": dict(options), "seconds": seconds, "sets": figures(sets),
            "gets": figures(gets), "totals": figures(totals), "errors": errors,
            "prefill": {"sets": sum(r["prefill"] for r in results)}, "verify": verify}


def _median_of(values):
    """Median of report dicts, leaf by leaf (numbers only; the rest from the first)."""
    first = values[0]
    if isinstance(first, dict):
        return {k: _median_of([v[k] for v in values]) for k in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return statistics.median(values)
    return first


def bench(**options):
    """Run `memtool.py bench` with options as BENCH_DEFAULTS names them; returns the report.

    servers: ["host:port", ...]; ratio: (sets, gets); data_size_range: (min,
    max) bytes or None; requests per client, or test_time seconds. With vs
    ("host:port") the workload runs against servers (A) and vs (B) alternately,
    `rounds` times each, and the report holds per-side medians and A/B ratios.
    Raises BackendUnavailable when a server cannot be reached.
    """
    options = dict(BENCH_DEFAULTS, **options)
    if not options["vs"]:
        return run_workload(options)
    sides = {"a": dict(options, vs=None), "b": dict(options, servers=[options["vs"]], vs=None)}
    rounds = []
    for number in range(options["rounds"]):
        for side, side_options in sides.items():
            report = run_workload(dict(side_options, prefill=options["prefill"] and number == 0))
            rounds.append(dict(report, side=side, round=number))
    result = {"config": dict(options), "rounds": rounds}
    for side in sides:
        result[side] = _median_of([r for r in rounds if r["side"] == side])
    def ratio(*path):
        x, y = result["a"], result["b"]
        for name in path:
            x, y = x[name], y[name]
        return x / max(y, 1e-9)
    result["ratio"] = {
        "ops_per_sec": ratio("totals", "ops_per_sec"),
        "sets_ops_per_sec": ratio("sets", "ops_per_sec"),
        "gets_ops_per_sec": ratio("gets", "ops_per_sec"),
        "p50_latency": ratio("totals", "latency_ms", "p50"),
        "p99_latency": ratio("totals", "latency_ms", "p99")}
    return result


def format_report(report):
    """The memtier-style table(s) of a bench() report, as text."""
    if "ratio" in report:
        config = report["config"]
        lines = [format_report(dict(report["a"], title="A: " + " ".join(config["servers"]))),
                 format_report(dict(report["b"], title="B: " + config["vs"])),
                 "ratio A/B (medians of %d rounds): ops/s %.2f, sets/s %.2f, gets/s %.2f, "
                 "p50 latency %.2f, p99 latency %.2f" % (
                     config["rounds"], *(report["ratio"][k] for k in (
                         "ops_per_sec", "sets_ops_per_sec", "gets_ops_per_sec",
                         "p50_latency", "p99_latency")))]
        return "\n\n".join(lines)
    config = report["config"]
    title = report.get("title") or " ".join(config["servers"])
    header = ("%-8s %12s %12s %12s %15s %15s %15s %15s %12s" % (
        "Type", "Ops/sec", "Hits/sec", "Misses/sec", "Avg. Latency", "p50 Latency",
        "p99 Latency", "p99.9 Latency", "KB/sec"))
    lines = [f"{title}: {report['seconds']:.1f} s, {config['processes']} process(es) x "
             f"{config['clients']} clients, pipeline {config['pipeline']}, "
             f"ratio {config['ratio'][0]}:{config['ratio'][1]}, latencies in ms",
             header, "-" * len(header)]
    for name in ("sets", "gets", "totals"):
        f = report[name]
        lat = f["latency_ms"]
        hits = "---" if name == "sets" else "%.2f" % f["hits_per_sec"]
        misses = "---" if name == "sets" else "%.2f" % f["misses_per_sec"]
        lines.append("%-8s %12.2f %12s %12s %15.5f %15.5f %15.5f %15.5f %12.2f" % (
            name.capitalize(), f["ops_per_sec"], hits, misses, lat["avg"], lat["p50"],
            lat["p99"], lat["p99.9"], f["kb_per_sec"]))
    errors = ", ".join(f"{k} {v}" for k, v in report["errors"].items() if v)
    lines.append("errors: " + (errors or "none"))
    if report["verify"] is not None:
        v = report["verify"]
        lines.append(f"verify: {v['checked']} keys checked, {v['missing']} missing, "
                     f"{v['wrong']} wrong")
    return "\n".join(lines)


# ===== 12. CLI ===============================================================

def _size_arg(text):
    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (bytes, or with k/m/g)")


def _ulog_limit_arg(text):
    try:
        size = parse_size(text)
    except ValueError:
        size = 0
    if size < ULOG_LIMIT_MIN:
        raise argparse.ArgumentTypeError(
            f"not a size of at least {ULOG_LIMIT_MIN >> 10}k (the smallest): {text!r}")
    return size


def _item_size_arg(text):
    size = _size_arg(text)
    if not 1024 <= size <= 1 << 30:
        raise argparse.ArgumentTypeError("item size must be between 1k and 1024m")
    return size


def _int_arg(low, high):
    def convert(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}")
        return value
    return convert


def _address_arg(text):
    try:
        parse_address(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err))
    return text


def _ratio_arg(text):
    sets, sep, gets = text.partition(":")
    if not (sep and sets.isdigit() and gets.isdigit()) or int(sets) + int(gets) == 0:
        raise argparse.ArgumentTypeError(f"not SET:GET with at least one nonzero: {text!r}")
    return int(sets), int(gets)


def _range_arg(text):
    low, sep, high = text.partition("-")
    if not (sep and low.isdigit() and high.isdigit()) or not 0 < int(low) <= int(high):
        raise argparse.ArgumentTypeError(f"not MIN-MAX with 0 < MIN <= MAX: {text!r}")
    return int(low), int(high)


def build_parser():
    """The argparse parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="memtool.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"memtool {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0,
                        help="log to stderr (-vv for debug)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve_parser = commands.add_parser(
        "serve", parents=[common], help="run the key-value server",
        description="Serve the memcached protocol from a store that survives restarts.")
    add = serve_parser.add_argument
    add("-p", "--port", type=_int_arg(0, 65535), default=DEFAULT_PORT,
        help="TCP port (default %(default)s)")
    add("-l", "--listen", default=DEFAULT_HOST, metavar="ADDR",
        help="interface to listen on (default %(default)s)")
    add("--data", default=DEFAULT_DATA_DIR, metavar="DIR",
        help="data directory, created if missing (default %(default)s)")
    add("--engine", choices=ENGINES, default="sqlite",
        help="store: sqlite (default), gnu/ndbm/dumb (dbm modules), memory (no persistence)")
    add("-I", "--max-item-size", type=_item_size_arg, default=ITEM_SIZE_MAX_DEFAULT,
        metavar="SIZE", help="largest item, with k/m suffix (default 1m)")
    add("-c", "--max-conns", type=_int_arg(1, 1 << 20), default=MAX_CONNS_DEFAULT,
        metavar="N", help="most simultaneous clients (default %(default)s)")
    add("-m", "--memory-limit", type=_int_arg(1, 1 << 30), metavar="MB",
        help=f"memory engine: item memory, evicted least recently used first (default "
             f"{MEMORY_LIMIT_MB_DEFAULT}); disk engines: the read cache in front of the store "
             f"(default {READ_CACHE_MB_DEFAULT})")
    add("--sync", choices=SYNC_MODES, default="everysec",
        help="when the update log is fsynced (default %(default)s)")
    add("--ulog-limit", type=_ulog_limit_arg, default=ULOG_LIMIT_DEFAULT, metavar="SIZE",
        help="start a new update-log file at this size (default 64m, at least 64k)")
    add("--ulog-keep", type=_int_arg(0, 1 << 20), default=ULOG_KEEP_DEFAULT, metavar="N",
        help="rotated update-log files to keep (default %(default)s)")
    add("--sid", type=_int_arg(1, UINT32_MASK), default=1,
        help="this server's id, in the stamp of every change; servers that replicate "
             "each other need distinct ones (default %(default)s)")
    add("--peer", action="append", default=[], type=_address_arg, metavar="HOST:PORT",
        help="replicate from this memtool (its log, after a full copy when needed); "
             "repeatable; two servers that --peer each other are a dual master")
    add("--tombstone-ttl", type=_int_arg(0, 1 << 31), default=TOMBSTONE_TTL_DEFAULT,
        metavar="SECONDS", help="how long a delete is remembered, so that an older write "
                                "from a peer cannot bring the item back (default "
                                "%(default)s; 0: not at all)")
    add("--ulog-retain", type=_size_arg, default=ULOG_RETAIN_DEFAULT, metavar="SIZE",
        help="update-log files a connected replica still needs are kept past --ulog-keep "
             "up to this size (default 1g)")
    add("--repl-backlog", type=_size_arg, default=REPL_BACKLOG_DEFAULT, metavar="SIZE",
        help="--engine memory: the newest changes kept for replicas (default 64m); one "
             "that falls further behind gets a full copy")
    add("-R", "--reqs-per-event", type=_int_arg(1, 1 << 20), default=REQS_PER_EVENT_DEFAULT,
        metavar="N", help="requests a client gets per loop pass before the others have "
                          "their turn (memcached -R; default %(default)s)")
    add("--enable-shutdown", action="store_true",
        help="allow the `shutdown` command (memcached -A)")
    add("--no-http", dest="http", action="store_false",
        help="do not answer HTTP on the port (close such connections, as memcached does)")
    add("--http-allow-origin", action="append", default=[], metavar="ORIGIN",
        help="a web origin (e.g. https://app.example) whose pages may send requests; "
             "repeatable; by default a request with an Origin header gets 403")
    add("--http-host", action="append", default=[], metavar="NAME",
        help="a Host name HTTP requests may use besides the listen address and localhost "
             "(checked when listening on loopback, or once this is given); repeatable")
    add("--pid", metavar="FILE", help="write the process id to FILE")
    serve_parser.set_defaults(func=_cmd_serve)

    check_parser = commands.add_parser(
        "check", parents=[common], help="verify (and repair) a data directory",
        description="Verify the store and every update-log file of a data directory (the "
                    "server must be stopped) and print what they hold. Exit status 0 only "
                    "when all is well.")
    add = check_parser.add_argument
    add("--data", default=DEFAULT_DATA_DIR, metavar="DIR",
        help="data directory (default %(default)s)")
    add("--fix", action="store_true",
        help="repair: keep every good log record around damage, rebuild an unreadable "
             "store from the log; what is replaced is moved to DIR/aside/, never deleted")
    add("--convert", choices=[e for e in ENGINES if e != "memory"], metavar="ENGINE",
        help="copy the data into a store of ENGINE and use that from now on")
    check_parser.set_defaults(func=_cmd_check)

    proxy_parser = commands.add_parser(
        "proxy", parents=[common], help="a twemproxy-compatible sharding proxy",
        description="Shard keys over memcached-compatible servers as twemproxy (nutcracker) "
                    "does, from an unmodified nutcracker.yml (-c) or from flags; backups "
                    "and warm-up keep a server that returns from serving misses or stale "
                    "values.")
    add = proxy_parser.add_argument
    add("-c", "--conf-file", metavar="FILE", help="a nutcracker.yml (pools, servers, ...)")
    add("-t", "--test-conf", action="store_true",
        help="check the configuration and exit 0 (ok) or 1, as nutcracker -t")
    add("-l", "--listen", default=f"{DEFAULT_HOST}:22121", metavar="HOST:PORT",
        help="without -c: where the pool listens (default %(default)s)")
    add("-s", "--server", dest="servers", action="append", default=[], metavar="HOST:PORT[:W]",
        help="without -c: a server of the pool, with its weight (default 1); repeatable")
    add("--backup", dest="backups", action="append", default=[], metavar="HOST:PORT[:W]",
        help="without -c: a backup server (every write goes to the key's backup too); "
             "repeatable")
    add("--hash", choices=list(HASHES), help="key hash (default fnv1a_64)")
    add("--hash-tag", metavar="XY", help="hash only the part of a key between X and Y")
    add("--distribution", choices=DISTRIBUTIONS, help="ketama (default), modula or random")
    add("--timeout", type=_int_arg(1, 1 << 31), metavar="MS",
        help="a request without a reply after this long fails (default none)")
    add("--auto-eject-hosts", action="store_true", default=None,
        help="take a failing server out of the ring (default off)")
    add("--server-retry-timeout", type=_int_arg(1, 1 << 31), metavar="MS",
        help="how long an ejected server stays out before it is probed (default 30000)")
    add("--server-failure-limit", type=_int_arg(1, 1 << 31), metavar="N",
        help="consecutive failures that eject a server (default 2)")
    add("--server-connections", type=_int_arg(1, 1 << 16), metavar="N",
        help="connections to each server, pipelined (default 1)")
    add("--warmup", type=float, metavar="SECONDS",
        help="with backups: for this long after a server returns, a miss is asked of the "
             "backup and copied in (default 0)")
    add("--dirty-limit", type=_int_arg(1, 1 << 40), default=DIRTY_LIMIT_DEFAULT, metavar="N",
        help="keys remembered per server while it is out; past it, it is flushed when it "
             "returns (default %(default)s)")
    add("-I", "--max-item-size", type=_item_size_arg, default=ITEM_SIZE_MAX_DEFAULT,
        metavar="SIZE", help="largest item routed, with k/m suffix (default 1m)")
    add("-R", "--reqs-per-event", type=_int_arg(1, 1 << 20), default=REQS_PER_EVENT_DEFAULT,
        metavar="N", help="requests a client gets per loop pass (default %(default)s)")
    add("--no-http", dest="http", action="store_false", help="do not answer HTTP")
    add("--http-allow-origin", action="append", default=[], metavar="ORIGIN",
        help="a web origin whose pages may send requests (repeatable)")
    add("--http-host", action="append", default=[], metavar="NAME",
        help="a Host name allowed besides the listen address and localhost (repeatable)")
    add("--explain", metavar="KEY",
        help="print where KEY goes (pool, hash, ring point, server, backup) and exit")
    add("--diff", nargs=2, metavar=("OLD.yml", "NEW.yml"),
        help="print which fraction of keys move between two configurations, and exit")
    add("--keys", type=_int_arg(1, 1 << 30), default=100000,
        help="sample keys for --diff (default %(default)s)")
    add("--pid", metavar="FILE", help="write the process id to FILE")
    proxy_parser.set_defaults(func=_cmd_proxy)

    repl_parser = commands.add_parser(
        "replicate", parents=[common], help="copy one server's changes to another, or "
                                            "compare two",
        description="Pull a memtool's update log (a full copy first when needed) and apply "
                    "it to another server: a memtool keeps the stamps, as `serve --peer` "
                    "does; any other memcached gets set/delete/touch/flush_all with the "
                    "remaining TTL. Or, with --check, compare two memtools by digests.")
    add = repl_parser.add_argument
    add("--from", dest="source", type=_address_arg, metavar="HOST:PORT",
        help="the memtool whose changes are copied")
    add("--to", dest="target", type=_address_arg, metavar="HOST:PORT",
        help="the memtool or memcached they are applied to")
    add("--rts", metavar="FILE",
        help="where the position reached is kept, so that a restart resumes there "
             "(default: none, every start copies everything)")
    add("--check", nargs=2, type=_address_arg, metavar=("A", "B"),
        help="compare two memtools; list the keys that differ with both stamps; exit 0 "
             "when they are identical, 1 when not")
    add("--repair", action="store_true",
        help="with --check: send each differing key's winning version (the later stamp) "
             "to the other side")
    repl_parser.set_defaults(func=_cmd_replicate)

    bench_parser = commands.add_parser(
        "bench", parents=[common], help="load-test any memcached-compatible server",
        description="Drive memcached-compatible servers with a set/get workload and report "
                    "throughput and latency (memtier_benchmark's option names).")
    add = bench_parser.add_argument
    add("-s", "--server", dest="servers", action="append", type=_address_arg, required=True,
        metavar="HOST:PORT", help="server to load (required); repeat for a pool, keys "
                                  "spread by the ring as a client pool spreads them")
    add("-c", "--clients", type=_int_arg(1, 100000), default=50,
        help="connections per process (default %(default)s)")
    add("--pipeline", type=_int_arg(1, 100000), default=1,
        help="requests in flight per client (default %(default)s)")
    add("--ratio", type=_ratio_arg, default=(1, 10), metavar="SET:GET",
        help="sets to gets (default 1:10)")
    add("-d", "--data-size", type=_int_arg(1, 1 << 30), default=32, metavar="BYTES",
        help="value size (default %(default)s)")
    add("--data-size-range", type=_range_arg, metavar="MIN-MAX",
        help="value sizes drawn uniformly from MIN..MAX bytes (default: all -d)")
    add("--key-prefix", default="memtier-", help="key prefix (default %(default)s)")
    add("--key-minimum", type=_int_arg(0, 1 << 62), default=0, metavar="N",
        help="smallest key number (default %(default)s)")
    add("--key-maximum", type=_int_arg(0, 1 << 62), default=10000000, metavar="N",
        help="largest key number (default %(default)s)")
    add("--key-pattern", choices=("R", "S", "G"), default="R",
        help="R random, S sequential, G gaussian (default R)")
    add("--multiget", type=_int_arg(1, 10000), default=1, metavar="N",
        help="keys per get (default %(default)s)")
    add("-n", "--requests", type=_int_arg(1, 1 << 62), default=10000,
        help="requests per client (default %(default)s)")
    add("--test-time", type=_int_arg(1, 1 << 30), metavar="SECONDS",
        help="run this long instead of a request count (default: use -n)")
    add("--protocol", choices=("text", "meta"), default="text",
        help="text: set/get; meta: ms/mg (default %(default)s)")
    add("--seed", type=int, help="random seed, for repeatable key sequences (default: random)")
    add("--processes", type=_int_arg(1, 1024), default=1,
        help="load-generating processes, each with --clients connections (default 1)")
    add("--hash", choices=sorted(HASHES), default="fnv1a_64",
        help="key hash for several servers (twemproxy's names; default fnv1a_64)")
    add("--distribution", choices=DISTRIBUTIONS, default="ketama",
        help="how keys map to several servers (default %(default)s)")
    add("--timeout", type=float, default=5.0, metavar="SECONDS",
        help="a request without a reply after this long is an error (default 5)")
    add("--prefill", action="store_true",
        help="store every key once before timing (default off)")
    add("--verify", action="store_true",
        help="afterwards, read back every key written and compare the values (default off)")
    add("--verify-on", action="append", default=[], type=_address_arg, metavar="HOST:PORT",
        help="verify by reading from this server instead (a replica; repeat for a pool): "
             "what it lacks is read again until it catches up, up to --timeout")
    add("--vs", type=_address_arg, metavar="HOST:PORT",
        help="also run against this server, alternately, and report the A/B ratios")
    add("--rounds", type=_int_arg(1, 1000), default=3,
        help="rounds per side with --vs (default %(default)s)")
    add("--json", metavar="FILE", help="also write every figure and the configuration as "
                                       "JSON to FILE (checked before the run)")
    bench_parser.set_defaults(func=_cmd_bench)
    return parser


@contextlib.contextmanager
def pid_file(path):
    """Our pid in `path` (None: no file) while the block runs."""
    if path:
        with open(path, "w") as f:
            f.write(f"{os.getpid()}\n")
    try:
        yield
    finally:
        if path:
            os.remove(path)


def _cmd_serve(args):
    with pid_file(args.pid):
        server = serve(args.listen, args.port, args.data, args.engine, args.max_item_size,
                       args.max_conns, args.memory_limit, args.sync, args.ulog_limit,
                       args.ulog_keep, args.sid, args.enable_shutdown, args.reqs_per_event,
                       args.http, args.http_allow_origin, args.http_host,
                       args.tombstone_ttl, args.ulog_retain, args.repl_backlog)
        start_peers(server, args.peer)
        records, items, seconds = server.recovered
        host, port = server.address
        where = "nothing kept" if args.engine == "memory" else f"data in {args.data}"
        print(f"memtool {__version__}: serving on {host}:{port}, {where} ({args.engine} "
              f"engine), {items} items, {records} log records replayed in {seconds:.2f} s",
              flush=True)
        server.run()
    return 0


def _proxy_configs(args):
    if args.conf_file:
        with open(args.conf_file) as f:
            return load_pools(f.read(), args.conf_file)
    if not args.servers:
        raise ConfigError("give -c FILE, or -s HOST:PORT (repeatable)")
    listen = args.listen if ":" in args.listen else f"{DEFAULT_HOST}:{args.listen}"
    try:
        parse_address(listen)
    except ValueError as err:
        raise ConfigError(f"-l: {err}") from None
    return [flag_pool(listen, args.servers, args.backups, hash=args.hash,
                      hash_tag=args.hash_tag, distribution=args.distribution,
                      timeout=args.timeout, auto_eject_hosts=args.auto_eject_hosts,
                      server_retry_timeout=args.server_retry_timeout,
                      server_failure_limit=args.server_failure_limit,
                      server_connections=args.server_connections, warmup=args.warmup)]


def _cmd_proxy(args):
    if args.diff:
        old, new = [load_pools(open(path).read(), path) for path in args.diff]
        print("\n".join(placement_diff(old, new, args.keys)))
        return 0
    try:
        configs = _proxy_configs(args)
    except ConfigError as err:
        if args.test_conf:
            print(f"memtool: {err}\nmemtool: configuration file '{args.conf_file}' syntax "
                  f"is invalid", file=sys.stderr)
            return 1
        raise
    if args.test_conf:
        print(f"memtool: configuration file '{args.conf_file}' syntax is ok")
        return 0
    if args.explain is not None:
        print("\n".join(explain_key(configs, args.explain.encode())))
        return 0
    with pid_file(args.pid):
        proxy = Proxy(configs, args.conf_file, args.max_item_size, args.dirty_limit,
                      args.reqs_per_event, args.http, args.http_allow_origin, args.http_host)
        for pool in proxy.pools.values():
            host, port = pool.listener.address
            print(f"memtool {__version__}: proxy pool {pool.name} on {host}:{port}, "
                  f"{len(pool.servers)} servers, {len(pool.backups)} backups, hash "
                  f"{pool.config['hash']}, {pool.config['distribution']}", flush=True)
        proxy.run()
    return 0


def _cmd_replicate(args):
    if args.check:
        return 1 if check_pair(*args.check, repair=args.repair) else 0
    if not (args.source and args.target):
        raise ConfigError("replicate needs --from and --to (or --check A B)")
    loop = EventLoop()
    ReplicateAgent(loop, parse_address(args.source), parse_address(args.target), args.rts)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, loop.stop)
    print(f"memtool {__version__}: replicating {args.source} -> {args.target}"
          + (f", rts in {args.rts}" if args.rts else ""), flush=True)
    try:
        loop.run()
    finally:
        loop.close()
    return 0


def _cmd_check(args):
    checker = DataCheck(args.data, args.fix)
    if args.convert:
        checker.convert(args.convert)
        return 0
    return 0 if checker.run() else 1


def _cmd_bench(args):
    options = {name: getattr(args, name) for name in BENCH_DEFAULTS}
    span = args.key_maximum - args.key_minimum + 1
    if span < args.clients * args.processes:
        raise ConfigError(f"the key range ({span} keys) is smaller than the number of "
                          f"clients ({args.clients * args.processes})")
    json_file = open(args.json, "w") if args.json else None   # fails before the run
    with json_file or contextlib.nullcontext():
        report = bench(**options)
        print(format_report(report))
        if json_file:
            json.dump(report, json_file, indent=1)
    return 0


def main(argv=None):
    """Run the command line; returns the exit code (0 ok, 1 runtime error, 2 usage)."""
    args = build_parser().parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s memtool[%(process)d] %(levelname)s %(message)s")
    try:
        return args.func(args)
    except (MemtoolError, OSError) as err:
        if args.verbose > 1:
            raise
        print(f"memtool: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
