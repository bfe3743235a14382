#!/usr/bin/env bash
# Side-by-side throughput of `memtool.py serve` and the real memcached (-t 1) on
# this machine: the same workload against both, alternating A B A B, medians
# and the A/B ratio (machines are noisy: never read one number alone).
#
#   examples/compare-with-memcached.sh [extra serve options, e.g. --sync always]
#
# Uses memtool.py bench; if memtier_benchmark is on PATH (or MEMTIER=path) it is
# run too, since one Python bench process drives about a third of what it does.
# Everything listens on 127.0.0.1 and stops when the script ends.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v memcached >/dev/null || { echo "needs memcached (apt-get install memcached)"; exit 1; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
A=$(free_port); B=$(free_port); DATA=$(mktemp -d)
python3 memtool.py serve -p "$A" --data "$DATA" "$@" & SERVE=$!
memcached -u "$(id -un)" -l 127.0.0.1 -p "$B" -t 1 -m 256 & MEMCACHED=$!
trap 'kill $SERVE $MEMCACHED 2>/dev/null; rm -rf "$DATA"' EXIT
sleep 1
WORKLOAD=(--ratio 1:10 -d 32 --key-maximum 10000)
for pipeline in 1 16; do
    echo "== 50 connections, 1:10, 32-byte values, pipeline $pipeline"
    python3 memtool.py bench -s "127.0.0.1:$A" --vs "127.0.0.1:$B" -c 25 --processes 2 \
        "${WORKLOAD[@]}" --pipeline "$pipeline" --test-time 4 --rounds 3 | grep -E "^(A|B):|^Totals|^ratio"
    MEMTIER=${MEMTIER:-$(command -v memtier_benchmark || true)}
    if [ -n "$MEMTIER" ]; then
        for round in 1 2 3; do
            for side in "A $A" "B $B"; do
                set -- $side
                printf "memtier %s round %s: " "$1" "$round"
                "$MEMTIER" -s 127.0.0.1 -p "$2" -P memcache_text -t 1 -c 50 "${WORKLOAD[@]}" \
                    --pipeline "$pipeline" --test-time 4 --hide-histogram 2>/dev/null |
                    awk '/^Totals/ {print $2 " ops/s"}'
            done
        done
    fi
done
