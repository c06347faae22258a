#!/usr/bin/env python3
"""Turns criterion's results for benches/balance.rs into the Markdown table
docs/benchmarks.md shows. Standard library only.

Usage: bench/balance_table.py [CRITERION_DIR] > bench/results/balance.md
"""

import json
import os
import platform
import subprocess
import sys
from datetime import date

ALGORITHMS = ["RoundRobin", "WeightedRoundRobin", "Random", "LeastConnections",
              "LeastRequest", "PeakEwma", "ConsistentHash"]
SIZES = ["10", "100", "1000"]


def median_ns(root, *parts):
    path = os.path.join(root, *parts, "new", "estimates.json")
    try:
        with open(path) as f:
            return json.load(f)["median"]["point_estimate"]
    except FileNotFoundError:
        return None


def fmt(ns):
    if ns is None:
        return "–"
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.0f} ns"


def cpu():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "target/criterion"
    rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
    out = []
    out.append("# Balancing core: cost per pick\n")
    out.append(f"Median time of one pick plus its guard's completion (`make bench-balance`), "
               f"{date.today().isoformat()}, {os.cpu_count()} × {cpu()}, {rustc}. "
               "Weights 1–4 cycle over the endpoints; no clock read is included "
               "(the proxy passes the time it reads for its own metrics).\n")
    out.append("| algorithm | 10 endpoints | 100 endpoints | 1000 endpoints |")
    out.append("| --- | ---: | ---: | ---: |")
    for a in ALGORITHMS:
        out.append(f"| {a} | " + " | ".join(fmt(median_ns(root, "pick", a, n)) for n in SIZES) + " |")
    out.append("| WeightedRoundRobin, every weight distinct (worst case) | "
               + " | ".join(fmt(median_ns(root, "pick-distinct-weights", "WeightedRoundRobin", n)) for n in SIZES)
               + " |")
    out.append("")
    out.append("| Maglev table rebuild (65 537 slots at 100 endpoints, 100 003 at 1000) | 100 endpoints | 1000 endpoints |")
    out.append("| --- | ---: | ---: |")
    out.append("| view rebuild with the new table | "
               + " | ".join(fmt(median_ns(root, "maglev-rebuild", n)) for n in ["100", "1000"]) + " |")
    print("\n".join(out))


if __name__ == "__main__":
    main()
