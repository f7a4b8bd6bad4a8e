"""INFER benchmark: what a generic tensor call costs over the shm ring, against ECHO and
against calling the same model in-process.

    .venv/bin/python bench/infer.py            # results under bench/results/
    .venv/bin/python bench/infer.py --quick    # smoke run (~30 s), results under bench/results/tmp/

For each model entry (ENTRIES below) one server serves it over shm, and the Go load loop of
`shmclient bench` (the same loop for ECHO and INFER, -json output) measures, in repetitions
whose order is shuffled:

- INFER of one request row (identity: float32[1,3072]) against ECHO of 3072 bytes, the
  payload the transport goals are stated at, and against ECHO of as many bytes as the INFER
  body, 1 in flight: goal INFER p50 <= 1.2x the 3072-byte ECHO p50;
- INFER of a full batch (float32[64,3072]) with -c requests in flight, in rows/s, against
  the model's own ``infer`` called in this process on the same array (the model object built
  by the same loader the server uses): goal >= 90%.

Each goal is the median of its per-repetition ratios. Writes JSON (machine, load, date,
commit) and a markdown table. Another model (say a Keras adapter serving a .keras file) is one
more ``Entry``: its server target and options, its input, and the two shapes.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import functools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from shmserve.launch import ServerExited, ServerProcess  # noqa: E402
from run import git, machine_info  # noqa: E402  (bench/run.py: the same facts in every report)

SHMCLIENT = BENCH / "build" / "shmclient"
ECHO_BYTES = 3072
LATENCY_GOAL = 1.2  # INFER p50 / ECHO p50, at most
THROUGHPUT_GOAL = 0.9  # served rows/s / in-process rows/s, at least


@dataclasses.dataclass(frozen=True)
class Entry:
    key: str
    title: str
    target: str  # what `shmserve serve --model` takes
    options: dict[str, str]  # --model-option KEY=VALUE
    input: str
    dtype: str
    single: tuple[int, ...]  # the latency request
    batch: tuple[int, ...]  # the throughput request; dim 0 is its rows

    def array(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.random.default_rng(0).standard_normal(shape).astype(self.dtype)


ENTRIES = (
    Entry("identity", "examples/models/identity.py:identity (y = x)",
          str(ROOT / "examples/models/identity.py") + ":identity", {}, "x", "float32",
          (1, 3072), (64, 3072)),
)


@dataclasses.dataclass(frozen=True)
class Config:
    reps: int
    latency_n: int
    throughput_n: int
    warmup: int
    concurrency: int
    inprocess_seconds: float


FULL = Config(reps=5, latency_n=20000, throughput_n=4000, warmup=1000, concurrency=4,
              inprocess_seconds=1.0)
QUICK = Config(reps=3, latency_n=3000, throughput_n=600, warmup=200, concurrency=4,
               inprocess_seconds=0.2)


class BenchError(RuntimeError):
    pass


def build_shmclient() -> None:
    SHMCLIENT.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["go", "build", "-o", str(SHMCLIENT), "./cmd/shmclient"], cwd=ROOT / "goclient",
                   check=True)


def start_server(entry: Entry, name: str) -> ServerProcess:
    """`shmserve serve` for one entry over shm."""
    # Slots that hold a whole batch each way, so that no reply spans frames; 16 of them
    # (> the concurrency) keep the ring's memory small.
    slot = 1 << (int(np.prod(entry.batch)) * np.dtype(entry.dtype).itemsize + 4096).bit_length()
    argv = ["--model", entry.target, "--transport", "shm", "--slots", "16",
            "--slot-request-bytes", str(slot), "--slot-reply-bytes", str(slot)]
    for key, value in entry.options.items():
        argv += ["--model-option", f"{key}={value}"]
    try:
        return ServerProcess(*argv, name=name, cwd=str(ROOT), ready_timeout=180)
    except (ServerExited, TimeoutError) as exc:
        raise BenchError(f"{entry.key}: server did not start: {exc}") from None


def go_bench(addr: str, n: int, warmup: int, concurrency: int, extra: list[str]) -> dict:
    argv = [str(SHMCLIENT), "bench", "-addr", addr, "-n", str(n), "-warmup", str(warmup),
            "-c", str(concurrency), "-reps", "1", "-json", *extra]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv)}: {done.stderr.strip()}")
    out = json.loads(done.stdout)
    return out["results"][0] | {"request_bytes": out["request_bytes"]}


def inprocess(entry: Entry, array: np.ndarray, seconds: float) -> dict:
    """Closed-loop calls of the model's own infer on ``array``, after a quarter as warm-up."""
    from shmserve.models import build

    model = build(entry.target, {}, dict(entry.options))
    model.warmup()
    inputs = {entry.input: array}
    until = time.perf_counter() + seconds / 4
    while time.perf_counter() < until:
        model.infer(inputs)
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        model.infer(inputs)
        calls += 1
    model.close()
    return {"calls": calls, "calls_per_s": calls / elapsed}


def measure(entry: Entry, config: Config, tmp: Path, rng: random.Random) -> dict:
    single, batch = tmp / f"{entry.key}-single.npy", tmp / f"{entry.key}-batch.npy"
    np.save(single, entry.array(entry.single))
    batch_array = entry.array(entry.batch)
    np.save(batch, batch_array)
    rows = entry.batch[0]
    server = start_server(entry, f"bench-infer-{os.getpid()}-{entry.key}")
    addr = server.ready.address("shm")
    reps = []
    try:
        infer_bytes = go_bench(addr, 1, 0, 1, ["-infer", str(single)])["request_bytes"]
        cells = {
            "infer": lambda: go_bench(addr, config.latency_n, config.warmup, 1, ["-infer", str(single)]),
            "echo": lambda: go_bench(addr, config.latency_n, config.warmup, 1, ["-size", str(ECHO_BYTES)]),
            "echo_same_bytes": lambda: go_bench(addr, config.latency_n, config.warmup, 1,
                                                ["-size", str(infer_bytes)]),
            "infer_batch": lambda: go_bench(addr, config.throughput_n, config.warmup // 10,
                                            config.concurrency, ["-infer", str(batch)]),
            "inprocess_batch": lambda: inprocess(entry, batch_array, config.inprocess_seconds),
        }
        for rep in range(config.reps):
            order = list(cells)
            rng.shuffle(order)
            print(f"{entry.key}: rep {rep + 1}/{config.reps}: {', '.join(order)}", file=sys.stderr,
                  flush=True)
            got = {key: cells[key]() for key in order}
            got["latency_ratio"] = got["infer"]["p50_ns"] / got["echo"]["p50_ns"]
            got["served_rows_per_s"] = got["infer_batch"]["msgs_per_s"] * rows
            got["inprocess_rows_per_s"] = got["inprocess_batch"]["calls_per_s"] * rows
            got["throughput_ratio"] = got["served_rows_per_s"] / got["inprocess_rows_per_s"]
            reps.append(got)
    finally:
        server.cleanup()

    def median(*path):
        return statistics.median(functools.reduce(lambda v, key: v[key], path, r) for r in reps)

    return {
        "key": entry.key, "title": entry.title, "dtype": entry.dtype, "single": entry.single,
        "batch": entry.batch, "infer_bytes": infer_bytes, "concurrency": config.concurrency,
        "infer_p50_us": median("infer", "p50_ns") / 1e3,
        "infer_p99_us": median("infer", "p99_ns") / 1e3,
        "echo_p50_us": median("echo", "p50_ns") / 1e3,
        "echo_same_bytes_p50_us": median("echo_same_bytes", "p50_ns") / 1e3,
        "latency_ratio": median("latency_ratio"),
        "served_rows_per_s": median("served_rows_per_s"),
        "inprocess_rows_per_s": median("inprocess_rows_per_s"),
        "throughput_ratio": median("throughput_ratio"),
        "reps": reps,
    }


def markdown(report: dict) -> str:
    m, load = report["machine"], report["load"]
    lines = [
        "# shmserve INFER benchmark",
        "",
        f"Generated by `bench/infer.py{' --quick' if report['quick'] else ''}` on {report['date']} "
        f"at commit `{report['commit']}`{' (dirty tree)' if report['dirty'] else ''}.",
        "",
        f"- Machine: {m['cpu']}, {m['usable_cpus']} usable CPUs, Linux {m['kernel']}; {m['go']}",
        f"- Load average at start {load['start'][0]:.2f}, at end {load['end'][0]:.2f}",
        f"- {report['config']['reps']} shuffled repetitions; every figure is the median over them",
        "",
        "| model | INFER request | INFER p50 µs | ECHO 3072 B p50 µs | ECHO same bytes p50 µs "
        f"| INFER / ECHO p50 (goal <= {LATENCY_GOAL}) | batch | served rows/s "
        f"| in-process rows/s | served / in-process (goal >= {THROUGHPUT_GOAL:.0%}) |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for e in report["entries"]:
        latency_ok = "PASS" if e["latency_ratio"] <= LATENCY_GOAL else "FAIL"
        throughput_ok = "PASS" if e["throughput_ratio"] >= THROUGHPUT_GOAL else "FAIL"
        lines.append(
            f"| {e['title']} | {e['dtype']}{list(e['single'])}, {e['infer_bytes']} B "
            f"| {e['infer_p50_us']:.1f} | {e['echo_p50_us']:.1f} | {e['echo_same_bytes_p50_us']:.1f} "
            f"| {e['latency_ratio']:.2f}x {latency_ok} | {list(e['batch'])}, {e['concurrency']} in flight "
            f"| {e['served_rows_per_s']:,.0f} | {e['inprocess_rows_per_s']:,.0f} "
            f"| {e['throughput_ratio']:.1%} {throughput_ok} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run; results under tmp/")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", action="append", help="entry keys to run (default: all)")
    args = parser.parse_args()
    config = QUICK if args.quick else FULL
    started, load_start = dt.datetime.now(dt.timezone.utc), os.getloadavg()
    build_shmclient()
    rng = random.Random(args.seed)
    entries = [e for e in ENTRIES if not args.only or e.key in args.only]
    with tempfile.TemporaryDirectory(prefix="shmserve-infer-") as tmp:
        results = [measure(e, config, Path(tmp), rng) for e in entries]
    commit = git("rev-parse", "--short", "HEAD") or "nocommit"
    report = {
        "date": started.isoformat(timespec="seconds"), "commit": commit,
        "commit_full": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain")),
        "quick": args.quick, "machine": machine_info(),
        "load": {"start": load_start, "end": os.getloadavg()},
        "config": dataclasses.asdict(config), "entries": results,
    }
    out_dir = BENCH / "results" / ("tmp" if args.quick else "")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"infer-{started:%Y-%m-%d}-{commit}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        sys.exit(2)
