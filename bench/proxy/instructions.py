#!/usr/bin/env python3
"""User-space instructions per proxied request, counted by callgrind.

CPU time per request on a shared 2-core machine moves by 10-30% from one
round to the next (see bench/RESULTS.md), more than most single changes to
the proxy gain or lose. The number of instructions the proxy executes per
request hardly does: on an otherwise idle machine it repeats within 0.2% for
HTTP/1.1 and within about 1.5% for HTTP/2 clients (how many requests one read
of a connection brings varies, and with it the work shared per read), so a change can be
judged on it alone, before the interleaved load rounds of `run.py` confirm
it in time. It counts work, not time: cache misses and system calls are
not in it.

For each scenario, each binary given runs under `valgrind --tool=callgrind`
in front of the same backends as `run.py`'s (HAProxy too, with `run.py`'s
configuration, when `haproxy` is given as a target); after a warm-up the counters are
zeroed, h2load sends a fixed number of requests, and the instructions of all
the proxy's threads (its code, the libraries', libc's) are divided by the
requests that succeeded.

    python3 bench/proxy/instructions.py haproxy target/release/fulcrum [other/fulcrum ...]

With `--simulate`, callgrind also simulates the caches and the branch
predictors (`--cache-sim=yes --branch-sim=yes`) and records each
instruction's count, and a second table gives, per request, what CPU time
depends on beyond the instruction count: first-level cache misses (data
and instructions), last-level misses, mispredicted conditional and
indirect branches, and atomic read-modify-write instructions (those with a
`lock` prefix, and `xchg` with memory, found with `objdump` in the proxy's
binary and libraries). The simulation is valgrind's model of one CPU, not
the hardware's counters, and sees nothing of the other processes sharing
the cores; it ranks causes, it does not measure time.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as R  # noqa: E402

SCENARIOS = {
    "http1": "HTTP/1.1 keep-alive, 16 connections",
    "close": "HTTP/1.1, a new connection per request, 16 at a time",
    "http2": "HTTP/2 clients, 16 × 10 streams, HTTP/1.1 endpoints",
    "grpc": "gRPC unary calls, 16 × 10 streams, HTTP/2 endpoints",
    "grpc1": "gRPC unary calls, 1 × 64 streams, HTTP/2 endpoints",
}


def load(scenario: str, url: str, body: Path | None, n: int) -> int:
    """Sends `n` requests with h2load; returns how many succeeded.

    For `close`, wrk sends requests for `n / 500` seconds instead (h2load
    keeps its connections), each on a connection of its own."""
    if scenario == "close":
        argv = ["wrk", "-t1", "-c16", f"-d{max(1, n // 500)}s", "-H", "Connection: close", url]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=900).stdout
        done = re.search(r"(\d+) requests in", out)
        bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        return int(done.group(1)) - (int(bad.group(1)) if bad else 0) if done else 0
    if scenario == "http1":
        argv = ["h2load", "--h1", "-c", "16", "-m", "1", "-n", str(n), url]
    else:
        # One connection of 64 streams, as in `run.py`'s gRPC section.
        argv = ["h2load", "-c", "1", "-m", "64"] if scenario == "grpc1" else ["h2load", "-c", "16", "-m", "10"]
        argv += ["-n", str(n)]
        if body is not None:
            argv += ["-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers"]
        argv.append(url)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=900).stdout
    m = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", out)
    return int(m.group(1)) if m else 0


# What `--simulate` reports per request: (heading, callgrind's events summed).
SIMULATED = [
    ("D1 misses", ("D1mr", "D1mw")),
    ("I1 misses", ("I1mr",)),
    ("LL misses", ("ILmr", "DLmr", "DLmw")),
    ("conditional mispredicts", ("Bcm",)),
    ("indirect branches", ("Bi",)),
    ("indirect mispredicts", ("Bim",)),
]


def locked_instructions(dump: Path) -> int:
    """Executed atomic read-modify-write instructions in a callgrind dump
    made with `--dump-instr=yes`: its per-instruction counts matched against
    the addresses `objdump` finds with a `lock` prefix (or `xchg` on memory)
    in each object."""
    locked: dict[str, set[int]] = {}

    def of(obj: str) -> set[int]:
        if obj not in locked:
            dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", obj], capture_output=True, text=True).stdout
            found = set()
            for line in dis.splitlines():
                m = re.match(r"^\s+([0-9a-f]+):\s+(lock |xchg\S*\s+\S*\()", line)
                if m:
                    found.add(int(m.group(1), 16))
            locked[obj] = found
        return locked[obj]

    names: dict[str, str] = {}
    obj, addr, ir, positions, skip, total = None, 0, 0, 1, False, 0
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith("positions:"):
            positions = len(line.split()) - 1
        elif line.startswith("events:"):
            ir = line.split()[1:].index("Ir")
        elif line.startswith(("ob=", "cob=")):
            m = re.match(r"c?ob=\((\d+)\)(?: (.*))?", line)
            if m and m.group(2):
                names[m.group(1)] = m.group(2)
            if m and line.startswith("ob="):
                obj = names.get(m.group(1))
        elif line.startswith("calls="):
            skip = True  # the next cost line is the call's, inclusive
        elif line and line[0] in "+-*0123456789":
            tokens = line.split()
            a = tokens[0]
            if a.startswith("0x"):
                addr = int(a, 16)
            elif a[0] in "+-":
                addr += int(a)
            if skip:
                skip = False
                continue
            values = tokens[positions:]
            if obj and obj.startswith("/") and ir < len(values) and addr in of(obj):
                total += int(values[ir])
    return total


def measure(scenario: str, target: str, peer: str, n: int, top: int, simulate: bool = False):
    """Instructions per request of `target` (a fulcrum binary, or `haproxy`),
    the top functions, and with `simulate` the simulated events per request."""
    procs = R.Procs()
    work = Path(tempfile.mkdtemp(prefix="fulcrum-instr-"))
    work.chmod(0o755)
    out = work / "callgrind.out"
    haproxy = target == "haproxy"
    try:
        if scenario.startswith("grpc"):
            for i, addr in enumerate(R.GRPC_BACKENDS):
                procs.start(f"grpc{i}", [peer, "grpc-server", addr, f"g{i + 1}"])
            for addr in R.GRPC_BACKENDS:
                R.wait_port(addr)
            if haproxy:
                conf, port = R.haproxy_peer_conf(work), R.PORTS["haproxy-grpc"]
            else:
                conf, port = R.fulcrum_peer_conf(work, "grpc"), R.PORTS["fulcrum-grpc"]
            url, body = f"http://127.0.0.1:{port}/test.Echo/Unary", R.grpc_body(work)
        else:
            R.start_backends(procs, work)
            if haproxy:
                conf, port = R.haproxy_conf(work), R.PORTS["haproxy"]
            else:
                conf, port = R.fulcrum_conf(work), R.PORTS["fulcrum"]
            url, body = f"http://127.0.0.1:{port}/", None
        command = ["haproxy", "-db", "-f", str(conf)] if haproxy else [target, "proxy", "--config", str(conf)]
        sim = ["--cache-sim=yes", "--branch-sim=yes", "--dump-instr=yes"] if simulate else []
        argv = ["valgrind", "--tool=callgrind", *sim, f"--callgrind-out-file={out}", *command]
        procs.start("proxy", argv, env=dict(os.environ, RUST_LOG="warn"))
        R.wait_port(f"127.0.0.1:{port}", timeout=120)  # valgrind starts slowly
        load(scenario, url, body, 2000)
        pid = str(procs.procs["proxy"].pid)
        subprocess.run(["callgrind_control", "-z", pid], capture_output=True, check=True, timeout=60)
        ok = load(scenario, url, body, n)
        subprocess.run(["callgrind_control", "-d", pid], capture_output=True, check=True, timeout=60)
        dumps = [p for p in work.glob("callgrind.out.*") if re.fullmatch(r"callgrind\.out\.\d+", p.name)]
        if ok == 0 or not dumps:
            raise RuntimeError(f"{scenario}: {ok} requests succeeded, {len(dumps)} callgrind dumps")
        dump = max(dumps, key=lambda p: p.stat().st_mtime)
        text = dump.read_text(errors="replace")
        total = int(re.search(r"^(?:summary|totals): (\d+)", text, re.M).group(1))
        events = {}
        if simulate:
            kinds = re.search(r"^events: (.*)$", text, re.M).group(1).split()
            values = [int(v) for v in re.search(r"^summary: (.*)$", text, re.M).group(1).split()]
            got = dict(zip(kinds, values))
            events = {head: sum(got.get(k, 0) for k in ks) / ok for head, ks in SIMULATED}
            events["atomic instructions"] = locked_instructions(dump) / ok
        lines = []
        if top:
            argv = ["callgrind_annotate", "--inclusive=no", "--threshold=100", str(dump)]
            ann = subprocess.run(argv, capture_output=True, text=True, timeout=300).stdout
            for line in ann.splitlines():
                m = re.match(r"\s*([\d,]+) \([\s\d.]+%\)\s+[^:\s]*:(.+?) \[", line)
                own = int(m.group(1).replace(",", "")) if m else total
                # The threads' entry points carry the whole total: not code of their own.
                if own < total:
                    lines.append(f"{own / ok:8.0f}  {m.group(2)[:110]}")
                if len(lines) == top:
                    break
        return total / ok, lines, events
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("targets", nargs="+", help="fulcrum binaries to compare, or `haproxy` (the first is the base of the ratios)")
    ap.add_argument("--peer", default="target/release/examples/bench_peer", help="the gRPC backends (examples/bench_peer.rs)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of " + ", ".join(SCENARIOS))
    ap.add_argument("--requests", type=int, default=5000, help="requests counted per scenario")
    ap.add_argument("--top", type=int, default=0, help="also list the N functions with the most instructions of their own")
    ap.add_argument("--simulate", action="store_true", help="also simulate caches and branch predictors, and count atomic instructions")
    args = ap.parse_args()
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s): {', '.join(unknown)}")
    names = [f"`{b}`" for b in args.targets]
    print(f"Instructions per request (callgrind, {args.requests} requests after 2,000 to warm up)\n")
    print("| scenario | " + " | ".join(names) + (" | ratio to the first |" if len(names) > 1 else " |"))
    print("|---|" + "---:|" * len(names) + ("---:|" if len(names) > 1 else ""))
    tops = []
    simulated = []
    for s in scenarios:
        counts = []
        for b in args.targets:
            per_request, lines, events = measure(s, b, args.peer, args.requests, args.top, args.simulate)
            counts.append(per_request)
            if lines:
                tops.append((s, b, lines))
            if events:
                simulated.append((s, b, per_request, events))
        ratio = " | " + " / ".join(f"{c / counts[0]:.3f}" for c in counts[1:]) if len(counts) > 1 else ""
        print(f"| {SCENARIOS[s]} | " + " | ".join(f"{c:,.0f}" for c in counts) + ratio + " |", flush=True)
    if simulated:
        heads = [h for h, _ in SIMULATED] + ["atomic instructions"]
        print("\nSimulated per request (callgrind's cache and branch models; atomic instructions by address)\n")
        print("| scenario | target | instructions | " + " | ".join(heads) + " |")
        print("|---|---|---:|" + "---:|" * len(heads))
        for s, b, per_request, events in simulated:
            cells = " | ".join(f"{events[h]:,.1f}" for h in heads)
            print(f"| {s} | `{b}` | {per_request:,.0f} | {cells} |")
    for s, b, lines in tops:
        print(f"\n{s}, {b}: instructions per request of each function's own code\n")
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
