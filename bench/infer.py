"""INFER benchmark: what a generic tensor call costs over the shm ring, against ECHO and
against calling the same model in-process.

    .venv/bin/python bench/infer.py            # results under bench/results/
    .venv/bin/python bench/infer.py --quick    # smoke run (~30 s), results under bench/results/tmp/

For each model entry (ENTRIES below) servers serve it over shm (three processes, which the
repetitions take turns on, each with its own in-process child), and the Go load loop of
`shmclient bench` (the same loop for ECHO and INFER, -json output) measures, in repetitions
whose order is shuffled (the cells one ratio divides run next to each other), 1 in flight unless
said:

- INFER of one request row, against ECHO of 3072 bytes (the payload the transport goals are
  stated at), against ECHO of as many bytes as the INFER body, and against the model's own
  ``infer`` called in-process on the same array (in a child process of the bench, the model
  built by the same loader with the server's options, ``--threads`` included);
- INFER of a full batch with -c requests in flight, in rows/s, against the in-process
  ``infer`` on the same batch.

Each entry names the goals that mean something for it: for the identity model, whose own call
costs nothing, INFER p50 <= 1.2x the 3072-byte ECHO p50 (what the tensor path adds to the
transport); for a model that computes, INFER p50 <= 1.2x its in-process call and served
rows/s >= 90% of in-process. Each goal is the median of its per-repetition ratios. Writes JSON
(machine, load, date, commit) and a markdown table.
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
LATENCY_GOAL = 1.2  # INFER p50 / ECHO p50, or / in-process p50, at most
THROUGHPUT_GOAL = 0.9  # served rows/s / in-process rows/s, at least
GOALS = {  # key: (ratio in each repetition, limit, True when the ratio must stay at or under it)
    "vs_echo": ("INFER / ECHO 3072 B p50", "latency_ratio", LATENCY_GOAL, True),
    "vs_inprocess": ("INFER / in-process p50", "inprocess_latency_ratio", LATENCY_GOAL, True),
    "throughput": ("served / in-process rows/s", "throughput_ratio", THROUGHPUT_GOAL, False),
}


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
    goals: tuple[str, ...]  # keys of GOALS
    cost: int = 1  # scales the request counts down for a model whose call takes milliseconds
    threads: int | None = None  # `serve --threads`, and the same for the in-process model

    def array(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.random.default_rng(0).standard_normal(shape).astype(self.dtype)


KERAS_CIFAR = {"model_path": str(ROOT / "shmserve/assets/cifar10_cnn.keras")}
ENTRIES = (
    Entry("identity", "examples/models/identity.py:identity (y = x)",
          str(ROOT / "examples/models/identity.py") + ":identity", {}, "x", "float32",
          (1, 3072), (64, 3072), ("vs_echo",)),
    Entry("keras-cifar", "Keras adapter, shipped CIFAR-10 .keras (JAX backend)", "keras",
          KERAS_CIFAR, "planar_rgb", "uint8", (1, 3, 32, 32), (64, 3, 32, 32),
          ("vs_inprocess", "throughput"), cost=20),
    Entry("keras-cifar-1thread", "the same, `--threads 1`", "keras",
          KERAS_CIFAR, "planar_rgb", "uint8", (1, 3, 32, 32), (64, 3, 32, 32),
          ("vs_inprocess", "throughput"), cost=20, threads=1),
)


# Cells each ratio divides, run together in every repetition (in a shuffled order).
RATIO_GROUPS = (("infer", "echo", "inprocess"), ("infer_batch", "inprocess_batch"),
                ("echo_same_bytes",))


@dataclasses.dataclass(frozen=True)
class Config:
    reps: int
    latency_n: int
    throughput_n: int
    warmup: int
    concurrency: int
    inprocess_seconds: float
    processes: int  # server processes, and in-process children, per entry


FULL = Config(reps=9, latency_n=20000, throughput_n=4000, warmup=1000, concurrency=4,
              inprocess_seconds=0.5, processes=3)
QUICK = Config(reps=3, latency_n=3000, throughput_n=600, warmup=200, concurrency=4,
               inprocess_seconds=0.2, processes=1)


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
    if entry.threads is not None:
        argv += ["--threads", str(entry.threads)]
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


class InProcess:
    """The entry's model called in a child process of its own (`--inprocess KEY`), built by the
    loader the server uses with the server's options: a runtime's thread pools are sized once
    per process, so entries that differ in threads cannot share this one."""

    def __init__(self, entry: Entry):
        self.child = subprocess.Popen([sys.executable, __file__, "--inprocess", entry.key],
                                      cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True)
        if self.child.stdout.readline().strip() != "ready":
            self.close()
            raise BenchError(f"{entry.key}: the in-process model did not build")

    def measure(self, array_file: Path, seconds: float) -> dict:
        self.child.stdin.write(f"{seconds} {array_file}\n")
        self.child.stdin.flush()
        line = self.child.stdout.readline()
        if not line:
            raise BenchError("the in-process model exited")
        return json.loads(line)

    def close(self) -> None:
        self.child.stdin.close()
        self.child.wait(timeout=60)


def serve_inprocess(key: str) -> int:
    """The child of InProcess: for each stdin line "SECONDS FILE.npy", closed-loop calls of the
    model's own infer on that array, after a quarter as warm-up; one JSON line each."""
    from shmserve.models import build

    entry = next(e for e in ENTRIES if e.key == key)
    serve = {"threads": entry.threads} if entry.threads is not None else {}
    model = build(entry.target, serve, dict(entry.options))
    model.warmup()
    print("ready", flush=True)
    for line in sys.stdin:
        seconds, path = line.split(maxsplit=1)
        inputs = {entry.input: np.load(path.strip())}
        until = time.perf_counter() + float(seconds) / 4
        while time.perf_counter() < until:
            model.infer(inputs)
        took = []
        start = time.perf_counter()
        while time.perf_counter() - start < float(seconds):
            began = time.perf_counter_ns()
            model.infer(inputs)
            took.append(time.perf_counter_ns() - began)
        print(json.dumps({"calls": len(took), "calls_per_s": len(took) / (sum(took) / 1e9),
                          "p50_ns": statistics.median(took)}), flush=True)
    model.close()
    return 0


def measure(entry: Entry, config: Config, tmp: Path, rng: random.Random) -> dict:
    single, batch = tmp / f"{entry.key}-single.npy", tmp / f"{entry.key}-batch.npy"
    np.save(single, entry.array(entry.single))
    np.save(batch, entry.array(entry.batch))
    rows = entry.batch[0]
    latency_n, throughput_n = config.latency_n // entry.cost, config.throughput_n // entry.cost
    warmup = max(config.warmup // entry.cost, 10)
    reps = []
    # Several server processes and as many in-process children, repetitions taking turns: a
    # process keeps a speed of its own (one-thread Keras batches ran 9.1-9.5k rows/s served
    # and 7.7-9.9k in-process across four fresh processes each), which one pair per run would
    # make the run's ratio.
    servers, models = [], []
    try:
        for k in range(config.processes):
            servers.append(start_server(entry, f"bench-infer-{os.getpid()}-{entry.key}-{k}"))
            models.append(InProcess(entry))
        infer_bytes = go_bench(servers[0].ready.address("shm"), 1, 0, 1,
                               ["-infer", str(single)])["request_bytes"]

        def cells(addr: str, model: InProcess) -> dict:
            return {
                "infer": lambda: go_bench(addr, latency_n, warmup, 1, ["-infer", str(single)]),
                "echo": lambda: go_bench(addr, config.latency_n, config.warmup, 1,
                                         ["-size", str(ECHO_BYTES)]),
                "echo_same_bytes": lambda: go_bench(addr, config.latency_n, config.warmup, 1,
                                                    ["-size", str(infer_bytes)]),
                "infer_batch": lambda: go_bench(addr, throughput_n, max(warmup // 10, 2),
                                                config.concurrency, ["-infer", str(batch)]),
                "inprocess": lambda: model.measure(single, config.inprocess_seconds),
                "inprocess_batch": lambda: model.measure(batch, config.inprocess_seconds),
            }

        for rep in range(config.reps):
            # Each ratio divides cells run back to back: this VM has phases in which every call
            # is ~1.4x slower for seconds at a time, and a ratio of cells far apart in the
            # repetition measures the phase change.
            turn = cells(servers[rep % len(servers)].ready.address("shm"),
                         models[rep % len(models)])
            groups = [list(group) for group in RATIO_GROUPS]
            rng.shuffle(groups)
            order = []
            for group in groups:
                rng.shuffle(group)
                order += group
            print(f"{entry.key}: rep {rep + 1}/{config.reps} (pair {rep % len(servers)}): "
                  f"{', '.join(order)}", file=sys.stderr, flush=True)
            got = {key: turn[key]() for key in order}
            got["latency_ratio"] = got["infer"]["p50_ns"] / got["echo"]["p50_ns"]
            got["inprocess_latency_ratio"] = got["infer"]["p50_ns"] / got["inprocess"]["p50_ns"]
            got["served_rows_per_s"] = got["infer_batch"]["msgs_per_s"] * rows
            got["inprocess_rows_per_s"] = got["inprocess_batch"]["calls_per_s"] * rows
            got["throughput_ratio"] = got["served_rows_per_s"] / got["inprocess_rows_per_s"]
            reps.append(got)
    finally:
        for model in models:
            model.close()
        for server in servers:
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
        "inprocess_p50_us": median("inprocess", "p50_ns") / 1e3,
        "latency_ratio": median("latency_ratio"),
        "inprocess_latency_ratio": median("inprocess_latency_ratio"),
        "goals": list(entry.goals),
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
        f"- {report['config']['reps']} shuffled repetitions, taking turns over "
        f"{report['config']['processes']} server processes and as many in-process ones; every "
        f"figure is the median over them",
        "",
        "| model | INFER request | INFER p50 µs | INFER p99 µs | in-process p50 µs "
        "| ECHO 3072 B p50 µs | ECHO same bytes p50 µs | batch | served rows/s | in-process rows/s |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for e in report["entries"]:
        lines.append(
            f"| {e['title']} | {e['dtype']}{list(e['single'])}, {e['infer_bytes']} B "
            f"| {e['infer_p50_us']:.1f} | {e['infer_p99_us']:.1f} | {e['inprocess_p50_us']:.1f} "
            f"| {e['echo_p50_us']:.1f} | {e['echo_same_bytes_p50_us']:.1f} "
            f"| {list(e['batch'])}, {e['concurrency']} in flight "
            f"| {e['served_rows_per_s']:,.0f} | {e['inprocess_rows_per_s']:,.0f} |")
    lines += ["", "| model | goal | measured | limit | result | per repetition |",
              "|---|---|---:|---:|---|---|"]
    for e in report["entries"]:
        for key in e["goals"]:
            what, ratio, limit, at_most = GOALS[key]
            value = e[ratio]
            ok = value <= limit if at_most else value >= limit
            per_rep = " ".join(f"{r[ratio]:.2f}" for r in e["reps"])
            lines.append(f"| {e['title']} | {what} | {value:.2f}x | {'<=' if at_most else '>='} "
                         f"{limit}x | **{'PASS' if ok else 'FAIL'}** | {per_rep} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run; results under tmp/")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", action="append", help="entry keys to run (default: all)")
    parser.add_argument("--inprocess", metavar="KEY", help=argparse.SUPPRESS)  # InProcess's child
    args = parser.parse_args()
    if args.inprocess:
        return serve_inprocess(args.inprocess)
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
