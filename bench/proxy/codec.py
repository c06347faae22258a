#!/usr/bin/env python3
"""The HTTP/2 layer alone: the proxy's own codec against the `h2` crate.

`examples/h2_codec.rs` serves every request `200` with a 13-byte body, on one
thread, either through the proxy's codec (`own`) or through the `h2` crate
with the settings the proxy gives it (`h2`). h2load sends GETs over 16
connections × 10 streams (the HTTP/2 scenario of `run.py`) to each in turn,
in interleaved rounds; the table gives each server's user and kernel CPU per
request (from /proc, as `run.py` does) and the ratios own / h2, as medians of
the per-round ratios.

    cargo build --release --example h2_codec
    python3 bench/proxy/codec.py [--rounds 5] [--seconds 4]
"""
import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as R  # noqa: E402

SERVERS = {"own": "127.0.0.5:18601", "h2": "127.0.0.6:18602"}


def load(addr: str, seconds: int, conns: int, streams: int) -> int:
    argv = ["h2load", "-c", str(conns), "-m", str(streams), "-D", str(seconds), "--warm-up-time", "1", f"http://{addr}/"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60).stdout
    m = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", out)
    return int(m.group(1)) if m else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default="target/release/examples/h2_codec")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--streams", type=int, default=10)
    args = ap.parse_args()
    procs = R.Procs()
    try:
        for name, addr in SERVERS.items():
            procs.start(name, [args.binary, name, addr])
        for addr in SERVERS.values():
            R.wait_port(addr)
        rounds = []
        for r in range(args.rounds):
            row = {}
            order = list(SERVERS) if r % 2 == 0 else list(reversed(SERVERS))
            for name in order:
                pid = procs.procs[name].pid
                u0, s0 = R.cpu_split(pid)
                n = load(SERVERS[name], args.seconds, args.connections, args.streams)
                u1, s1 = R.cpu_split(pid)
                if n == 0:
                    raise RuntimeError(f"{name}: no request succeeded")
                row[name] = (n / args.seconds, (u1 - u0) * 1e6 / n, (s1 - s0) * 1e6 / n)
                print(f"round {r + 1} {name}: {row[name][0]:,.0f} req/s, user {row[name][1]:.2f} µs, kernel {row[name][2]:.2f} µs", file=sys.stderr)
            rounds.append(row)
    finally:
        procs.stop_all()
    med = lambda name, i: statistics.median(row[name][i] for row in rounds)
    ratio = lambda i: statistics.median(row["own"][i] / row["h2"][i] for row in rounds)
    print(f"HTTP/2 layer alone, h2load -c{args.connections} -m{args.streams}, {args.rounds} interleaved rounds of {args.seconds} s, medians\n")
    print("| server | req/s | user µs/request | kernel µs/request |")
    print("|---|---:|---:|---:|")
    for name, label in [("own", "the proxy's codec (`h2conn`)"), ("h2", "the `h2` crate")]:
        print(f"| {label} | {med(name, 0):,.0f} | {med(name, 1):.2f} | {med(name, 2):.2f} |")
    print(f"| ratio own / h2 (median of rounds) | {ratio(0):.2f} | {ratio(1):.2f} | {ratio(2):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
