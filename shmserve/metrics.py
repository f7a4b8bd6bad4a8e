"""Prometheus metrics of one server: ``GET /metrics`` on the HTTP transport, or
``--metrics-port`` when HTTP is not served.

Requests are counted where they end (``Request.reply`` with the final frame) into plain
counters behind one lock, and turned into metric families only when scraped: a labelled
prometheus_client metric costs a label lookup and a lock per update, which the stream and HTTP
paths would pay per message. An ECHO answered in C without entering Python is counted but not
timed: the ring's by the native module (read at scrape time), the streams' per batch of them.
"""
from __future__ import annotations

import bisect
import threading
import time

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, InfoMetricFamily)
from prometheus_client.registry import Collector

from . import __version__
from .protocol import ErrorCode, MsgType

# From a ring echo (µs) to a long generation (a minute).
DURATION_BUCKETS = (5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2,
                    2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TYPE_NAMES = {int(t): t.name for t in MsgType}
_CODE_NAMES = {int(c): c.name for c in ErrorCode}


class _Histogram:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.total += value * times

    def buckets(self) -> list[tuple[str, int]]:
        running, out = 0, []
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts):
            running += count
            out.append((bound, running))
        return out


class Recorder:
    """One transport's counts. ``begin`` when a request is read, ``end`` with its outcome
    (0 for a reply, else the error code) just before its final frame is sent."""

    def __init__(self, metrics: "Metrics", transport: str):
        self.transport = transport
        self._lock = metrics._lock
        self.in_flight = 0
        self.requests: dict[tuple[int, int], int] = {}
        self.durations: dict[int, _Histogram] = {}

    def begin(self) -> int:
        with self._lock:
            self.in_flight += 1
        return time.monotonic_ns()

    def inline(self, msg_type: int, count: int) -> None:
        """``count`` replies sent by native code, counted but not timed."""
        with self._lock:
            key = (msg_type, 0)
            self.requests[key] = self.requests.get(key, 0) + count

    def end(self, msg_type: int, code: int, started_ns: int) -> None:
        seconds = (time.monotonic_ns() - started_ns) / 1e9
        with self._lock:
            self.in_flight -= 1
            key = (msg_type, code)
            self.requests[key] = self.requests.get(key, 0) + 1
            histogram = self.durations.get(msg_type)
            if histogram is None:
                histogram = self.durations[msg_type] = _Histogram(DURATION_BUCKETS)
            histogram.observe(seconds)


class Metrics(Collector):
    def __init__(self, model_name: str):
        self._lock = threading.Lock()
        self.model_name = model_name
        self.recorders: dict[str, Recorder] = {}
        self.rings: list = []  # ShmTransport: slots in use, reclaims, native counters
        self.model_calls = _Histogram(DURATION_BUCKETS)
        self.batch_sizes = _Histogram(BATCH_BUCKETS)
        self.stale_objects_removed = 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self._http = None

    def recorder(self, transport: str) -> Recorder:
        return self.recorders.setdefault(transport, Recorder(self, transport))

    def model_call(self, batch: int, seconds: float) -> None:
        with self._lock:
            self.model_calls.observe(seconds)
            self.batch_sizes.observe(batch)

    def serve(self, host: str, port: int) -> int:
        """Exposes /metrics on its own HTTP server (--metrics-port); returns the bound port."""
        self._http, _ = start_http_server(port, host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

    def collect(self):
        requests = CounterMetricFamily("shmserve_requests", "Requests answered, by transport, "
                                       "message type and outcome (OK or the error code name)",
                                       labels=["transport", "type", "outcome"])
        durations = HistogramMetricFamily("shmserve_request_duration_seconds", "From reading a "
                                          "request to sending its final reply (an ECHO "
                                          "answered in native code is not timed)",
                                          labels=["transport", "type"])
        in_flight = GaugeMetricFamily("shmserve_requests_in_flight", "Requests read and not "
                                      "yet answered", labels=["transport"])
        with self._lock:
            for rec in self.recorders.values():
                counts = dict(rec.requests)
                if rec.transport == "shm":
                    echoes = sum(ring.inline_echoes for ring in self.rings)
                    counts[MsgType.ECHO, 0] = counts.get((MsgType.ECHO, 0), 0) + echoes
                for (msg_type, code), n in sorted(counts.items()):
                    requests.add_metric([rec.transport, _TYPE_NAMES.get(msg_type, str(msg_type)),
                                         _CODE_NAMES.get(code, "OK") if code else "OK"], n)
                for msg_type, h in sorted(rec.durations.items()):
                    durations.add_metric([rec.transport, _TYPE_NAMES.get(msg_type, str(msg_type))],
                                         h.buckets(), h.total)
                in_flight.add_metric([rec.transport], rec.in_flight)
            model = HistogramMetricFamily("shmserve_model_call_duration_seconds",
                                          "Time in Model.submit, per call (one batch)")
            model.add_metric([], self.model_calls.buckets(), self.model_calls.total)
            batch = HistogramMetricFamily("shmserve_batch_size", "Requests per model call")
            batch.add_metric([], self.batch_sizes.buckets(), self.batch_sizes.total)
        yield from (requests, durations, in_flight, model, batch)
        info = InfoMetricFamily("shmserve_build", "The server's version and model")
        info.add_metric([], {"version": __version__, "model": self.model_name})
        yield info
        stale = CounterMetricFamily("shmserve_stale_objects_removed", "Objects of a dead "
                                    "server removed at start")
        stale.add_metric([], self.stale_objects_removed)
        yield stale
        if not self.rings:
            return
        ring_info = InfoMetricFamily("shmserve_ring", "Each ring's name, generation and geometry",
                                     labels=["name"])
        slots = GaugeMetricFamily("shmserve_ring_slots_in_use", "Slots a client holds (owner "
                                  "set), as of the last heartbeat", labels=["name"])
        reclaimed = CounterMetricFamily("shmserve_ring_slots_reclaimed", "Slots taken back "
                                        "from dead clients", labels=["name"])
        flooded = CounterMetricFamily("shmserve_ring_flooded_waits", "Waits that found the "
                                      "request semaphore flooded (set high by a writer of "
                                      "the ring's files)", labels=["name"])
        for ring in self.rings:
            g, name = ring.geometry, ring.objects.name
            ring_info.add_metric([name], {"generation": f"{ring.objects.generation:016x}",
                                          "slots": str(g.slot_count),
                                          "slot_request_bytes": str(g.req_capacity),
                                          "slot_reply_bytes": str(g.resp_capacity)})
            slots.add_metric([name], ring.slots_in_use)
            reclaimed.add_metric([name], ring.slots_reclaimed)
            flooded.add_metric([name], ring.flooded_waits)
        yield from (ring_info, slots, reclaimed, flooded)
