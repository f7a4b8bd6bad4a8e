"""Long run of the hypothesis properties in tests/test_properties.py.

`make test` runs each property for a few hundred derandomized examples through hypothesis'
search engine. For volume this script feeds the same properties random byte strings through
``fuzz_one_input``, hypothesis' entry point for external fuzzers: the strategies decode each
buffer into arguments and the property body runs unchanged. That skips the engine's
bookkeeping (about half the cost per input), so it reaches a million inputs per property in
minutes rather than hours. Only inputs that decoded into arguments and ran are counted.

    .venv/bin/python bench/fuzz_python.py --examples 100000 \
        --set test_decode_packet_accepts_exactly_what_the_prefix_announces=1000000 \
        --out bench/results/fuzz-python.md

``--engine search`` runs hypothesis' own generator instead, in chunks of fresh seeds.
``--split N`` shares each property's target among N workers (each draws its own buffers and
serves its own ring), so one run of one slow property can use every CPU.
A failing property stops its worker; the failing buffer is saved under bench/results/tmp/
(replay it with ``test.hypothesis.fuzz_one_input(buffer)``), the report carries the
traceback, and the script exits 1.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def property_names() -> list[str]:
    module = load_properties(1)
    return [name for name in dir(module)
            if name.startswith("test_") and hasattr(getattr(module, name), "hypothesis")]


def load_properties(chunk: int):
    # The module reads SHMSERVE_FUZZ_EXAMPLES at import: it sets max_examples per call and
    # turns derandomize off, so every call below draws a new random seed.
    os.environ["SHMSERVE_FUZZ_EXAMPLES"] = str(chunk)
    sys.path[:0] = [os.path.join(REPO, "tests"), REPO]
    return importlib.import_module("test_properties")


def run_property(name: str, examples: int, engine: str, chunk: int, max_seconds: float,
                 worker: int) -> dict:
    import logging
    # Killed with SIGTERM, still unlink the in-process ring the ring property created.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.getLogger("shmserve").setLevel(logging.ERROR)  # one warning per reclaimed slot
    module = load_properties(chunk)
    test = getattr(module, name)
    count = 0
    inner = test.hypothesis.inner_test

    def counted(*args, **kwargs):
        nonlocal count
        count += 1
        return inner(*args, **kwargs)

    test.hypothesis.inner_test = counted
    started = time.monotonic()
    calls, failure, buffer = 0, None, b""
    try:
        while count < examples and time.monotonic() - started < max_seconds:
            calls += 1
            if engine == "search":
                test()
            else:
                buffer = os.urandom(BUFFER_BYTES)
                test.hypothesis.fuzz_one_input(buffer)
    except BaseException:  # the report carries it; the exit status says it
        failure = traceback.format_exc(limit=-8)
        if engine == "buffers":
            os.makedirs(os.path.join(REPO, "bench", "results", "tmp"), exist_ok=True)
            path = os.path.join(REPO, "bench", "results", "tmp", f"{name}.{worker}.failing")
            with open(path, "wb") as f:
                f.write(buffer)
            failure += f"\nfailing buffer saved to {path}\n"
    finally:
        module.close_harness()
    return {"name": name, "examples": count, "seconds": time.monotonic() - started,
            "calls": calls, "failure": failure, "target": examples, "workers": 1}


def merge(shares: list[dict]) -> dict:
    """One property's result from the workers that shared its target."""
    return {"name": shares[0]["name"], "workers": len(shares),
            "examples": sum(r["examples"] for r in shares),
            "target": sum(r["target"] for r in shares),
            "seconds": max(r["seconds"] for r in shares),
            "calls": sum(r["calls"] for r in shares),
            "failure": "\n".join(r["failure"] for r in shares if r["failure"]) or None}


# Enough for the largest argument any property draws (five ring records of up to 400 bytes);
# a buffer that runs short is discarded by hypothesis, not run, and not counted.
BUFFER_BYTES = 8192


HEADER = """# Python property fuzzing (hypothesis)

The properties of tests/test_properties.py, run far beyond the few hundred derandomized
examples `make test` gives each. Inputs are random byte strings decoded by each property's
own strategies through hypothesis' `fuzz_one_input` (unless a run says `--engine search`);
only inputs that decoded and ran the property body are counted. `seconds` is wall time of
the worker that ran the property, so it includes whatever else shared the CPUs.
"""


def source_state() -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "shmserve", "tests"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    return f"{commit}{' + uncommitted changes in shmserve/ or tests/' if dirty else ''}"


def report(results: list[dict], args, wall: float, started: datetime.datetime,
           source: str) -> str:
    import hypothesis
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    lines = [
        f"## Run of {started:%Y-%m-%d %H:%M} UTC",
        "",
        f"- code: {source} (at the start of the run)",
        f"- machine: {cpu}, {os.cpu_count()} CPUs; Python {platform.python_version()}, "
        f"hypothesis {hypothesis.__version__}",
        f"- command: `.venv/bin/python bench/fuzz_python.py {shlex.join(sys.argv[1:])}`",
        f"- engine: {args.engine}; wall time {wall / 60:.1f} min with {args.jobs} worker "
        "process(es)",
        "",
        "| property | target | workers | inputs executed | seconds | inputs/s | result |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        rate = r["examples"] / r["seconds"] if r["seconds"] else 0
        verdict = "FAILED" if r["failure"] else ("passed" if r["examples"] >= r["target"]
                                                 else "passed (stopped at time limit)")
        lines.append(f"| `{r['name']}` | {r['target']:,} | {r['workers']} | {r['examples']:,} | "
                     f"{r['seconds']:.0f} | {rate:,.0f} | {verdict} |")
    total = sum(r["examples"] for r in results)
    lines += ["", f"Total: {total:,} inputs.", ""]
    for r in results:
        if r["failure"]:
            lines += [f"### {r['name']} failed", "", "```", r["failure"].rstrip(), "```", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=1_000_000,
                        help="inputs each property must execute")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=COUNT",
                        help="a different target for one property")
    parser.add_argument("--engine", choices=["buffers", "search"], default="buffers")
    parser.add_argument("--chunk", type=int, default=20_000,
                        help="search engine: max_examples per run (each run is a fresh seed; "
                        "big runs make hypothesis keep a large tree of what it tried)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--split", type=int, default=1, metavar="N",
                        help="share each property's target among N workers")
    parser.add_argument("--only", nargs="*", help="property names (default: all)")
    parser.add_argument("--max-seconds", type=float, default=6 * 3600,
                        help="per-property time limit; a property that hits it is reported "
                        "with the count it reached")
    parser.add_argument("--out", default=None, help="markdown report path")
    parser.add_argument("--append", action="store_true",
                        help="add this run as a new section of --out instead of replacing it")
    args = parser.parse_args()

    names = args.only or property_names()
    targets = {name: args.examples for name in names}
    for item in args.set:
        name, _, count = item.partition("=")
        if name not in targets:
            parser.error(f"--set {item}: no property {name!r}")
        targets[name] = int(count)
    started, started_at, source = time.monotonic(), datetime.datetime.now(datetime.timezone.utc), \
        source_state()
    if args.split < 1:
        parser.error("--split must be at least 1")
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        # Biggest targets first, so the pool does not end on one long straggler.
        futures = {}
        for name in sorted(names, key=lambda n: -targets[n]):
            share, extra = divmod(targets[name], args.split)
            for worker in range(args.split):
                futures[pool.submit(run_property, name, share + (worker < extra), args.engine,
                                    args.chunk, args.max_seconds, worker)] = name
        shares: dict[str, list[dict]] = {name: [] for name in names}
        for future in concurrent.futures.as_completed(futures):
            result = future.result()
            shares[result["name"]].append(result)
            print(f"{result['name']}: {result['examples']:,} inputs in "
                  f"{result['seconds']:.0f} s{' FAILED' if result['failure'] else ''}",
                  flush=True)
    results = [merge(shares[name]) for name in names]
    text = report(results, args, time.monotonic() - started, started_at, source)
    if args.out:
        keep = args.append and os.path.exists(args.out)
        with open(args.out, "a" if keep else "w") as f:
            f.write(("\n" if keep else HEADER + "\n") + text)
    print(text)
    return 1 if any(r["failure"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
