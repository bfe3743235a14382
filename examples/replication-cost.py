#!/usr/bin/env python3
"""What replication costs on this machine: a full copy to a new replica, the
replica's lag under a write load on its source, and the source's write
throughput with the replica attached as a multiple of it alone.

    examples/replication-cost.py [--keys 1000000] [--seconds 10] [--size 100]

A source (default engine) is filled with `keys` items of `size` bytes; then a
replica (`serve --peer`) starts empty and gets a full copy; then sets run on
the source for `seconds` at pipeline 1 and 16 (`memtool.py bench`, 50
connections) with the replica attached and again with it stopped; at the end
`replicate --check` compares the two. Everything listens on 127.0.0.1 and
stops when the script ends.
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEMTOOL = os.path.join(ROOT, "memtool.py")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stats(port, group=""):
    """`stats [group]` as a dict."""
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.sendall(f"stats {group}\r\n".encode())
        buf = b""
        while not buf.endswith(b"END\r\n"):
            buf += s.recv(65536)
    return {f[1].decode(): f[2].decode() for f in (line.split(b" ", 2)
            for line in buf.split(b"\r\n")) if len(f) == 3}


def start(*args):
    port = free_port()
    proc = subprocess.Popen([sys.executable, MEMTOOL, "serve", "-p", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            stats(port)
            return proc, port
        except OSError:
            time.sleep(0.1)
    raise SystemExit("memtool did not start")


def rss_mb(proc):
    with open(f"/proc/{proc.pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) // 1024


def sets(port, args, pipeline, fill=False):
    """A `memtool.py bench` run of sets on port, started: (process, its JSON report's path)."""
    out = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
    argv = [sys.executable, MEMTOOL, "bench", "-s", f"127.0.0.1:{port}", "-c", "25",
            "--processes", "2", "-d", str(args.size), "--key-maximum", str(args.keys),
            "--ratio", "1:0", "--pipeline", str(pipeline), "--json", out]
    argv += ["--prefill", "--requests", "1"] if fill else ["--test-time", str(args.seconds)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL), out


def sets_per_second(run):
    """Wait for a sets() run; its sets/s."""
    proc, out = run
    proc.wait()
    with open(out) as f:
        report = json.load(f)
    os.remove(out)
    return report["sets"]["ops_per_sec"]


def link(replica_port, source_port):
    st = stats(replica_port, "repl")
    prefix = f"repl:127.0.0.1:{source_port}:"
    return {name[len(prefix):]: value for name, value in st.items() if name.startswith(prefix)}


def caught_up(replica_port, source_port):
    st = link(replica_port, source_port)
    return st.get("state") == "streaming" and st.get("bytes_behind") == "0"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1000000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--size", type=int, default=100)
    args = parser.parse_args()
    data = tempfile.mkdtemp()
    procs = []
    try:
        source, sport = start("--data", os.path.join(data, "a"), "--sid", "1")
        procs.append(source)
        t = time.monotonic()
        sets_per_second(sets(sport, args, 16, fill=True))
        print(f"source filled: {args.keys} items of {args.size} B in "
              f"{time.monotonic() - t:.1f} s, RSS {rss_mb(source)} MB")

        t = time.monotonic()
        replica, rport = start("--data", os.path.join(data, "b"), "--sid", "2",
                               "--peer", f"127.0.0.1:{sport}")
        procs.append(replica)
        peak = [0, 0]
        while not caught_up(rport, sport):
            peak = [max(peak[0], rss_mb(source)), max(peak[1], rss_mb(replica))]
            time.sleep(0.2)
        took = time.monotonic() - t
        print(f"full copy to an empty replica: {took:.1f} s ({args.keys / took:,.0f} items/s), "
              f"peak RSS source {peak[0]} MB, replica {peak[1]} MB, replica curr_items "
              f"{stats(rport)['curr_items']}")

        attached = {}
        for pipeline in (1, 16):
            applied = int(link(rport, sport)["applied"])
            t = time.monotonic()
            load, lag = sets(sport, args, pipeline), []
            while load[0].poll() is None:
                lag.append(int(link(rport, sport)["lag_records"]))
                time.sleep(0.5)
            attached[pipeline] = sets_per_second(load)
            loaded = time.monotonic() - t
            while not caught_up(rport, sport):
                time.sleep(0.1)
            done = time.monotonic() - t
            applied = int(link(rport, sport)["applied"]) - applied
            print(f"p{pipeline} sets on the source, replica attached: {attached[pipeline]:,.0f}"
                  f" sets/s; the replica applied {applied / done:,.0f}/s, lag_records max "
                  f"{max(lag, default=0)}, caught up {done - loaded:.1f} s after the load")

        replica.terminate()
        replica.wait()
        for pipeline in (1, 16):
            alone = sets_per_second(sets(sport, args, pipeline))
            print(f"p{pipeline} sets on the source alone: {alone:,.0f} sets/s; with the "
                  f"replica attached {attached[pipeline] / alone:.2f}x")

        replica, rport = start("--data", os.path.join(data, "b"), "--sid", "2",
                               "--peer", f"127.0.0.1:{sport}")
        procs.append(replica)
        t = time.monotonic()
        while not caught_up(rport, sport):
            time.sleep(0.1)
        print(f"replica restarted: caught up in {time.monotonic() - t:.1f} s from its rts")
        check = subprocess.run([sys.executable, MEMTOOL, "replicate", "--check",
                                f"127.0.0.1:{sport}", f"127.0.0.1:{rport}"],
                               capture_output=True, text=True)
        print(f"replicate --check: {check.stdout.strip().splitlines()[-1]} "
              f"(exit {check.returncode})")
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
