"""The project's performance goals, judged on a run's results."""
from __future__ import annotations

import dataclasses
import statistics

from .measure import Results
from .plan import (BLOCK_PLACEMENTS, CLASSIFY_BATCH, IMAGE, LONG_SPIN_US, SEM_FLOORS,
                   ModelSection, fmt_rate, fmt_us)


@dataclasses.dataclass
class Goal:
    name: str
    text: str
    value: float | None  # the ratio (or rate) checked
    limit: float
    at_most: bool  # True: value <= limit passes
    detail: str
    unit: str = "x"

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "SKIP"
        ok = self.value <= self.limit if self.at_most else self.value >= self.limit
        return "PASS" if ok else "FAIL"

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "verdict": self.verdict}


def goals(results: Results, cifar: ModelSection) -> list[Goal]:
    """Each goal is judged per repetition, on cells measured minutes apart at most, and the
    median over repetitions decides. Merged histograms weigh each repetition by its call
    count, and a closed loop makes the most calls when the machine is fastest: on a shared
    machine whose scheduler switches regimes (a wake-up within one CPU or across two), a
    ratio of merged p50s can pair one regime's numerator with another's denominator."""
    def ratio_goal(name, text, num, dens, limit, at_most, metric="p50_us", unit="x",
                   skipped=None):
        """num over dens, per repetition. Several dens (floors), or a list of nums (one
        transport's placements): the lowest of them each time."""
        nums = num if isinstance(num, list) else [num]
        a_s, bs = [results.get(*n) for n in nums], [results.get(*den) for den in dens]
        if None in a_s or None in bs:
            return Goal(name, text, None, limit, at_most, skipped or "not measured", unit)
        tops = [min(a.reps[i][metric] for a in a_s) for i in range(len(a_s[0].reps))]
        bottoms = [min(b.reps[i][metric] for b in bs) for i in range(len(tops))] if bs \
            else [1e3] * len(tops)  # no denominator: an absolute rate, in k/s
        ratios = [x / y for x, y in zip(tops, bottoms)]
        fmt = fmt_us if metric == "p50_us" else fmt_rate
        what = "p50 µs" if metric == "p50_us" else "per s"
        def names(cells):
            return cells[0][0] if len(cells) == 1 else f"min({', '.join(c[0] for c in cells)})"
        detail = "per rep " + " ".join(f"{r:.2f}" for r in ratios) + f"; {names(nums)} " + \
            " ".join(fmt(x) for x in tops) + (f" vs {names(dens)} " + " ".join(
                fmt(y) for y in bottoms) if bs else "") + f" ({what})"
        return Goal(name, text, statistics.median(ratios), limit, at_most, detail, unit)

    def echo(target, conc=1):
        return (target, "echo", IMAGE, conc)

    batch = IMAGE * CLASSIFY_BATCH
    return [
        ratio_goal("shm-vs-spin-floor", "shm echo p50 at 3072 B <= 1.5x the C spin floor",
                   echo("shm-spin"), [echo("floor-spin")], 1.5, True),
        ratio_goal("shm-vs-spin-floor-0b", "shm echo p50 at 0 B <= 4x the C spin floor at 0 B",
                   ("shm-spin", "echo", 0, 1), [("floor-spin", "echo", 0, 1)], 4.0, True),
        ratio_goal("unix-vs-classic", "Unix socket echo p50 at 3072 B <= 1.0x the classic "
                   "one-client Python server's", echo("unix"), [echo("unix-classic")], 1.0, True),
        ratio_goal("shm-vs-unix", "shm echo p50 at 3072 B >= 8x faster than the Unix socket",
                   echo("unix"), [echo("shm-spin")], 8.0, False),
        ratio_goal("metrics-overhead", "shm echo p50 at 3072 B with metrics on <= 1.03x metrics "
                   "off", echo("shm-spin"), [echo("shm-nometrics")], 1.03, True),
        ratio_goal("shm-vs-zmq", "shm echo p50 at 3072 B >= 10x faster than ZeroMQ over ipc",
                   echo("zmq-ipc"), [echo("shm-spin")], 10.0, False),
        ratio_goal("shm-vs-nng", "shm echo p50 at 3072 B >= 10x faster than NNG over ipc",
                   echo("nng-ipc"), [echo("shm-spin")], 10.0, False),
        ratio_goal("block-vs-sem-floor", "block-only shm echo p50 at 3072 B <= 2x the better "
                   "C semaphore floor", [echo(t) for t in BLOCK_PLACEMENTS],
                   [echo(f) for f in SEM_FLOORS], 2.0, True),
        ratio_goal("shm-throughput", "shm echo at 3072 B, 16 in flight >= 500k msgs/s",
                   echo("shm-spin", 16), [], 500.0, False, "per_s", "k/s"),
        ratio_goal("shm-vs-unix-throughput", "shm echo at 3072 B, 16 in flight >= 5x the Unix "
                   "socket's", echo("shm-spin", 16), [echo("unix", 16)], 5.0, False, "per_s"),
        ratio_goal("classify-vs-inprocess", f"classify p50 over shm (client spin "
                   f"{LONG_SPIN_US:.0f} µs) <= 1.10x in-process predict_one p50",
                   ("cifar-shm-long", "classify", IMAGE, 1),
                   [("inprocess-cifar", "predict_one", IMAGE, 1)], 1.10, True,
                   skipped=cifar.skipped),
        ratio_goal("batch-vs-inprocess", f"CLASSIFY_BATCH of {CLASSIFY_BATCH} over shm >= 90% "
                   f"of in-process batch-{CLASSIFY_BATCH} images/s",
                   ("cifar-shm", "classify_batch", batch, 2),
                   [("inprocess-cifar", "predict_batch", batch, 1)], 0.90, False, "per_s",
                   skipped=cifar.skipped),
    ]
