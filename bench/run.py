"""Transport benchmark: what shmserve's shared-memory ring buys a Go program over a Unix
socket, TCP, HTTP/JSON and gRPC, and how close it gets to a C shared-memory floor.

    make bench          # full run: reference results under bench/results/ (~6 min, 2 cores)
    make bench-quick    # smoke run, a few seconds per transport; results under bench/results/tmp/
    .venv/bin/python bench/run.py --help

One run starts every server, drives each from Go (bench/gobench) and measures, in
repetitions whose cells are shuffled so that noise lands on every transport alike:

- echo over: the shm ring spinning then blocking, the shm ring blocking only, the Unix
  socket and TCP loopback (classic length-prefixed packets), HTTP/JSON under uvicorn (the
  sidecar's own transport), HTTP/JSON under Flask + gunicorn (the classic server), and gRPC
  (grpc-go client, grpcio server); each at every payload size and concurrency;
- ZeroMQ and NNG over ipc:// (bench/servers/mq_echo.py), what teams pick instead, and the
  ring without metrics, to show what they cost;
- the floor: a C two-process shared-memory ping-pong, semaphores and spinning
  (bench/floor/pingpong.c), at every payload size;
- when the CIFAR model is servable: classify latency per transport, batched throughput,
  and the in-process model calls they are judged against (bench/inprocess.py).

Latencies go into HdrHistograms, merged across repetitions. Writes JSON (with machine
info, load, date and commit), a markdown report and PNG plots, and prints the project's
goals as ratios with PASS/FAIL. The parts live in bench/transport_bench/: plan (what is
measured), servers, measure, goals, report; this file only runs them in order.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from transport_bench.goals import goals
from transport_bench.measure import Results, echo_cells, run_floor, run_go, run_inprocess
from transport_bench.plan import (BENCH, ECHO_TRANSPORTS, FULL, GOBENCH, PINGPONG, QUICK, ROOT,
                                  SLOTS, SPIN_US, BenchError, model_sections)
from transport_bench.report import git, machine_info, markdown, plots
from transport_bench.servers import start_servers


# -- main -----------------------------------------------------------------------------------

def check_built() -> None:
    missing = [str(p.relative_to(ROOT)) for p in (PINGPONG, GOBENCH) if not p.exists()]
    if missing:
        raise BenchError(f"missing {', '.join(missing)}: run `make bench-build` first")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer sizes, "
                        "concurrencies and repetitions, short cells")
    parser.add_argument("--reps", type=int, help="repetitions (default: 3, quick 1)")
    parser.add_argument("--out-dir", type=Path, help="default bench/results, or "
                        "bench/results/tmp for --quick")
    parser.add_argument("--transports", default=",".join(t.key for t in ECHO_TRANSPORTS),
                        help="echo transports to measure, comma-separated (default: all)")
    parser.add_argument("--skip-models", action="store_true",
                        help="echo only: skip the classify and prompt sections")
    parser.add_argument("--cifar-model", help="LiteRT model to serve (default: the shipped one)")
    parser.add_argument("--cifar-threads", type=int, default=2,
                        help="LiteRT threads, for the server and the in-process baseline alike")
    parser.add_argument("--gemma-checkpoint", help="Gemma checkpoint for the prompt section "
                        "(default: a tiny random one, made once under bench/build)")
    parser.add_argument("--gemma-tokenizer", help="its tokenizer.model")
    parser.add_argument("--gemma-variant", help="its architecture name")
    parser.add_argument("--seed", type=int, default=1, help="cell order shuffle seed")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal FAILs")
    args = parser.parse_args()
    keys = [k.strip() for k in args.transports.split(",") if k.strip()]
    if unknown := set(keys) - {t.key for t in ECHO_TRANSPORTS}:
        parser.error(f"unknown transport(s) {', '.join(sorted(unknown))}; known: "
                     f"{', '.join(t.key for t in ECHO_TRANSPORTS)}")
    config = QUICK if args.quick else FULL
    if args.reps:
        config = dataclasses.replace(config, reps=args.reps)
    out_dir = args.out_dir or (BENCH / "results" / ("tmp" if args.quick else ""))

    def interrupted(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupted)

    check_built()
    started = dt.datetime.now(dt.timezone.utc)
    load_start = os.getloadavg()
    if load_start[0] > 0.5:
        print(f"warning: 1-minute load average {load_start[0]:.1f} on "
              f"{len(os.sched_getaffinity(0))} CPUs: other work will show in these numbers",
              file=sys.stderr)
    results = Results()
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="shmserve-bench-")))
        sections = model_sections(args, args.quick)
        print("starting servers ...", file=sys.stderr, flush=True)
        state = start_servers(stack, config, tmp, sections)
        live = [s for s in sections if not s.skipped]
        for section in sections:
            if section.skipped:
                print(f"SKIP {section.title}: {section.skipped}", file=sys.stderr)
        for key, why in state["skipped"].items():
            print(f"SKIP {key}: {why}", file=sys.stderr)
        keys = [k for k in keys if k not in state["skipped"]]
        cells = echo_cells(config, keys) + [c for s in live for c in s.cells]
        for rep in range(config.reps):
            rng = random.Random(args.seed * 1000 + rep)
            print(f"rep {rep + 1}/{config.reps}: floor, "
                  f"{''.join(f'in-process {s.key}, ' for s in live)}{len(cells)} Go cells ... "
                  f"({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
            run_floor(results, config, tmp, rng)
            for section in live:
                run_inprocess(results, config, section)
            run_go(results, config, state["targets"], cells, rng)
    goal_list = goals(results, next(s for s in sections if s.key == "cifar"))

    commit = git("rev-parse", "--short", "HEAD") or "nocommit"
    report = {
        "date": started.isoformat(timespec="seconds"), "commit": commit,
        "commit_full": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain")),
        "quick": args.quick, "duration_s": round(time.monotonic() - t0, 1),
        "machine": machine_info(),
        "load": {"start": load_start, "end": os.getloadavg()},
        "config": dataclasses.asdict(config) | {"spin_us": SPIN_US, "slots": SLOTS,
                                                "seed": args.seed},
        "servers": state["servers"], "skipped_transports": state["skipped"],
        "models": {s.key: {"title": s.title, "skipped": s.skipped, "server": s.server}
                   for s in sections},
        "goals": [g.as_dict() for g in goal_list],
        "cells": [c.summary() for c in results.cells.values()],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{started:%Y-%m-%d}-{commit}"
    (stem.with_suffix(".json")).write_text(json.dumps(report, indent=1) + "\n")
    (stem.with_suffix(".md")).write_text(markdown(report, results, goal_list, config, sections, stem.name))
    plots(results, config, stem)
    latest = out_dir / "latest"
    shutil.copyfile(stem.with_suffix(".json"), latest.with_suffix(".json"))
    latest.with_suffix(".md").write_text(markdown(report, results, goal_list, config, sections, "latest"))
    for kind in ("cdf", "throughput"):
        shutil.copyfile(f"{stem}-{kind}.png", f"{latest}-{kind}.png")

    print(markdown(report, results, goal_list, config, sections, stem.name).split("## Plots")[0])
    width = max(len(g.text) for g in goal_list)
    for g in goal_list:
        shown = "n/a" if g.value is None else f"{g.value:.2f}{g.unit}"
        print(f"{g.verdict:4}  {g.text:<{width}}  {shown:>10}  "
              f"(limit {'<=' if g.at_most else '>='} {g.limit:g}{g.unit})")
    print(f"wrote {stem}.json/.md/-cdf.png/-throughput.png and {latest}.* "
          f"in {report['duration_s']} s")
    return 1 if args.strict and any(g.verdict == "FAIL" for g in goal_list) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("bench: interrupted; servers stopped", file=sys.stderr)
        sys.exit(130)
