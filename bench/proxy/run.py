#!/usr/bin/env python3
"""Proxy benchmarks: fulcrum against HAProxy and NGINX, side by side on loopback.

Every process runs on 127.0.0.0/8, every run is bounded in time, and every
process started here is stopped on exit. Backends are NGINX instances (one
process per backend so that one can be killed) on 127.0.0.2-4. Load comes
from wrk. Runs of the compared targets are interleaved, round after round, and
the median of the rounds is reported.

Usage: bench/proxy/run.py --fulcrum target/release/fulcrum --out bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BACKENDS = ["127.0.0.2:18081", "127.0.0.3:18081", "127.0.0.4:18081"]
SLOW = 2  # index of the backend made ten times slower in the quality run
PORTS = {
    "fulcrum": 18080,
    "haproxy": 18090,
    "nginx": 18100,
    "fulcrum-tcp": 18180,
    "haproxy-tcp": 18190,
    "nginx-tcp": 18200,
    "fulcrum-grpc": 18280,
    "haproxy-grpc": 18290,
    "fulcrum-ws": 18380,
    "haproxy-ws": 18390,
    "fulcrum-tls": 18480,
    "haproxy-tls": 18490,
    "nginx-tls": 18500,
}
GRPC_BACKENDS = [a.replace(":18081", ":18083") for a in BACKENDS]
WS_BACKENDS = [a.replace(":18081", ":18084") for a in BACKENDS]
FULCRUM_ADMIN = 19901
ALGORITHMS = ["RoundRobin", "WeightedRoundRobin", "Random", "LeastConnections", "LeastRequest", "PeakEwma", "ConsistentHash"]


# Every line logged also goes here (set with --raw): the raw figures of each round.
RAW_LOG: list = [None]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
    if RAW_LOG[0] is not None:
        RAW_LOG[0].write(msg + "\n")
        RAW_LOG[0].flush()


class Procs:
    """Every process started here, stopped on exit."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        self.stop(name)
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
        self.procs[name] = p
        return p

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        p = self.procs.pop(name, None)
        if p is None:
            return
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


def wait_port(addr: str, timeout: float = 10.0) -> None:
    host, port = addr.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, int(port)), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {addr} after {timeout}s")


def wait_closed(addr: str, timeout: float = 10.0) -> None:
    host, port = addr.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, int(port)), timeout=0.2):
                time.sleep(0.05)
        except OSError:
            return
    raise RuntimeError(f"{addr} still accepting after {timeout}s")


# --- backends --------------------------------------------------------------------------------


def nginx_common(d: Path) -> str:
    """The settings every NGINX instance here shares: its own files under `d`,
    no access log, long keep-alive, room for many connections. Opens `http {`."""
    return f"""daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile 19000;
events {{ worker_connections 18000; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;"""


def backend_conf(work: Path, i: int, addr: str, delay_ms: float) -> Path:
    d = work / f"backend{i}"
    d.mkdir(exist_ok=True)
    big = work / "big.bin"
    conf = d / "nginx.conf"
    conf.write_text(
        f"""
load_module /usr/lib/nginx/modules/ngx_http_echo_module.so;
worker_processes 1;
{nginx_common(d)}
    server {{
        listen {addr} backlog=4096;
        location = / {{ return 200 "hello\\n"; }}
        location = /work {{ echo_sleep {delay_ms / 1000:.3f}; echo "done"; }}
        location = /big {{ alias {big}; }}
        location = /healthz {{ return 200 "ok\\n"; }}
    }}
}}
"""
    )
    return conf


def start_backends(procs: Procs, work: Path, slow_index: int | None = None, base_ms: float = 1.0) -> None:
    for i, addr in enumerate(BACKENDS):
        delay = base_ms * (10 if i == slow_index else 1)
        conf = backend_conf(work, i, addr, delay)
        procs.start(f"backend{i}", ["nginx", "-c", str(conf), "-p", str(conf.parent)])
    for addr in BACKENDS:
        wait_port(addr)


# --- proxies ---------------------------------------------------------------------------------


def fulcrum_conf(work: Path, algorithm: str = "RoundRobin", protocol: str = "HTTP") -> Path:
    port = PORTS["fulcrum" if protocol == "HTTP" else "fulcrum-tcp"]
    hash_on = "  hashOn: {header: x-user-id}\n" if algorithm == "ConsistentHash" else ""
    eps = "".join(f"  - {{address: {a}}}\n" for a in BACKENDS)
    text = (
        f"listen: 127.0.0.1:{port}\nprotocol: {protocol}\nadmin: 127.0.0.1:{FULCRUM_ADMIN + (protocol == 'TCP')}\n"
        f"loadBalancing:\n  algorithm: {algorithm}\n{hash_on}"
        # The memory run holds thousands of TCP connections on three backends.
        f"timeouts: {{idle: 300s}}\ncircuitBreakers: {{maxRequests: 100000, maxConnections: 100000}}\nendpoints:\n{eps}"
    )
    p = work / f"fulcrum-{protocol}-{algorithm}.yaml"
    p.write_text(text)
    return p


def fulcrum_peer_conf(work: Path, kind: str) -> Path:
    """Fulcrum in front of the gRPC (appProtocol GRPC) or WebSocket backends."""
    backends = GRPC_BACKENDS if kind == "grpc" else WS_BACKENDS
    eps = "".join(f"  - {{address: {a}}}\n" for a in backends)
    app = "appProtocol: GRPC\n" if kind == "grpc" else ""
    text = (
        f"listen: 127.0.0.1:{PORTS['fulcrum-' + kind]}\n{app}"
        f"loadBalancing:\n  algorithm: RoundRobin\ntimeouts: {{idle: 300s}}\nendpoints:\n{eps}"
    )
    p = work / f"fulcrum-{kind}.yaml"
    p.write_text(text)
    return p


def haproxy_peer_conf(work: Path) -> Path:
    """HAProxy with HTTP/2 on both sides for gRPC, and HTTP mode (tunnels) for WebSocket."""
    grpc = "".join(f"    server g{i} {a} proto h2\n" for i, a in enumerate(GRPC_BACKENDS))
    ws = "".join(f"    server w{i} {a}\n" for i, a in enumerate(WS_BACKENDS))
    p = work / "haproxy-peers.cfg"
    p.write_text(
        f"""
global
    maxconn 9000
    nbthread 2
defaults
    mode http
    timeout connect 1s
    timeout client 300s
    timeout server 30s
    timeout tunnel 1h
frontend grpc
    bind 127.0.0.1:{PORTS['haproxy-grpc']} proto h2
    default_backend grpc
backend grpc
    balance roundrobin
{grpc}
frontend ws
    bind 127.0.0.1:{PORTS['haproxy-ws']}
    default_backend ws
backend ws
    balance roundrobin
{ws}
"""
    )
    return p


def haproxy_conf(work: Path, balance: str = "roundrobin") -> Path:
    servers = "".join(f"    server s{i} {a} maxconn 10000\n" for i, a in enumerate(BACKENDS))
    p = work / f"haproxy-{balance}.cfg"
    p.write_text(
        f"""
global
    maxconn 9000
    nbthread 2
defaults
    timeout connect 1s
    timeout client 300s
    timeout server 30s
    retries 2
    option redispatch
frontend web
    mode http
    bind 127.0.0.1:{PORTS['haproxy']}
    option http-keep-alive
    default_backend web
backend web
    mode http
    balance {balance}
    http-reuse always
    retry-on conn-failure empty-response
{servers}
frontend tcp
    mode tcp
    bind 127.0.0.1:{PORTS['haproxy-tcp']}
    default_backend tcp
backend tcp
    mode tcp
    balance roundrobin
{servers}
"""
    )
    return p


def nginx_proxy_conf(work: Path, method: str = "") -> Path:
    d = work / "nginx-proxy"
    d.mkdir(exist_ok=True)
    servers = "".join(f"        server {a};\n" for a in BACKENDS)
    conf = d / f"nginx{('-' + method) if method else ''}.conf"
    conf.write_text(
        f"""
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 2;
{nginx_common(d)}
    upstream web {{
        {method + ';' if method else ''}
{servers}        keepalive 256;
    }}
    server {{
        listen 127.0.0.1:{PORTS['nginx']} backlog=4096;
        location / {{
            proxy_pass http://web;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream error timeout;
            proxy_buffering off;
        }}
    }}
}}
stream {{
    upstream tcp {{
{servers}    }}
    server {{
        listen 127.0.0.1:{PORTS['nginx-tcp']};
        proxy_pass tcp;
    }}
}}
"""
    )
    return conf


def tls_files(work: Path) -> tuple[Path, Path, Path]:
    """One ECDSA P-256 certificate for 127.0.0.1, made with openssl for every
    proxy: the certificate, its key, and both in one file (HAProxy's form)."""
    crt, key, both = work / "tls.crt", work / "tls.key", work / "tls.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
         "-subj", "/CN=bench.local", "-addext", "subjectAltName=DNS:bench.local,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(crt)],
        check=True, capture_output=True, timeout=30,
    )
    both.write_text(crt.read_text() + key.read_text())
    for p in (crt, key, both):
        p.chmod(0o644)
    return crt, key, both


def tls_confs(work: Path) -> tuple[Path, Path, Path]:
    """Fulcrum, HAProxy and NGINX terminating TLS (1.2 and 1.3, ALPN h2 and
    http/1.1 where offered) in front of the same backends, two workers each."""
    crt, key, both = tls_files(work)
    eps = "".join(f"  - {{address: {a}}}\n" for a in BACKENDS)
    fulcrum = work / "fulcrum-tls.yaml"
    fulcrum.write_text(
        f"listen: 127.0.0.1:{PORTS['fulcrum-tls']}\nworkers: 2\nloadBalancing: {{algorithm: RoundRobin}}\n"
        f"tls:\n  certificates: [{{certFile: {crt}, keyFile: {key}}}]\n"
        f"timeouts: {{idle: 300s}}\ncircuitBreakers: {{maxRequests: 100000, maxConnections: 100000}}\nendpoints:\n{eps}"
    )
    servers = "".join(f"    server s{i} {a} maxconn 10000\n" for i, a in enumerate(BACKENDS))
    haproxy = work / "haproxy-tls.cfg"
    haproxy.write_text(
        f"""
global
    maxconn 9000
    nbthread 2
    ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
    mode http
    timeout connect 1s
    timeout client 300s
    timeout server 30s
frontend tls
    bind 127.0.0.1:{PORTS['haproxy-tls']} ssl crt {both} alpn h2,http/1.1
    option http-keep-alive
    default_backend web
backend web
    balance roundrobin
    http-reuse always
{servers}
"""
    )
    d = work / "nginx-tls"
    d.mkdir(exist_ok=True)
    upstream = "".join(f"        server {a};\n" for a in BACKENDS)
    nginx = d / "nginx.conf"
    nginx.write_text(
        f"""
worker_processes 2;
{nginx_common(d)}
    upstream web {{
{upstream}        keepalive 256;
    }}
    server {{
        listen 127.0.0.1:{PORTS['nginx-tls']} ssl backlog=4096;
        ssl_certificate {crt};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_tickets off;
        location / {{
            proxy_pass http://web;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""
    )
    return fulcrum, haproxy, nginx


def tls_load(targets: dict[str, tuple[str, int]], rounds: int, conns: int, seconds: int, close: bool) -> tuple[dict[str, LoadResult], list[dict[str, LoadResult]]]:
    """wrk over HTTPS (OpenSSL, TLS 1.3, no session resumption), keep-alive or
    a new connection and so a full handshake per request, with the proxy's CPU
    time per request."""
    headers = ["Connection: close"] if close else []

    def run(url: str) -> LoadResult:
        r = wrk(url, conns, seconds, headers=headers)
        return LoadResult(rate=r.rps, p50_ms=r.p50_ms, p99_ms=r.p99_ms, errors=r.errors)

    return interleaved_load(targets, rounds, run)


def start_fulcrum(procs: Procs, binary: str, conf: Path, name: str = "fulcrum") -> None:
    env = dict(os.environ, RUST_LOG="warn")
    procs.start(name, [binary, "proxy", "--config", str(conf)], env=env)
    text = conf.read_text()
    port = re.search(r"listen: 127\.0\.0\.1:(\d+)", text).group(1)
    wait_port(f"127.0.0.1:{port}")


def start_haproxy(procs: Procs, conf: Path) -> None:
    procs.start("haproxy", ["haproxy", "-db", "-f", str(conf)])
    wait_port(f"127.0.0.1:{PORTS['haproxy']}")


def start_nginx_proxy(procs: Procs, conf: Path) -> None:
    procs.start("nginx-proxy", ["nginx", "-c", str(conf), "-p", str(conf.parent)])
    wait_port(f"127.0.0.1:{PORTS['nginx']}")


# --- wrk -------------------------------------------------------------------------------------


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    transfer_mb_s: float
    errors: int
    requests: int
    # The proxy's CPU time per request, user and kernel, in microseconds (when measured).
    user_us: float = float("nan")
    sys_us: float = float("nan")


UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}
SIZE = {"B": 1 / 1e6, "KB": 1024 / 1e6, "MB": 1024 * 1024 / 1e6, "GB": 1024**3 / 1e6}


def wrk(url: str, conns: int, seconds: int, headers: list[str] | None = None, threads: int = 1) -> WrkResult:
    argv = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--latency", "--timeout", "5s"]
    for h in headers or []:
        argv += ["-H", h]
    argv.append(url)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30).stdout

    def lat(q: str) -> float:
        m = re.search(rf"^\s+{q}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        return float(m.group(1)) * UNITS[m.group(2)] if m else float("nan")

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    tr = re.search(r"Transfer/sec:\s+([\d.]+)(B|KB|MB|GB)", out)
    total = re.search(r"(\d+) requests in", out)
    errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non2xx.group(1)) if non2xx else 0
    if not rps:
        raise RuntimeError(f"wrk produced no result for {url}:\n{out}")
    return WrkResult(
        rps=float(rps.group(1)),
        p50_ms=lat("50"),
        p99_ms=lat("99"),
        transfer_mb_s=float(tr.group(1)) * SIZE[tr.group(2)] if tr else 0.0,
        errors=errors,
        requests=int(total.group(1)) if total else 0,
    )


def median_result(rs: list[WrkResult]) -> WrkResult:
    return WrkResult(
        rps=statistics.median(r.rps for r in rs),
        p50_ms=statistics.median(r.p50_ms for r in rs),
        p99_ms=statistics.median(r.p99_ms for r in rs),
        transfer_mb_s=statistics.median(r.transfer_mb_s for r in rs),
        user_us=statistics.median(r.user_us for r in rs),
        sys_us=statistics.median(r.sys_us for r in rs),
        errors=sum(r.errors for r in rs),
        requests=sum(r.requests for r in rs),
    )


# --- h2load and the WebSocket load generator ---------------------------------------------------


@dataclass
class LoadResult:
    rate: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us: float = float("nan")
    user_us: float = float("nan")
    sys_us: float = float("nan")
    # Seconds of load before the measured run (h2load's warm-up), whose CPU time is counted too.
    warmup_s: float = 0.0


def cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU time of a process and its children, in seconds."""
    user = system = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            user += int(fields[11]) / tick
            system += int(fields[12]) / tick
        except (FileNotFoundError, IndexError, ValueError):
            pass
    return user, system


def interleaved_cpu(targets: dict[str, tuple[str, int | None]], rounds: int, run) -> tuple[dict[str, WrkResult], list[dict[str, WrkResult]]]:
    """Like `interleaved`, with each proxy's user and kernel CPU time per
    request; returns the medians and every round's results (for per-round ratios)."""
    per_round: list[dict[str, WrkResult]] = []
    for r in range(rounds):
        this: dict[str, WrkResult] = {}
        for name, (url, pid) in targets.items():
            before = cpu_split(pid) if pid else (0.0, 0.0)
            res = run(url)
            if pid and res.requests > 0:
                after = cpu_split(pid)
                res.user_us = (after[0] - before[0]) * 1e6 / res.requests
                res.sys_us = (after[1] - before[1]) * 1e6 / res.requests
            log(
                f"  round {r + 1} {name:<12} {res.rps:>10.0f} req/s  p50 {res.p50_ms:.3f} ms  p99 {res.p99_ms:.3f} ms"
                f"  user {res.user_us:.1f} us  kernel {res.sys_us:.1f} us  errors {res.errors}"
            )
            this[name] = res
        per_round.append(this)
    medians = {t: median_result([rd[t] for rd in per_round]) for t in targets}
    return medians, per_round


def ratios(per_round: list[dict], a: str = "fulcrum", b: str = "haproxy") -> dict[str, float]:
    """Medians over the rounds of a's figure divided by b's in the same round
    (rounds run the targets back to back, so the machine's drift cancels)."""
    def med(key) -> float:
        vals = [key(rd[a]) / key(rd[b]) for rd in per_round if key(rd[b]) > 0]
        return statistics.median(vals) if vals else float("nan")

    return {
        "rps": med(lambda r: r.rps if isinstance(r, WrkResult) else r.rate),
        "p99": med(lambda r: r.p99_ms),
        "user": med(lambda r: r.user_us),
        "kernel": med(lambda r: r.sys_us),
    }


def ratio_table(rows: list[tuple[str, dict[str, float]]], rate: str = "req/s") -> list[str]:
    """Markdown lines: fulcrum / HAProxy per scenario, medians of per-round ratios."""
    lines = [
        "",
        "fulcrum / HAProxy, medians of the per-round ratios (each round runs the proxies back to back):",
        "",
        f"| scenario | {rate} | p99 | user CPU per request | kernel CPU per request |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        lines.append(f"| {name} | {r['rps']:.2f} | {r['p99']:.2f} | {r['user']:.2f} | {r['kernel']:.2f} |")
    return lines


def grpc_body(work: Path) -> Path:
    """A gRPC unary request: test.Echo's Msg with a 16-byte payload, framed."""
    msg = bytes([0x12, 16]) + b"x" * 16
    p = work / "grpc-request.bin"
    p.write_bytes(bytes([0]) + len(msg).to_bytes(4, "big") + msg)
    return p


def h2load(url: str, body: Path | None, conns: int, streams: int, seconds: int, work: Path) -> LoadResult:
    """h2load over h2c prior knowledge: gRPC unary calls when `body` is given, plain GETs otherwise."""
    logf = work / "h2load.log"
    argv = ["h2load", "-c", str(conns), "-m", str(streams), "-D", str(seconds), "--warm-up-time", "1"]
    if body is not None:
        argv += ["-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers"]
    argv += ["--log-file", str(logf), url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60).stdout
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    if not m:
        raise RuntimeError(f"h2load produced no result for {url}:\n{out}")
    done = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    errors = int(done.group(2)) + int(done.group(3)) if done else 0
    times = sorted(int(l.split("\t")[2]) for l in logf.read_text().splitlines() if l.count("\t") >= 2)
    pct = lambda q: times[min(len(times) - 1, int(len(times) * q))] / 1000 if times else float("nan")
    return LoadResult(rate=float(m.group(1)), p50_ms=pct(0.5), p99_ms=pct(0.99), errors=errors, warmup_s=1.0)


def ws_load(peer: str, url: str, conns: int, seconds: int) -> LoadResult:
    out = subprocess.run([peer, "ws-load", url, str(conns), str(seconds)], capture_output=True, text=True, timeout=seconds + 60)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return LoadResult(rate=r["messages_per_s"], p50_ms=r["p50_us"] / 1000, p99_ms=r["p99_us"] / 1000, errors=r["errors"])


def interleaved_load(targets: dict[str, tuple[str, int | None]], rounds: int, run) -> tuple[dict[str, LoadResult], list[dict[str, LoadResult]]]:
    """Like `interleaved`, with the CPU time (user and kernel) per request or
    message of the process behind each target; returns the medians and every
    round's results (for per-round ratios)."""
    per_round: list[dict[str, LoadResult]] = []
    for r in range(rounds):
        this: dict[str, LoadResult] = {}
        for name, (url, pid) in targets.items():
            before = cpu_split(pid) if pid else (0.0, 0.0)
            res = run(url)
            if pid and res.rate > 0:
                after = cpu_split(pid)
                done = res.rate * (args_seconds[0] + res.warmup_s)
                res.user_us = (after[0] - before[0]) * 1e6 / done
                res.sys_us = (after[1] - before[1]) * 1e6 / done
                res.cpu_us = res.user_us + res.sys_us
            log(
                f"  round {r + 1} {name:<12} {res.rate:>10.0f}/s  p50 {res.p50_ms:.3f} ms  p99 {res.p99_ms:.3f} ms"
                f"  user {res.user_us:.1f} us  kernel {res.sys_us:.1f} us  errors {res.errors}"
            )
            this[name] = res
        per_round.append(this)
    medians = {
        t: LoadResult(
            rate=statistics.median(rd[t].rate for rd in per_round),
            p50_ms=statistics.median(rd[t].p50_ms for rd in per_round),
            p99_ms=statistics.median(rd[t].p99_ms for rd in per_round),
            errors=sum(rd[t].errors for rd in per_round),
            cpu_us=statistics.median(rd[t].cpu_us for rd in per_round),
            user_us=statistics.median(rd[t].user_us for rd in per_round),
            sys_us=statistics.median(rd[t].sys_us for rd in per_round),
        )
        for t in targets
    }
    return medians, per_round


# Length of one load run, for the CPU-per-request figure (set in main).
args_seconds = [4]


# --- scenarios -------------------------------------------------------------------------------


def interleaved(targets: dict[str, str], rounds: int, run) -> dict[str, WrkResult]:
    results: dict[str, list[WrkResult]] = {t: [] for t in targets}
    for r in range(rounds):
        for name, url in targets.items():
            res = run(url)
            log(f"  round {r + 1} {name:<12} {res.rps:>10.0f} req/s  p50 {res.p50_ms:.3f} ms  p99 {res.p99_ms:.3f} ms  {res.transfer_mb_s:.0f} MB/s  errors {res.errors}")
            results[name].append(res)
    return {t: median_result(v) for t, v in results.items()}


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def process_tree(pid: int) -> list[int]:
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        children = []
    for c in children:
        pids += process_tree(int(c))
    return pids


H2_OPEN = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def idle_memory(pid: int, port: int, n: int, kind: str = "http1") -> float:
    """KiB of resident memory per idle client connection: an HTTP/1.1
    keep-alive connection after one request, an HTTP/2 connection after its
    preface and SETTINGS (no stream), or a TCP-mode connection joined to a
    backend with nothing sent."""
    before = rss_kib(process_tree(pid))
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            socks.append(s)
        if kind == "http1":
            # One small request per connection, so that each is a live keep-alive connection.
            for s in socks:
                s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            for s in socks:
                s.recv(4096)
        elif kind == "h2":
            for s in socks:
                s.sendall(H2_OPEN)
            for s in socks:
                s.recv(4096)  # the server's SETTINGS
        time.sleep(1.0)
        after = rss_kib(process_tree(pid))
    finally:
        for s in socks:
            s.close()
    return (after - before) / n


def fulcrum_endpoints() -> list[dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{FULCRUM_ADMIN}/endpoints", timeout=2) as r:
        return json.load(r)["endpoints"]


# --- report ----------------------------------------------------------------------------------


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except FileNotFoundError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB"
    except (FileNotFoundError, ValueError, IndexError):
        pass
    return f"{os.cpu_count()} cores ({cpu}){mem}, {platform.system()} {platform.release()}"


def version(argv: list[str]) -> str:
    r = subprocess.run(argv, capture_output=True, text=True)
    return (r.stdout + r.stderr).strip().splitlines()[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fulcrum", default="target/release/fulcrum")
    ap.add_argument("--out", default="bench/RESULTS.md")
    ap.add_argument("--seconds", type=int, default=4, help="length of each load run")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per comparison")
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--sections", default="http,tcp,memory,quality,failover,grpc,websocket,tls", help="comma-separated subset to run")
    ap.add_argument("--idle", type=int, default=8000, help="idle connections for the memory run (file descriptors here are capped at 20000)")
    ap.add_argument("--peer", default="target/release/examples/bench_peer", help="the gRPC and WebSocket peers (examples/bench_peer.rs)")
    ap.add_argument("--splice", action="store_true", help="replace only the sections run in --out, keeping the others")
    ap.add_argument("--raw", help="also write every round's figures to this file")
    args = ap.parse_args()
    if args.raw:
        RAW_LOG[0] = open(args.raw, "w")
    args_seconds[0] = args.seconds
    for tool in ["wrk", "haproxy", "nginx", "h2load"]:
        if not shutil.which(tool):
            log(f"{tool} is missing: run bench/proxy/install.sh")
            return 1

    # On SIGTERM or Ctrl-C, still run the `finally` below and stop every process started here.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    procs = Procs()
    work = Path(tempfile.mkdtemp(prefix="fulcrum-bench-"))
    # NGINX workers run as an unprivileged user when started by root: let them read it.
    work.chmod(0o755)
    (work / "big.bin").write_bytes(os.urandom(1 << 20) * 8)  # 8 MiB
    sections: list[str] = []
    try:
        s, c, rounds = args.seconds, args.connections, args.rounds
        start_backends(procs, work)
        start_fulcrum(procs, args.fulcrum, fulcrum_conf(work))
        start_fulcrum(procs, args.fulcrum, fulcrum_conf(work, protocol="TCP"), name="fulcrum-tcp")
        start_haproxy(procs, haproxy_conf(work))
        start_nginx_proxy(procs, nginx_proxy_conf(work))
        http_targets = {
            "direct": f"http://{BACKENDS[0]}/",
            "fulcrum": f"http://127.0.0.1:{PORTS['fulcrum']}/",
            "haproxy": f"http://127.0.0.1:{PORTS['haproxy']}/",
            "nginx": f"http://127.0.0.1:{PORTS['nginx']}/",
        }

        only = set(args.sections.split(","))
        if "http" in only:
            cpu_targets = {
                "direct": (http_targets["direct"], procs.procs["backend0"].pid),
                "fulcrum": (http_targets["fulcrum"], procs.procs["fulcrum"].pid),
                "haproxy": (http_targets["haproxy"], procs.procs["haproxy"].pid),
                "nginx": (http_targets["nginx"], procs.procs["nginx-proxy"].pid),
            }
            log(f"HTTP/1.1 keep-alive, {c} connections")
            ka, ka_rounds = interleaved_cpu(cpu_targets, rounds, lambda u: wrk(u, c, s))
            log(f"HTTP/1.1, a new connection per request, {c} connections")
            nc, nc_rounds = interleaved_cpu(cpu_targets, rounds, lambda u: wrk(u, c, s, headers=["Connection: close"]))
            log("HTTP/2 cleartext clients (prior knowledge), 16 connections x 10 streams")
            h2_targets = {t: cpu_targets[t] for t in ("fulcrum", "haproxy")}
            h2, h2_rounds = interleaved_load(h2_targets, rounds, lambda u: h2load(u, None, 16, 10, s, work))
            sections.append(http_table(ka, nc, h2, [("keep-alive", ratios(ka_rounds)), ("new connection per request", ratios(nc_rounds)), ("HTTP/2 clients, 16 × 10 streams", ratios(h2_rounds))], c, s))

        if "tcp" in only:
            log("TCP bulk: 8 MiB downloads through TCP-mode proxies, 4 connections")
            tcp_targets = {
                "direct": f"http://{BACKENDS[0]}/big",
                "fulcrum": f"http://127.0.0.1:{PORTS['fulcrum-tcp']}/big",
                "haproxy": f"http://127.0.0.1:{PORTS['haproxy-tcp']}/big",
                "nginx": f"http://127.0.0.1:{PORTS['nginx-tcp']}/big",
            }
            tcp_pids = {"direct": "backend0", "fulcrum": "fulcrum-tcp", "haproxy": "haproxy", "nginx": "nginx-proxy"}
            bulk, bulk_rounds = interleaved_cpu({t: (u, procs.procs[tcp_pids[t]].pid) for t, u in tcp_targets.items()}, rounds, lambda u: wrk(u, 4, s))
            sections.append(tcp_table(bulk, ratios(bulk_rounds)))

        if "memory" in only:
            log(f"memory per idle connection, {args.idle} connections")
            mem: dict[str, dict[str, float]] = {}
            for kind, targets in [
                ("http1", [("fulcrum", "fulcrum", "fulcrum"), ("haproxy", "haproxy", "haproxy"), ("nginx", "nginx-proxy", "nginx")]),
                # NGINX 1.22 cannot serve HTTP/1.1 and h2c on one cleartext port.
                ("h2", [("fulcrum", "fulcrum", "fulcrum"), ("haproxy", "haproxy", "haproxy")]),
                ("tcp", [("fulcrum", "fulcrum-tcp", "fulcrum-tcp"), ("haproxy", "haproxy", "haproxy-tcp"), ("nginx", "nginx-proxy", "nginx-tcp")]),
            ]:
                for name, proc_name, port_name in targets:
                    kib = idle_memory(procs.procs[proc_name].pid, PORTS[port_name], args.idle, kind)
                    mem.setdefault(name, {})[kind] = kib
                    log(f"  {kind:<5} {name:<8} {kib:.1f} KiB per connection")
            sections.append(memory_table(mem, args.idle))

        if "quality" in only:
            # Balancing quality: backend 3 answers in 10 ms, the others in 1 ms.
            log("balancing quality: one backend 10x slower")
            for i in range(3):
                procs.stop(f"backend{i}")
            start_backends(procs, work, slow_index=SLOW, base_ms=1.0)
            quality = {}
            for conns in (8, 32):
                for algorithm in ALGORITHMS:
                    procs.stop("fulcrum")
                    start_fulcrum(procs, args.fulcrum, fulcrum_conf(work, algorithm))
                    headers = ["x-user-id: bench"] if algorithm == "ConsistentHash" else []
                    before = {e["address"]: e["requests"] for e in fulcrum_endpoints()}
                    res = wrk(f"http://127.0.0.1:{PORTS['fulcrum']}/work", conns, s, headers=headers)
                    after = {e["address"]: e["requests"] for e in fulcrum_endpoints()}
                    served = {a: after[a] - before.get(a, 0) for a in after}
                    share = served.get(BACKENDS[SLOW], 0) / max(1, sum(served.values()))
                    quality[(conns, f"fulcrum {algorithm}")] = (res, share)
                    log(f"  c={conns} fulcrum {algorithm:<20} p50 {res.p50_ms:.2f} ms p99 {res.p99_ms:.2f} ms, slow share {share:.1%}")
                for balance in ["roundrobin", "leastconn"]:
                    procs.stop("haproxy")
                    start_haproxy(procs, haproxy_conf(work, balance))
                    res = wrk(f"http://127.0.0.1:{PORTS['haproxy']}/work", conns, s)
                    quality[(conns, f"haproxy {balance}")] = (res, None)
                    log(f"  c={conns} haproxy {balance:<20} p50 {res.p50_ms:.2f} ms p99 {res.p99_ms:.2f} ms")
            sections.append(quality_table(quality))

        if "failover" in only:
            # Failover: kill backend 2 of 3 a third of the way into a run.
            log("failover: kill 1 of 3 backends under load")
            procs.stop("fulcrum")
            start_fulcrum(procs, args.fulcrum, fulcrum_conf(work))
            procs.stop("haproxy")
            start_haproxy(procs, haproxy_conf(work))
            failover = {}
            for name, url in list(http_targets.items())[1:]:
                for i in range(3):
                    procs.stop(f"backend{i}")
                start_backends(procs, work)
                time.sleep(0.5)
                out: dict[str, WrkResult] = {}
                t = threading.Thread(target=lambda: out.setdefault("r", wrk(url, 32, 6)))
                t.start()
                time.sleep(2.0)
                killed = time.monotonic()
                procs.stop(f"backend{SLOW}", signal.SIGKILL)
                reroute = None
                if name == "fulcrum":
                    while time.monotonic() - killed < 5:
                        dead = [e for e in fulcrum_endpoints() if e["address"] == BACKENDS[SLOW]]
                        if dead and not dead[0]["healthy"]:
                            reroute = time.monotonic() - killed
                            break
                        time.sleep(0.002)
                t.join(timeout=60)
                failover[name] = (out.get("r"), reroute)
                log(f"  {name:<8} errors {out['r'].errors} of {out['r'].requests}, reroute {reroute}")
            sections.append(failover_table(failover))
            # The sections after this one find all three backends up again.
            for i in range(3):
                procs.stop(f"backend{i}")
            start_backends(procs, work)
        if "grpc" in only or "websocket" in only:
            for i, (g, w) in enumerate(zip(GRPC_BACKENDS, WS_BACKENDS)):
                procs.start(f"grpc{i}", [args.peer, "grpc-server", g, f"g{i + 1}"])
                procs.start(f"ws{i}", [args.peer, "ws-server", w])
            for a in GRPC_BACKENDS + WS_BACKENDS:
                wait_port(a)
            start_fulcrum(procs, args.fulcrum, fulcrum_peer_conf(work, "grpc"), name="fulcrum-grpc")
            start_fulcrum(procs, args.fulcrum, fulcrum_peer_conf(work, "ws"), name="fulcrum-ws")
            procs.start("haproxy-peers", ["haproxy", "-db", "-f", str(haproxy_peer_conf(work))])
            wait_port(f"127.0.0.1:{PORTS['haproxy-grpc']}")

        if "grpc" in only:
            body = grpc_body(work)
            targets = {
                "direct": (f"http://{GRPC_BACKENDS[0]}/test.Echo/Unary", procs.procs["grpc0"].pid),
                "fulcrum": (f"http://127.0.0.1:{PORTS['fulcrum-grpc']}/test.Echo/Unary", procs.procs["fulcrum-grpc"].pid),
                "haproxy": (f"http://127.0.0.1:{PORTS['haproxy-grpc']}/test.Echo/Unary", procs.procs["haproxy-peers"].pid),
            }
            grpc, grpc_ratios = {}, []
            for conns, streams in [(1, 64), (16, 10)]:
                log(f"gRPC unary over h2c, {conns} connection(s) x {streams} streams")
                grpc[(conns, streams)], rounds_ = interleaved_load(targets, rounds, lambda u: h2load(u, body, conns, streams, s, work))
                grpc_ratios.append((f"{conns} × {streams}", ratios(rounds_)))
            sections.append(grpc_table(grpc, grpc_ratios))

        if "websocket" in only:
            targets = {
                "direct": (f"ws://{WS_BACKENDS[0]}/", None),
                "fulcrum": (f"ws://127.0.0.1:{PORTS['fulcrum-ws']}/", procs.procs["fulcrum-ws"].pid),
                "haproxy": (f"ws://127.0.0.1:{PORTS['haproxy-ws']}/", procs.procs["haproxy-peers"].pid),
            }
            log("WebSocket echo, 16 connections")
            ws, ws_rounds = interleaved_load(targets, rounds, lambda u: ws_load(args.peer, u, 16, s))
            sections.append(ws_table(ws, ratios(ws_rounds)))

        if "tls" in only:
            f_conf, h_conf, n_conf = tls_confs(work)
            start_fulcrum(procs, args.fulcrum, f_conf, name="fulcrum-tls")
            procs.start("haproxy-tls", ["haproxy", "-db", "-f", str(h_conf)])
            procs.start("nginx-tls", ["nginx", "-c", str(n_conf), "-p", str(n_conf.parent)])
            for t in ("haproxy-tls", "nginx-tls"):
                wait_port(f"127.0.0.1:{PORTS[t]}")
            targets = {t: (f"https://127.0.0.1:{PORTS[t + '-tls']}/", procs.procs[t + "-tls"].pid) for t in ("fulcrum", "haproxy", "nginx")}
            log(f"HTTPS keep-alive, {c} connections")
            ka, ka_rounds = tls_load(targets, rounds, c, s, close=False)
            log(f"HTTPS, a full handshake per request, {c} connections")
            hs, hs_rounds = tls_load(targets, rounds, c, s, close=True)
            sections.append(tls_table(ka, hs, [("HTTPS keep-alive", ratios(ka_rounds)), ("full handshake per request", ratios(hs_rounds))], c, s))
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)

    if args.splice:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from splice import splice  # noqa: E402

        for section in sections:
            splice(Path(args.out), section)
        log(f"updated {len(sections)} section(s) of {args.out}")
        return 0

    header = f"""# Proxy benchmarks

Measured by `make bench-proxy` (`bench/proxy/run.py`), on {machine()}.
Everything runs on this one machine over loopback: wrk ({version(['wrk', '-v'])}), the proxies and
the backends (NGINX instances, one process each, on 127.0.0.2-4) share its cores, so the
figures compare the proxies with each other, not with a dedicated load-balancer host.
Every proxy runs two worker threads or processes and balances round robin over the same
three backends with keep-alive connections to them. Runs are {args.seconds} s each and
interleaved over {args.rounds} rounds; the tables show the medians.

Versions: fulcrum {version([args.fulcrum, '--version'])}, {version(['haproxy', '-v'])}, {version(['nginx', '-v'])}.
"""
    notes = Path(__file__).with_name("notes.md")
    if notes.exists():
        sections.append(notes.read_text())
    Path(args.out).write_text(header + "\n" + "\n".join(sections))
    log(f"wrote {args.out}")
    return 0


def tls_table(ka: dict[str, LoadResult], hs: dict[str, LoadResult], ratio_rows: list, conns: int, seconds: int) -> str:
    rows = [
        "## TLS termination",
        "",
        f"`wrk -t1 -c{conns} -d{seconds}s` over HTTPS (OpenSSL client, TLS 1.3, X25519, no session resumption) to",
        "Fulcrum (rustls with ring), HAProxy and NGINX (OpenSSL), each with two workers and the same ECDSA P-256",
        "certificate, in front of the same backends: keep-alive (left), and `Connection: close` so that every",
        "request is a new connection and a full handshake (right: handshakes per second). CPU is the proxy",
        "process's user and system time per request, from `/proc/<pid>/stat`.",
        "",
        "| target | keep-alive req/s | p99 | CPU µs/req | handshakes/s | p99 | CPU µs/handshake | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in ka:
        a, b = ka[t], hs[t]
        rows.append(
            f"| {t} | {a.rate:,.0f} | {a.p99_ms:.2f} ms | {a.cpu_us:.1f} | {b.rate:,.0f} | {b.p99_ms:.2f} ms | {b.cpu_us:.1f} | {a.errors + b.errors} |"
        )
    rows += ratio_table(ratio_rows)
    return "\n".join(rows) + "\n"


def grpc_table(runs: dict[tuple[int, int], dict[str, LoadResult]], ratio_rows: list) -> str:
    rows = [
        "## gRPC unary over HTTP/2 cleartext",
        "",
        "h2load (`-m` concurrent streams per connection) sends `test.Echo/Unary` (a 16-byte payload) to three tonic",
        "servers (`examples/bench_peer.rs`), directly to one of them or through each proxy balancing round robin per",
        "call: Fulcrum with `appProtocol: GRPC`, HAProxy with `proto h2` on both sides. CPU is the proxy process's",
        "(or, for direct, the server's) user and system time per call, from `/proc/<pid>/stat`.",
        "",
        "| connections × streams | target | calls/s | p50 | p99 | CPU µs/call | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (c, m), res in runs.items():
        for name, r in res.items():
            rows.append(f"| {c} × {m} | {name} | {r.rate:,.0f} | {r.p50_ms:.2f} ms | {r.p99_ms:.2f} ms | {r.cpu_us:.1f} | {r.errors} |")
    rows += ratio_table(ratio_rows, "calls/s")
    return "\n".join(rows) + "\n"


def ws_table(res: dict[str, LoadResult], ratio: dict[str, float]) -> str:
    rows = [
        "## WebSocket echo through a tunnel",
        "",
        "16 WebSocket connections (tokio-tungstenite, `examples/bench_peer.rs`), each sending a 64-byte message and",
        "awaiting its echo, back to back; echo servers on 127.0.0.2-4. Fulcrum in HTTP mode, HAProxy in `mode http`:",
        "both balance the upgrade request, then copy bytes. CPU is the proxy process's time per echoed message.",
        "",
        "| target | messages/s | p50 | p99 | CPU µs/message | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in res.items():
        cpu = "" if r.cpu_us != r.cpu_us else f"{r.cpu_us:.1f}"
        rows.append(f"| {name} | {r.rate:,.0f} | {r.p50_ms:.3f} ms | {r.p99_ms:.3f} ms | {cpu} | {r.errors} |")
    rows += ratio_table([("WebSocket echo", ratio)], "messages/s")
    return "\n".join(rows) + "\n"


def http_table(ka: dict[str, WrkResult], nc: dict[str, WrkResult], h2: dict[str, LoadResult], ratio_rows: list, conns: int, seconds: int) -> str:
    lines = [
        "## HTTP/1.1, small responses",
        "",
        f"`wrk -t1 -c{conns} -d{seconds}s --latency`, keep-alive and `Connection: close` (a new connection per request). "
        "CPU is the process's (or its workers') user and kernel time per request, from `/proc/<pid>/stat` around each run; "
        "\"direct\" is one backend without a proxy (its CPU is the backend's).",
        "",
        "| target | keep-alive req/s | p50 | p99 | user µs/req | kernel µs/req | new-connection req/s | p99 | user µs/req | kernel µs/req | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in ka:
        a, b = ka[t], nc[t]
        lines.append(
            f"| {t} | {a.rps:,.0f} | {a.p50_ms:.2f} ms | {a.p99_ms:.2f} ms | {a.user_us:.1f} | {a.sys_us:.1f} "
            f"| {b.rps:,.0f} | {b.p99_ms:.2f} ms | {b.user_us:.1f} | {b.sys_us:.1f} | {a.errors + b.errors} |"
        )
    lines += [
        "",
        "HTTP/2 cleartext clients (prior knowledge) on the same port, `h2load -c16 -m10` GETs (NGINX 1.22 cannot serve",
        "h2c next to HTTP/1.1 on one port; the endpoints are spoken to over HTTP/1.1):",
        "",
        "| target | req/s | p50 | p99 | user µs/req | kernel µs/req | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for t, r in h2.items():
        lines.append(f"| {t} | {r.rate:,.0f} | {r.p50_ms:.2f} ms | {r.p99_ms:.2f} ms | {r.user_us:.1f} | {r.sys_us:.1f} | {r.errors} |")
    lines += ratio_table(ratio_rows)
    return "\n".join(lines) + "\n"


def tcp_table(bulk: dict[str, WrkResult], ratio: dict[str, float]) -> str:
    lines = [
        "## TCP bulk throughput",
        "",
        "8 MiB HTTP downloads carried by TCP-mode proxies (fulcrum `protocol: TCP`, HAProxy `mode tcp`, NGINX `stream`), `wrk -t1 -c4`.",
        "",
        "| target | MB/s | share of direct | user µs/download | kernel µs/download |",
        "|---|---:|---:|---:|---:|",
    ]
    d = bulk["direct"].transfer_mb_s or 1
    for t, r in bulk.items():
        lines.append(f"| {t} | {r.transfer_mb_s:,.0f} | {r.transfer_mb_s / d:.0%} | {r.user_us:,.0f} | {r.sys_us:,.0f} |")
    lines += ratio_table([("TCP bulk", ratio)], "downloads/s")
    return "\n".join(lines) + "\n"


def memory_table(mem: dict[str, dict[str, float]], n: int) -> str:
    lines = [
        "## Memory per idle connection",
        "",
        f"Resident memory added by {n:,} idle client connections, divided by {n:,}: HTTP/1.1 keep-alive connections",
        "after one request each, HTTP/2 connections after their preface and SETTINGS (no stream; NGINX 1.22 cannot",
        "serve h2c next to HTTP/1.1 on one port), and TCP-mode connections, each joined to a backend, with nothing sent.",
        "",
        "| proxy | HTTP/1.1 KiB | HTTP/2 KiB | TCP KiB | HTTP/1.1 MiB per 10k |",
        "|---|---:|---:|---:|---:|",
    ]
    for t, kinds in mem.items():
        cell = lambda k: f"{kinds[k]:.1f}" if k in kinds else "—"
        per10k = f"{kinds['http1'] * 10000 / 1024:.0f}" if "http1" in kinds else "—"
        lines.append(f"| {t} | {cell('http1')} | {cell('h2')} | {cell('tcp')} | {per10k} |")
    return "\n".join(lines) + "\n"


def quality_table(q: dict) -> str:
    lines = [
        "## Balancing quality: one backend 10x slower",
        "",
        "Backends answer `/work` in 1 ms, one of them in 10 ms (NGINX `echo_sleep`: service time does not grow with concurrency). `wrk -t1` with 8 connections (light load) and 32 (the fast backends busy). The slow share is the part of the requests the slow backend served (from fulcrum's `/endpoints`).",
        "",
        "| proxy and algorithm | connections | req/s | p50 | p99 | slow backend's share |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for (conns, name), (r, share) in q.items():
        s = f"{share:.1%}" if share is not None else "n/a"
        lines.append(f"| {name} | {conns} | {r.rps:,.0f} | {r.p50_ms:.2f} ms | {r.p99_ms:.2f} ms | {s} |")
    lines += [
        "",
        "Under light load the load-aware algorithms keep nearly all requests off the slow backend, so their p99 is the fast backends'. "
        "With 32 connections, PeakEwma's cost (latency × (in flight + 1)) assumes queueing: once the fast backends carry ten times the slow "
        "one's in-flight count, the slow one is cheaper and takes a share; these backends do not queue, so the share shows in p99 while "
        "throughput and p50 stay far ahead of round robin. ConsistentHash sends one client key, so one backend takes everything; it is listed for completeness.",
    ]
    return "\n".join(lines) + "\n"


def failover_table(f: dict) -> str:
    lines = [
        "## Failover: one of three backends killed under load",
        "",
        "`wrk -t1 -c32 -d6s` of idempotent GETs; backend 3 gets SIGKILL after 2 s. Time to reroute is from the kill to fulcrum marking the backend unavailable (`/endpoints`); traffic moves away from it at once through retries.",
        "",
        "| proxy | requests | failed | time to reroute |",
        "|---|---:|---:|---:|",
    ]
    for name, (r, reroute) in f.items():
        rr = f"{reroute * 1000:.0f} ms" if reroute is not None else "n/a"
        lines.append(f"| {name} | {r.requests:,} | {r.errors} | {rr} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
