#!/usr/bin/env python3
"""What persistence costs on this machine: memcached (-t 1), memtool's default
engine and memtool's memory engine, side by side, as multiples of memcached.

    examples/persistence-cost.py [--rounds 3] [--seconds 5] [--keys 100000]
                                 [--serve-option=--sync=always ...]

Each workload (50 connections, 1 set per 10 gets, every key stored first) runs
against the three servers in rotation, `rounds` times; the table gives the
median throughput and p99 latency of each as a ratio to memcached's. The load
comes from memtier_benchmark when it is on PATH (or MEMTIER=path), pinned to
core 0 with the servers on core 1 when taskset exists; otherwise from
`memtool.py bench` with two processes, which drives a fast server less hard.
Everything listens on 127.0.0.1 and stops when the script ends.
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEMTOOL = os.path.join(ROOT, "memtool.py")
WORKLOADS = [(32, 1), (32, 16), (1024, 1), (1024, 16)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(core, argv):
    return (["taskset", "-c", str(core)] if shutil.which("taskset") else []) + argv


def start(argv):
    port = free_port()
    proc = subprocess.Popen(pinned(1, [a.replace("{port}", str(port)) for a in argv]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{argv[0]} did not start")


def memtier(memtier_bin, port, size, pipeline, seconds, keys, fill=False):
    """(ops/s, p99 ms) of one memtier_benchmark run."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        argv = [memtier_bin, "-s", "127.0.0.1", "-p", str(port), "-P", "memcache_text",
                "-t", "1", "-c", "50", "-d", str(size), f"--key-maximum={keys}",
                "--hide-histogram", f"--json-out-file={out.name}"]
        argv += (["--ratio=1:0", "--key-pattern=P:P", "-n", "allkeys"] if fill else
                 ["--ratio=1:10", f"--pipeline={pipeline}", f"--test-time={seconds}"])
        subprocess.run(pinned(0, argv), check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        totals = json.load(open(out.name))["ALL STATS"]["Totals"]
        return totals["Ops/sec"], totals["Percentile Latencies"]["p99.00"]


def bench(port, size, pipeline, seconds, keys, fill=False):
    """(ops/s, p99 ms) of one memtool.py bench run."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        argv = [sys.executable, MEMTOOL, "bench", "-s", f"127.0.0.1:{port}", "-c", "25",
                "--processes", "2", "-d", str(size), "--key-maximum", str(keys),
                "--json", out.name]
        argv += (["--prefill", "--requests", "1"] if fill else
                 ["--ratio", "1:10", "--pipeline", str(pipeline), "--test-time", str(seconds)])
        subprocess.run(pinned(0, argv), check=True, stdout=subprocess.DEVNULL)
        totals = json.load(open(out.name))["totals"]
        return totals["ops_per_sec"], totals["latency_ms"]["p99"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--keys", type=int, default=100000)
    parser.add_argument("--serve-option", action="append", default=[],
                        help="an extra option for the default-engine server")
    args = parser.parse_args()
    if not shutil.which("memcached"):
        raise SystemExit("needs memcached (apt-get install memcached)")
    memtier_bin = os.environ.get("MEMTIER") or shutil.which("memtier_benchmark")
    run = (lambda *a, **k: memtier(memtier_bin, *a, **k)) if memtier_bin else bench
    data = tempfile.mkdtemp()
    servers = {
        "memcached": ["memcached", "-u", os.environ.get("USER", "root"), "-l", "127.0.0.1",
                      "-p", "{port}", "-t", "1", "-m", "1024", "-U", "0"],
        "default": [sys.executable, MEMTOOL, "serve", "-p", "{port}", "--data", data,
                    *args.serve_option],
        "memory": [sys.executable, MEMTOOL, "serve", "-p", "{port}", "--engine", "memory",
                   "-m", "1024"]}
    started = {name: start(argv) for name, argv in servers.items()}
    results = {}
    try:
        for size, pipeline in WORKLOADS:
            for name, (proc, port) in started.items():
                run(port, size, pipeline, args.seconds, args.keys, fill=True)
            for round_ in range(args.rounds):
                names = list(started)
                for name in names[round_ % 3:] + names[:round_ % 3]:
                    results.setdefault((size, pipeline, name), []).append(
                        run(started[name][1], size, pipeline, args.seconds, args.keys))
    finally:
        for proc, port in started.values():
            proc.terminate()
        shutil.rmtree(data, ignore_errors=True)
    print(f"load: {'memtier_benchmark' if memtier_bin else 'memtool.py bench'}, 50 "
          f"connections, 1:10 set:get, {args.keys} keys, medians of {args.rounds} rounds")
    header = "".join(f"{f'{s} B, p{p}':>14}" for s, p in WORKLOADS)
    print(f"{'as multiples of memcached -t 1':<34}{header}")
    median = {key: (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
              for key, runs in results.items()}
    for name, label in (("default", "memtool default engine"), ("memory", "memtool --engine memory")):
        print(f"{label + ': throughput':<34}" + "".join(
            f"{median[(s, p, name)][0] / median[(s, p, 'memcached')][0]:>14.2f}"
            for s, p in WORKLOADS))
        print(f"{label + ': p99 latency':<34}" + "".join(
            f"{median[(s, p, name)][1] / median[(s, p, 'memcached')][1]:>14.2f}"
            for s, p in WORKLOADS))
    print(f"{'memcached ops/s':<34}" + "".join(
        f"{median[(s, p, 'memcached')][0]:>14.0f}" for s, p in WORKLOADS))


if __name__ == "__main__":
    main()
