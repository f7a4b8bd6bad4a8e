"""Measurements: cells merged over repetitions, the C floor, the Go driver, the in-process
model calls; and a stored run's cells read back (Results.from_report)."""
from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import numpy as np
from hdrh.histogram import HdrHistogram

from .plan import (BENCH, GOBENCH, HIST_ARGS, MIN_CALLS, MODEL_START_TIMEOUT, PINGPONG, PYTHON,
                   ROOT, BenchError, Config, ModelSection, bench_cpus)


class Cell:
    """One (target, op, size, conc) measurement, merged over repetitions."""

    def __init__(self, target: str, op: str, size: int, conc: int):
        self.target, self.op, self.size, self.conc = target, op, size, conc
        self.hist = HdrHistogram(*HIST_ARGS)
        self.elapsed_ns = 0
        self.units = 1
        self.cpu_s: dict[str, float] = {}  # only for cells the Go driver measured
        self.reps: list[dict] = []

    def add(self, hist: HdrHistogram, elapsed_ns: int, units: int = 1,
            cpu_s: dict | None = None) -> None:
        self.hist.add(hist)
        self.elapsed_ns += elapsed_ns
        self.units = units
        for side, seconds in (cpu_s or {}).items():
            self.cpu_s[side] = self.cpu_s.get(side, 0.0) + seconds
        self.reps.append({"p50_us": hist.get_value_at_percentile(50) / 1e3,
                          "per_s": hist.get_total_count() * units / elapsed_ns * 1e9})

    def p(self, percentile: float) -> float:
        """Latency percentile in µs."""
        return self.hist.get_value_at_percentile(percentile) / 1e3

    @property
    def per_s(self) -> float:
        """Calls (or, for batches, units) per second over all repetitions."""
        return self.hist.get_total_count() * self.units / self.elapsed_ns * 1e9

    def cores(self, side: str) -> float | None:
        """CPUs kept busy on one side during the measured windows."""
        return self.cpu_s[side] / self.elapsed_ns * 1e9 if side in self.cpu_s else None

    def summary(self) -> dict:
        h = self.hist
        return {"target": self.target, "op": self.op, "size": self.size, "conc": self.conc,
                "count": h.get_total_count(), "units_per_call": self.units,
                "p50_us": self.p(50), "p90_us": self.p(90), "p99_us": self.p(99),
                "p999_us": self.p(99.9), "max_us": h.get_max_value() / 1e3,
                "mean_us": h.get_mean_value() / 1e3, "per_s": self.per_s,
                "client_cores": self.cores("client"), "server_cores": self.cores("server"),
                "reps": self.reps,
                "hist": h.encode().decode()}


    @classmethod
    def from_summary(cls, summary: dict) -> "Cell":
        """The cell a stored run's ``summary()`` describes, histogram and all."""
        cell = cls(summary["target"], summary["op"], summary["size"], summary["conc"])
        cell.hist = HdrHistogram.decode(summary["hist"])
        cell.units = summary["units_per_call"]
        cell.elapsed_ns = round(summary["count"] * cell.units / summary["per_s"] * 1e9)
        for side in ("client", "server"):
            if summary[f"{side}_cores"] is not None:
                cell.cpu_s[side] = summary[f"{side}_cores"] * cell.elapsed_ns / 1e9
        cell.reps = list(summary["reps"])
        return cell


class Results:
    def __init__(self):
        self.cells: dict[tuple, Cell] = {}

    @classmethod
    def from_report(cls, report: dict) -> "Results":
        """A stored run's results (its JSON), for judging goals or rewriting its report."""
        results = cls()
        for summary in report["cells"]:
            cell = Cell.from_summary(summary)
            results.cells[cell.target, cell.op, cell.size, cell.conc] = cell
        return results

    def cell(self, target: str, op: str, size: int, conc: int) -> Cell:
        key = (target, op, size, conc)
        if key not in self.cells:
            self.cells[key] = Cell(*key)
        return self.cells[key]

    def get(self, target: str, op: str, size: int, conc: int) -> Cell | None:
        return self.cells.get((target, op, size, conc))


def run_floor(results: Results, config: Config, tmp: Path, rng: random.Random) -> None:
    cpus = bench_cpus()
    placements = {"floor-spin": ("spin", cpus[:2]), "floor-sem-1cpu": ("sem", cpus[:1] * 2),
                  "floor-sem-2cpu": ("sem", cpus[:2])}
    # The spin floor at every concurrency too: the most this machine moves with that many
    # requests in flight, for the msgs/s columns. Blocking hand-offs are one at a time.
    runs = [(key, size, conc) for key, (mode, pin) in placements.items() if len(pin) == 2
            for size in config.sizes for conc in (config.concs if mode == "spin" else (1,))]
    rng.shuffle(runs)
    samples = tmp / "floor.bin"
    for key, size, conc in runs:
        mode, pin = placements[key]
        proc = subprocess.run([str(PINGPONG), "--mode", mode, "--size", str(size), "--seconds",
                               str(config.floor_seconds), "--warmup-seconds",
                               str(config.floor_seconds / 5), "--samples", str(samples),
                               "--cpus", f"{pin[0]},{pin[1]}", "--inflight", str(conc)],
                              capture_output=True, text=True, timeout=60)
        if proc.returncode:
            raise BenchError(f"{key} {size} B x{conc} failed: {proc.stderr.strip()}")
        info = json.loads(proc.stdout)
        hist = HdrHistogram(*HIST_ARGS)
        # Record each distinct latency once with its count: millions of samples, a few
        # thousand distinct values.
        values, counts = np.unique(np.fromfile(samples, np.uint32), return_counts=True)
        for value, count in zip(values.tolist(), counts.tolist()):
            hist.record_value(max(value, 1), count)
        results.cell(key, "echo", size, conc).add(hist, info["elapsed_ns"])


def echo_cells(config: Config, keys: list[str]) -> list[dict]:
    return [{"target": key, "op": "echo", "size": size, "conc": conc}
            for key in keys for size in config.sizes for conc in config.concs]


def run_go(results: Results, config: Config, targets: dict, cells: list[dict],
           rng: random.Random) -> None:
    cells = list(cells)
    rng.shuffle(cells)
    used = {c["target"] for c in cells}
    plan = {"targets": {k: v for k, v in targets.items() if k in used}, "cells": cells,
            "warmup_ms": config.warmup_ms, "measure_ms": config.measure_ms,
            "min_calls": MIN_CALLS}
    budget = len(cells) * (config.warmup_ms + config.measure_ms) / 1e3 + 120
    try:
        proc = subprocess.run([str(GOBENCH)], input=json.dumps(plan), capture_output=True,
                              text=True, timeout=budget)
    except subprocess.TimeoutExpired:
        raise BenchError(f"Go driver still running after {budget:.0f} s: a server hangs") \
            from None
    if proc.returncode:
        raise BenchError(f"Go driver failed:\n{proc.stderr.strip()}")
    for line in proc.stdout.splitlines():
        r = json.loads(line)
        if r["errors"]:
            raise BenchError(f"{r['target']} {r['op']} {r['size']} B x{r['conc']}: "
                             f"{r['errors']} failed call(s), first: {r['first_error']}")
        if not r["count"]:
            raise BenchError(f"{r['target']} {r['op']} {r['size']} B x{r['conc']}: no call "
                             "completed in the measuring window")
        results.cell(r["target"], r["op"], r["size"], r["conc"]).add(
            HdrHistogram.decode(r["hist"]), r["elapsed_ns"], r["units"],
            {"client": r["client_cpu_s"], "server": r["server_cpu_s"]})


def run_inprocess(results: Results, config: Config, section: ModelSection) -> None:
    proc = subprocess.run([PYTHON, str(BENCH / "inprocess.py"), *section.inprocess_args,
                           "--seconds", str(config.model_seconds)],
                          capture_output=True, text=True, timeout=MODEL_START_TIMEOUT, cwd=ROOT)
    if proc.returncode:
        raise BenchError(f"in-process {section.key} baseline failed:\n"
                         f"{proc.stderr.strip()[-2000:]}")
    for m in json.loads(proc.stdout.splitlines()[-1])["measurements"]:
        results.cell(f"inprocess-{section.key}", m["op"], m["size"], 1).add(
            HdrHistogram.decode(m["hist"]), m["elapsed_ns"], m["units"])
