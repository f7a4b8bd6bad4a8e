"""Soak test: millions of ring echoes from several Go client processes, watched from /proc.

    .venv/bin/python bench/soak.py --requests 10000000 --procs 4 --goroutines 8 \
        --out bench/results/soak-$(date +%Y%m%d).md

Starts one `shmserve serve --model echo --transport shm` and --procs `shmclient echo`
processes, each sending its share of --requests from --goroutines goroutines. shmclient makes
every request unique (TEXT #goroutine.i, TEXT naming the process) and compares each reply
with its own request, so a reply routed to the wrong caller counts as a mismatch; the ring
client also checks frame_req_id against the request id of every frame. A call that fails or
times out ends that process with an error: "zero lost" means every process exited 0 having
counted all its replies.

Every --sample seconds it records, for the server and each client: RSS, open fds, threads;
and the ring's doorbell (one increment per request publish for single-frame echoes), which
gives progress and throughput without touching the clients. RSS and fds are judged flat when
the last quarter of the run stays within --rss-slack-mib / --fd-slack of the first quarter
after warm-up. The report is markdown; the exit status is 0 only if every check passed.
"""
from __future__ import annotations

import argparse
import datetime
import mmap
import os
import platform
import re
import shlex
import struct
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from shmserve import layout as L  # noqa: E402
from shmserve.launch import ServerProcess  # noqa: E402

SUMMARY = re.compile(r"(\d+) replies over (\S+) from (\d+) goroutines in (\S+) \(([\d.]+) msgs/s\): "
                     r"(\d+) mismatched")


def proc_stats(pid: int) -> dict | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f)
        return {"rss_kib": int(fields["VmRSS"].split()[0]),
                "threads": int(fields["Threads"]),
                "fds": len(os.listdir(f"/proc/{pid}/fd"))}
    except (FileNotFoundError, ProcessLookupError, KeyError):
        return None


def build_shmclient(out: str) -> str:
    subprocess.run(["go", "build", "-o", out, "./cmd/shmclient"], cwd=os.path.join(REPO, "goclient"),
                   check=True, env={**os.environ, "CGO_ENABLED": "1"})
    return out


def start_server(name: str, socket_path: str, extra: list[str]) -> ServerProcess:
    return ServerProcess("--model", "echo", "--transport", "shm", *extra, name=name,
                         socket=socket_path, cwd=REPO, ready_timeout=60)


class Doorbell:
    def __init__(self, name: str):
        fd = os.open(f"/dev/shm/shmserve.{name}", os.O_RDONLY)
        try:
            self.mm = mmap.mmap(fd, os.fstat(fd).st_size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)

    def read(self) -> int:
        return struct.unpack_from("<Q", self.mm, L.H_DOORBELL)[0]


def ring_objects(name: str) -> list[str]:
    return L.ring_files(name)


def flatness(samples: list[dict], key: str, who: str) -> tuple[float, float, float]:
    """(first-quarter median, last-quarter median, max) of one metric after warm-up."""
    values = [s[who][key] for s in samples if s.get(who)]
    if not values:
        return 0, 0, 0
    # Skip warm-up (a just-exec'ed process, first allocations, pools): the first eighth of
    # the run, and at least the first two samples.
    body = values[min(max(len(values) // 8, 2), len(values) - 1):]
    quarter = max(1, len(body) // 4)
    median = lambda xs: sorted(xs)[len(xs) // 2]
    return median(body[:quarter]), median(body[-quarter:]), max(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10_000_000, help="echo requests in all")
    parser.add_argument("--procs", type=int, default=4, help="shmclient processes")
    parser.add_argument("--goroutines", type=int, default=8, help="goroutines per process")
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--timeout", default="30s", help="per-call deadline (shmclient -timeout)")
    parser.add_argument("--spin", default="50us", help="shmclient -spin")
    parser.add_argument("--text-bytes", type=int, default=0,
                        help="pad each process's echo text to this many bytes; above the "
                        "ring's reply frame (64 KiB) replies span frames with acks")
    parser.add_argument("--server-args", default="", help="extra `shmserve serve` arguments")
    parser.add_argument("--shmclient", default=None, help="prebuilt binary (default: go build)")
    parser.add_argument("--rss-slack-mib", type=float, default=8.0)
    parser.add_argument("--fd-slack", type=int, default=0)
    parser.add_argument("--out", default=None, help="markdown report path")
    parser.add_argument("--note", default="", help="a line for the report (e.g. what else ran)")
    args = parser.parse_args()

    os.makedirs(os.path.join(REPO, "bench", "results", "tmp"), exist_ok=True)
    binary = args.shmclient or build_shmclient(os.path.join(REPO, "bench", "results", "tmp",
                                                            "shmclient"))
    name = f"soak{os.getpid()}"
    socket_path = L.default_socket_path(name)
    server = start_server(name, socket_path, args.server_args.split())
    ready = server.ready
    shares = [args.requests // args.procs + (i < args.requests % args.procs)
              for i in range(args.procs)]
    clients = []
    samples: list[dict] = []
    started = time.monotonic()
    outputs = {}
    try:
        bell = Doorbell(name)
        bell0 = bell.read()
        for i, share in enumerate(shares):
            clients.append(subprocess.Popen(
                [binary, "echo", "-addr", f"shm://{name}", "-c", str(args.goroutines),
                 "-n", str(share), "-timeout", args.timeout, "-spin", args.spin,
                 f"soak-p{i}".ljust(args.text_bytes, ".")],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        next_sample = started
        while any(c.poll() is None for c in clients):
            now = time.monotonic()
            if now >= next_sample:
                sample = {"t": now - started, "doorbell": bell.read() - bell0,
                          "server": proc_stats(server.pid), "objects": len(ring_objects(name))}
                for i, c in enumerate(clients):
                    sample[f"client{i}"] = proc_stats(c.pid) if c.poll() is None else None
                samples.append(sample)
                print(f"{sample['t']:7.0f} s  {sample['doorbell']:>11,} requests  server "
                      f"{sample['server']['rss_kib'] / 1024:.1f} MiB {sample['server']['fds']} fds",
                      flush=True)
                next_sample += args.sample
            time.sleep(min(0.2, max(0.0, next_sample - time.monotonic())))
        elapsed = time.monotonic() - started
        for i, c in enumerate(clients):
            outputs[i] = (c.returncode, *c.communicate())
        final = {"t": elapsed, "doorbell": bell.read() - bell0, "server": proc_stats(server.pid),
                 "objects": len(ring_objects(name))}
        bell.mm.close()
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
        try:
            server_rc = server.stop(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server_rc = server.proc.wait()
    leftovers = ring_objects(name) + ([socket_path] if os.path.exists(socket_path) else [])

    replies = mismatched = 0
    client_rows = []
    for i, (rc, out, err) in sorted(outputs.items()):
        match = SUMMARY.search(out)
        got = int(match.group(1)) if match and rc == 0 else 0
        bad = int(match.group(6)) if match else 0
        replies += got
        mismatched += bad
        client_rows.append((i, shares[i], rc, got, bad, float(match.group(5)) if match else 0.0,
                            err.strip().splitlines()[-1] if err.strip() else ""))

    checks = []

    def check(label: str, ok: bool, detail: str) -> None:
        checks.append((label, ok, detail))

    check("zero lost", replies == args.requests and all(r[2] == 0 for r in client_rows),
          f"{replies:,} of {args.requests:,} replies; client exit codes "
          f"{[r[2] for r in client_rows]}")
    check("zero misrouted", mismatched == 0 and all(r[2] == 0 for r in client_rows),
          f"{mismatched} replies differed from their request; no client reported a "
          "request-id mismatch" if all(r[2] == 0 for r in client_rows) else "see client errors")
    rss_first, rss_last, rss_max = flatness(samples, "rss_kib", "server")
    check("server RSS flat", rss_last - rss_first <= args.rss_slack_mib * 1024,
          f"{rss_first / 1024:.1f} MiB -> {rss_last / 1024:.1f} MiB (max {rss_max / 1024:.1f})")
    fd_first, fd_last, fd_max = flatness(samples, "fds", "server")
    check("server fds flat", fd_last - fd_first <= args.fd_slack and fd_max - fd_first <= 2,
          f"{fd_first} -> {fd_last} (max {fd_max})")
    for i in range(args.procs):
        key = f"client{i}"
        r_first, r_last, r_max = flatness(samples, "rss_kib", key)
        f_first, f_last, f_max = flatness(samples, "fds", key)
        check(f"client {i} RSS and fds flat",
              r_last - r_first <= args.rss_slack_mib * 1024 and f_last - f_first <= args.fd_slack,
              f"RSS {r_first / 1024:.1f} -> {r_last / 1024:.1f} MiB (max {r_max / 1024:.1f}); "
              f"fds {f_first} -> {f_last} (max {f_max})")
    check("ring objects constant during the run", len({s["objects"] for s in samples}) == 1,
          f"{sorted({s['objects'] for s in samples})} objects under /dev/shm")
    check("clean stop leaves nothing", server_rc == 0 and not leftovers,
          f"server exit {server_rc}; leftovers {leftovers}")

    text = report(args, ready, samples, final, elapsed, client_rows, checks)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0 if all(ok for _, ok, _ in checks) else 1


def report(args, ready, samples, final, elapsed, client_rows, checks) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "shmserve", "goclient"],
                           cwd=REPO, capture_output=True, text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    total = sum(r[3] for r in client_rows)
    lines = [
        "# Soak: ring echo, Go clients",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- commit: {commit}{' + uncommitted changes in shmserve/ or goclient/' if dirty else ''}",
        f"- machine: {cpu}, {os.cpu_count()} CPUs, Linux {platform.release()}",
        f"- command: `.venv/bin/python bench/soak.py {shlex.join(sys.argv[1:])}`",
        f"- server: `shmserve serve --model echo --transport shm {args.server_args}`".rstrip() +
        f" ({ready['shm']['slots']} slots), generation {ready['shm']['generation']}",
        f"- clients: {args.procs} `shmclient echo` processes x {args.goroutines} goroutines, "
        f"per-call deadline {args.timeout}, spin {args.spin}, echo text of "
        f"{max(args.text_bytes, 7)} bytes plus the request's suffix",
        *([f"- note: {args.note}"] if args.note else []),
        f"- duration: {elapsed:,.0f} s; {total:,} replies; {total / elapsed:,.0f} requests/s "
        "overall",
        "",
        "## Checks",
        "",
        "| check | result | detail |",
        "|---|---|---|",
    ]
    lines += [f"| {label} | {'PASS' if ok else 'FAIL'} | {detail} |" for label, ok, detail in checks]
    lines += ["", "## Clients", "",
              "| process | requests | exit | replies | mismatched | msgs/s | last stderr line |",
              "|---:|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {i} | {share:,} | {rc} | {got:,} | {bad} | {rate:,.0f} | {err} |"
              for i, share, rc, got, bad, rate, err in client_rows]
    lines += ["", f"## Samples (every {args.sample:g} s, at most 30 rows shown)", "",
              "| t (s) | requests | req/s since last | server RSS MiB | server fds | "
              "server threads | clients RSS MiB | clients fds | /dev/shm objects |",
              "|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    step = max(1, len(samples) // 30)
    shown = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
    previous = None
    for s in shown:
        rate = ((s["doorbell"] - previous["doorbell"]) / (s["t"] - previous["t"])
                if previous and s["t"] > previous["t"] else 0)
        previous = s
        clients = [s.get(f"client{i}") for i in range(args.procs)]
        c_rss = " ".join(f"{c['rss_kib'] / 1024:.1f}" if c else "-" for c in clients)
        c_fds = " ".join(str(c["fds"]) if c else "-" for c in clients)
        server = s["server"] or {"rss_kib": 0, "fds": 0, "threads": 0}
        lines.append(f"| {s['t']:.0f} | {s['doorbell']:,} | {rate:,.0f} | "
                     f"{server['rss_kib'] / 1024:.1f} | {server['fds']} | {server['threads']} | "
                     f"{c_rss} | {c_fds} | {s['objects']} |")
    lines += ["", "`requests` is the ring's doorbell counter: one increment per published "
              "request, plus one per acknowledged frame when replies span frames.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
