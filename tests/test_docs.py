"""The transcripts in examples/ and the README are true: replay them against a fresh server."""
import re

from support import REPO, MemtoolServer


def transcript(path):
    """(bytes to send, exact reply) of an examples/*.txt transcript."""
    sent, replies = [], []
    for line in path.read_text().splitlines():
        if line.startswith("# ") or not line:
            continue
        if line.startswith("> "):
            sent.append(line[2:].encode() + b"\r\n")
        else:
            replies.append(line.encode() + b"\r\n")
    return b"".join(sent), b"".join(replies)


def test_basic_transcript_replays_exactly(tmp_path):
    send, expected = transcript(REPO / "examples" / "basic.txt")
    with MemtoolServer(tmp_path) as srv:
        srv.start()
        with srv.session() as s:
            s.send(send)
            s.expect(expected)
            s.expect_closed()


def test_readme_shows_the_same_session():
    lines = [l[2:] if l.startswith("> ") else l
             for l in (REPO / "examples" / "basic.txt").read_text().splitlines()
             if l and not l.startswith("# ")]
    readme = (REPO / "README.md").read_text()
    block = re.search(r"\$ telnet 127.0.0.1 11211\n((?:    .*\n)+)", readme).group(1)
    assert [l.strip() for l in block.splitlines()] == lines
