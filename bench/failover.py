#!/usr/bin/python3
"""Failover benchmark on the namespace lab (driver of bench/failover.sh; see there).

failover mode: for each implementation (keepalived, ternd-kernel, ternd-dpdk) and advert
interval (1s, 100ms, 10ms), ROUNDS rounds of:
  cut       - the master's link is cut at the switch; the client's outage (tern-probe, a TCP
              connect to VIP:2525 every 1 ms) until the backup answers;
  graceful  - the master gets SIGTERM (priority-0 advert); the client's outage.
Each round uses a fresh lab: a (priority 150) is master, b (100) backup. Medians are
printed with min-max, beside the protocol bound for b (3 x interval + skew).

load mode: a and b at INTERVAL (10ms) for DURATION seconds while tern-load saturates the
master's relay on the VIP and stress-ng hogs every core; counts the HA transitions on both
nodes after convergence (any is a false failover) and the probe's worst outage. For
keepalived the relay on the VIP is ternd without [ha] (ip_nonlocal_bind in the node), the
setup operators run today.
"""
import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests/integration"))

from netns_lab import Lab  # noqa: E402
from ha_lab import (PORT, VIP, keepalived_node, master_down_bound, start_probe,  # noqa: E402
                    ternd_has_ha, ternd_node, wait_for, wait_single_holder)

NODES = ["a", "b"]


def make_nodes(lab, impl, interval, tmp, **kw):
    if impl == "keepalived":
        a = keepalived_node(lab, "a", 150, interval, tmp, **kw)
        b = keepalived_node(lab, "b", 100, interval, tmp, **kw)
    else:
        backend = impl.split("-", 1)[1]
        a = ternd_node(lab, "a", 150, interval, tmp, backend=backend, **kw)
        b = ternd_node(lab, "b", 100, interval, tmp, backend=backend, **kw)
    return a, b


def settle(lab, interval_s, timeout):
    if wait_single_holder(lab, NODES, "a", timeout=timeout) != "a":
        raise RuntimeError(f"a did not become the only master: holders {lab.holders(VIP, NODES)}")
    wait_for(lambda: lab.ping("client", VIP), 5)
    wait_for(lambda: lab.arp_entry("client", VIP) == lab.mac("a"), 5)


def measure(lab, interval_s, action):
    """Run action() under the probe; wait for b to take over; the probe's report."""
    pr = start_probe(lab, timeout_ms=200)
    # A random phase against the master's adverts: the backup's timer runs from the last
    # advert it heard, so a fixed delay would measure one point of [bound - interval, bound].
    time.sleep(0.3 + random.uniform(0, interval_s))
    action()
    if not wait_single_holder(lab, ["b"], "b", timeout=10 * interval_s + 5):
        pr.finish()
        raise RuntimeError("b did not take over")
    wait_for(lambda: lab.arp_entry("client", VIP) == lab.mac("b"), 5)
    time.sleep(0.5)
    return pr.finish()


def one_round(impl, interval, tmp):
    i = interval_seconds(interval)
    out = {}
    # cut
    with Lab() as lab:
        a, b = make_nodes(lab, impl, interval, tmp / f"cut-{time.monotonic_ns()}")
        settle(lab, i, 10 * i + 10)
        r = measure(lab, i, lambda: lab.cut("a"))
        out["cut"] = r["longest_outage_ms"]
        out["cut_kinds"] = (r["longest_outage"] or {}).get("failures", {})
        stop_all(a, b)
    # graceful
    with Lab() as lab:
        a, b = make_nodes(lab, impl, interval, tmp / f"term-{time.monotonic_ns()}")
        settle(lab, i, 10 * i + 10)
        r = measure(lab, i, lambda: a.proc.send_signal(signal.SIGTERM))
        out["graceful"] = r["longest_outage_ms"]
        out["graceful_kinds"] = (r["longest_outage"] or {}).get("failures", {})
        stop_all(a, b)
    return out


def stop_all(*nodes):
    for n in nodes:
        try:
            if n.proc and n.proc.poll() is None:
                n.stop()
        except Exception as e:  # a bench reports, it does not stop on a slow exit
            print(f"  warning: stopping {n.host}: {e}", file=sys.stderr)


def interval_seconds(s):
    from ha_lab import interval_seconds as f
    return f(s)


def fmt(xs):
    if not xs:
        return "-"
    return f"{statistics.median(xs):8.1f} ({min(xs):.1f}-{max(xs):.1f})"


def failover_mode(args, tmp):
    has_ha, why = ternd_has_ha()
    rows = []
    for impl in args.impls:
        for interval in args.intervals:
            bound = master_down_bound(interval, 100) * 1e3
            if impl != "keepalived" and not has_ha:
                rows.append((impl, interval, bound, None, None, f"skipped: {why}"))
                continue
            cuts, terms, note = [], [], ""
            for k in range(args.rounds):
                try:
                    r = one_round(impl, interval, tmp)
                except Exception as e:
                    note = f"error: {e}"
                    print(f"  {impl} {interval} round {k}: {e}", file=sys.stderr)
                    break
                cuts.append(r["cut"])
                terms.append(r["graceful"])
                print(f"  {impl:13} {interval:>6} round {k}: cut {r['cut']:.1f} ms {r['cut_kinds']}, "
                      f"graceful {r['graceful']:.1f} ms {r['graceful_kinds']}", file=sys.stderr, flush=True)
            rows.append((impl, interval, bound, cuts, terms, note))
    print()
    print(f"failover outage seen by the client (ms; median (min-max) of {args.rounds} rounds; "
          f"tern-probe TCP connect every 1 ms)")
    print(f"{'implementation':14} {'advert':>7} {'bound':>8}  {'link cut':>24}  {'graceful (SIGTERM)':>24}")
    for impl, interval, bound, cuts, terms, note in rows:
        if cuts is None:
            print(f"{impl:14} {interval:>7} {bound:8.1f}  {note}")
        else:
            print(f"{impl:14} {interval:>7} {bound:8.1f}  {fmt(cuts):>24}  {fmt(terms):>24}  {note}")
    return rows


def load_mode(args, tmp):
    from conftest import TERN_LOAD, Ternd
    has_ha, why = ternd_has_ha()
    print(f"no false failover under load: {args.duration:.0f} s, advert {args.load_interval}, "
          f"tern-load on the VIP + stress-ng on {os.cpu_count()} cores")
    print(f"{'implementation':14} {'transitions a':>14} {'transitions b':>14} {'probe worst (ms)':>17} "
          f"{'probe failures':>15} {'load':>20}")
    for impl in args.impls:
        if impl != "keepalived" and not has_ha:
            print(f"{impl:14} skipped: {why}")
            continue
        with Lab() as lab:
            d = tmp / f"load-{impl}"
            relays = []
            if impl == "keepalived":
                for h in NODES:
                    lab.run(h, "sysctl -qw net.ipv4.ip_nonlocal_bind=1")
                    rd = d / f"relay-{h}"
                    rd.mkdir(parents=True)
                    t = Ternd(rd, listens=[{"address": f"{VIP}:{PORT}"}], networks=("198.18.0.0/24",),
                              argv_prefix=lab.exec_prefix(h))
                    t.start()
                    lab.procs.append(t.proc)
                    relays.append(t)
                a, b = make_nodes(lab, impl, args.load_interval, d, listen_port=None)
            else:
                a, b = make_nodes(lab, impl, args.load_interval, d)
            settle(lab, interval_seconds(args.load_interval), 15)
            time.sleep(1.0)
            ta, tb = len(a.transitions()), len(b.transitions())
            pr = start_probe(lab, interval_ms=2.0, timeout_ms=500)
            load = lab.popen("client", [TERN_LOAD, "--host", VIP, "--port", str(PORT), "-s", "32",
                                        "-m", "100000000", "-l", "1024", "-n", "10",
                                        "--timeout", str(int(args.duration))],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            hog = subprocess.Popen(["stress-ng", "--cpu", str(os.cpu_count()), "--timeout", f"{int(args.duration)}s",
                                    "--quiet"])
            time.sleep(args.duration)
            hog.wait(30)
            try:  # tern-load stops itself at --timeout and prints its summary
                lout = load.communicate(timeout=30)[0].decode(errors="replace")
            except subprocess.TimeoutExpired:
                load.kill()
                lout = load.communicate()[0].decode(errors="replace")
            r = pr.finish()
            na, nb = len(a.transitions()) - ta, len(b.transitions()) - tb
            rate = next((l.strip() for l in lout.splitlines() if "msg/s" in l), lout.strip()[-80:])
            print(f"{impl:14} {na:14d} {nb:14d} {r['longest_outage_ms']:17.1f} {r['failures']:15d}  {rate}",
                  flush=True)
            stop_all(a, b)
            for t in relays:
                try:
                    t.stop()
                except Exception as e:
                    print(f"  warning: relay stop: {e}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["failover", "load"], default=os.environ.get("MODE", "failover"))
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("ROUNDS", "5")))
    ap.add_argument("--intervals", nargs="+", default=os.environ.get("INTERVALS", "1s 100ms 10ms").split())
    ap.add_argument("--impls", nargs="+",
                    default=os.environ.get("IMPLS", "keepalived ternd-kernel ternd-dpdk").split())
    ap.add_argument("--duration", type=float, default=float(os.environ.get("DURATION", "60")))
    ap.add_argument("--load-interval", default=os.environ.get("LOAD_INTERVAL", "10ms"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tern-failover."))
    try:
        if args.mode == "failover":
            failover_mode(args, tmp)
        else:
            load_mode(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
