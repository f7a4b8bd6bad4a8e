"""The benchmark's goals and report, checked offline: on hand-made cells whose answers are
known, and on the committed reference run (bench/results/latest.json) read back."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import pytest
from hdrh.histogram import HdrHistogram

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "bench"))

from transport_bench.goals import goals  # noqa: E402
from transport_bench.measure import Cell, Results  # noqa: E402
from transport_bench.plan import HIST_ARGS, IMAGE, Config, model_sections  # noqa: E402
from transport_bench.report import markdown  # noqa: E402

REFERENCE = os.path.join(REPO, "bench", "results", "latest.json")


def cell(results: Results, target: str, p50s_us: list[float], conc: int = 1,
         per_s: float = 1000.0) -> None:
    """A cell with one repetition per p50 given, each a histogram of that one latency."""
    c = results.cell(target, "echo", IMAGE, conc)
    for p50 in p50s_us:
        h = HdrHistogram(*HIST_ARGS)
        h.record_value(int(p50 * 1000), 100)
        c.add(h, int(100 / per_s * 1e9))


def sections(skipped: str | None = "not in this run"):
    args = argparse.Namespace(cifar_model=None, cifar_threads=2, gemma_checkpoint=None,
                              gemma_tokenizer=None, gemma_variant=None, skip_models=True)
    found = model_sections(args, quick=True)
    for s in found:
        s.skipped = skipped
    return found


def by_name(goal_list):
    return {g.name: g for g in goal_list}


def test_a_ratio_goal_takes_the_median_over_repetitions_and_the_lower_floor():
    r = Results()
    cell(r, "shm-spin", [2.0, 3.0, 10.0])
    cell(r, "floor-spin", [1.0, 1.0, 1.0])
    cell(r, "unix", [30.0, 30.0, 30.0])
    cell(r, "shm-block", [6.0, 6.0, 6.0])
    cell(r, "shm-block-1cpu", [5.0, 9.0, 3.0])
    cell(r, "floor-sem-1cpu", [2.0, 8.0, 2.0])
    cell(r, "floor-sem-2cpu", [4.0, 4.0, 5.0])
    g = by_name(goals(r, sections()[0]))
    # HdrHistogram keeps 3 significant digits: values are exact to 0.1 %.
    assert g["shm-vs-spin-floor"].value == pytest.approx(3.0, rel=1e-3) and g["shm-vs-spin-floor"].verdict == "FAIL"
    assert g["shm-vs-unix"].value == pytest.approx(10.0, rel=1e-3) and g["shm-vs-unix"].verdict == "PASS"
    # Per repetition the ring's better placement over the lower floor: 5/2, 6/4, 3/2 -> 1.5.
    assert g["block-vs-sem-floor"].value == pytest.approx(1.5, rel=1e-3)
    assert "min(shm-block, shm-block-1cpu) 5.00 6.00 3.00" in g["block-vs-sem-floor"].detail
    assert g["shm-vs-zmq"].verdict == "SKIP" and g["shm-vs-zmq"].detail == "not measured"
    assert g["classify-vs-inprocess"].detail == "not in this run"  # the section's reason


def test_metrics_overhead_goal_passes_at_3_percent_and_fails_above():
    for off, verdict in ((100.0, "PASS"), (96.0, "FAIL")):
        r = Results()
        cell(r, "shm-spin", [100.0 * 1.03 * 100 / 103])  # histogram precision: ~100 µs
        cell(r, "shm-nometrics", [off])
        assert by_name(goals(r, sections()[0]))["metrics-overhead"].verdict == verdict


@pytest.fixture(scope="module")
def reference() -> dict:
    with open(REFERENCE) as f:
        return json.load(f)


def test_the_reference_runs_goals_follow_from_its_own_cells(reference):
    results = Results.from_report(reference)
    cifar = sections(reference["models"]["cifar"]["skipped"])[0]
    recomputed = {g.name: g.as_dict() for g in goals(results, cifar)}
    for stored in reference["goals"]:
        again = recomputed[stored["name"]]
        assert again["verdict"] == stored["verdict"], stored["name"]
        if stored["value"] is not None:
            assert again["value"] == pytest.approx(stored["value"], rel=1e-9), stored["name"]


def test_the_reference_run_has_every_echo_row_at_every_size(reference):
    """The peers users compare against are in the committed run, at every size."""
    results = Results.from_report(reference)
    for target in ("shm-spin", "unix", "zmq-ipc", "nng-ipc", "grpc", "floor-spin"):
        for size in reference["config"]["sizes"]:
            assert results.get(target, "echo", size, 1) is not None, (target, size)


def test_the_report_rewritten_from_stored_json_shows_every_goal_and_row(reference):
    results = Results.from_report(reference)
    fields = {f.name for f in dataclasses.fields(Config)}
    config = Config(**{k: tuple(v) if isinstance(v, list) else v
                       for k, v in reference["config"].items() if k in fields})
    models = sections()
    for s in models:
        s.skipped = reference["models"][s.key]["skipped"] or s.skipped
    goal_list = goals(results, models[0])
    text = markdown(reference, results, goal_list, config, models, "latest")
    assert f"at commit `{reference['commit']}`" in text
    for g in goal_list:
        assert f"| {g.text} |" in text and f"**{g.verdict}**" in text
    assert "| ZeroMQ over ipc://" in text and "| NNG over ipc://" in text
    # A stored cell read back is the cell that was stored.
    for stored in reference["cells"]:
        again = Cell.from_summary(stored).summary()
        for key in ("count", "p50_us", "p99_us", "max_us", "reps", "hist"):
            assert again[key] == stored[key], (stored["target"], key)
        assert again["per_s"] == pytest.approx(stored["per_s"], rel=1e-6)
