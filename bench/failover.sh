#!/usr/bin/env bash
# Failover of the virtual address as a client sees it, on the namespace lab
# (tests/integration/netns_lab.py): keepalived, ternd-kernel and ternd-dpdk at 1 s, 100 ms and
# 10 ms adverts, link cut and graceful stop of the master, in one run. As root.
#
#   bench/failover.sh                     # ROUNDS=5 rounds per cell, medians (min-max)
#   MODE=load bench/failover.sh           # no false failover: tern-load on the VIP and
#                                         # stress-ng on every core for DURATION=60 s
# Other knobs: INTERVALS="1s 100ms 10ms", IMPLS="keepalived ternd-kernel ternd-dpdk",
# LOAD_INTERVAL=10ms, TERND=build/src/ternd, TERN_BUILD=build. ternd rows say "skipped" while
# ternd has no [ha] section. Method and driver: bench/failover.py.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "bench/failover.sh: needs root (network namespaces)" >&2; exit 1; }
for t in keepalived nft ping stress-ng; do
  command -v "$t" >/dev/null || { echo "bench/failover.sh: $t missing: run tools/setup.sh" >&2; exit 1; }
done
export TERND=${TERND:-$PWD/build/src/ternd} TERN_BUILD=${TERN_BUILD:-$PWD/build}
exec /usr/bin/python3 bench/failover.py "$@"
