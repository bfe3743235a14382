"""The transcripts in examples/ and the README are true: replay them against a fresh server."""
import re
import shlex
import shutil
import subprocess

import pytest

from support import MEMCACHED_BIN, REPO, MemcachedServer, MemtoolServer

TELNET_TRANSCRIPTS = ("basic.txt", "meta.txt")
README = (REPO / "README.md").read_text()


def transcript_lines(name):
    """The lines of examples/<name> without its comment header."""
    return [line for line in (REPO / "examples" / name).read_text().splitlines()
            if not line.startswith("# ")]


def transcript(name):
    """(bytes to send, exact reply) of a telnet transcript in examples/."""
    sent, replies = [], []
    for line in transcript_lines(name):
        if line.startswith("> "):
            sent.append(line[2:].encode() + b"\r\n")
        else:
            replies.append(line.encode() + b"\r\n")
    return b"".join(sent), b"".join(replies)


def readme_blocks(first_line):
    """The README's indented blocks that start with `first_line`, as lists of lines."""
    pattern = r"\n    %s\n((?:    .*\n|\n)+)" % re.escape(first_line)
    return [[line[4:] for line in block.rstrip("\n").split("\n")]
            for block in re.findall(pattern, README)]


@pytest.mark.parametrize("name", TELNET_TRANSCRIPTS)
@pytest.mark.parametrize("target", ["memtool", "memcached"])
def test_telnet_transcript_replays_exactly(name, target, tmp_path):
    if target == "memcached":
        if not MEMCACHED_BIN:
            pytest.skip("memcached binary not installed (apt-get install memcached)")
        server = MemcachedServer(tmp_path)
    else:
        server = MemtoolServer(tmp_path)
    send, expected = transcript(name)
    with server as srv:
        srv.start()
        with srv.session() as s:
            s.send(send)
            s.expect(expected)
            s.expect_closed()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_http_transcript_runs_exactly(tmp_path):
    """Each `$ curl ...` of examples/http.txt prints exactly the lines under it."""
    steps = []
    for line in transcript_lines("http.txt"):
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line)
    with MemtoolServer(tmp_path) as srv:
        srv.start()
        for command, output in steps:
            argv = [arg.replace("127.0.0.1:11211", "127.0.0.1:%d" % srv.port)
                    for arg in shlex.split(command)]
            done = subprocess.run(argv, capture_output=True, timeout=10, check=True)
            printed = done.stdout.decode().replace("\r\n", "\n").rstrip("\n")
            assert printed.split("\n") == output, command


@pytest.mark.parametrize("name", TELNET_TRANSCRIPTS)
def test_readme_shows_the_same_telnet_session(name):
    lines = [line[2:] if line.startswith("> ") else line for line in transcript_lines(name)]
    assert lines in readme_blocks("$ telnet 127.0.0.1 11211")


def test_readme_shows_the_same_curl_session():
    lines = transcript_lines("http.txt")
    assert [lines[1:]] == [block for block in readme_blocks(lines[0])]
