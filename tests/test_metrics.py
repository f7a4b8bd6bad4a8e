"""Prometheus metrics: scraped after real traffic from the Go client, parsed with
prometheus_client's own text parser, counts checked against what was sent."""
from __future__ import annotations

import subprocess
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shmserve import tensors
from shmserve.client import PacketClient, RingClient, ServerError
from shmserve.dispatch import Request
from shmserve.metrics import Metrics
from shmserve.protocol import ErrorCode, MsgType

MEASURED, WARMUP = 300, 20


def scrape(url: str) -> dict:
    """{(sample name, frozenset of labels): value} of one scrape."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def requests_total(samples: dict, **labels) -> float:
    want = set(labels.items())
    return sum(v for (name, got), v in samples.items()
               if name == "shmserve_requests_total" and want <= got)


def go_bench(shmclient: str, address: str) -> None:
    done = subprocess.run([shmclient, "bench", "-addr", address, "-n", str(MEASURED), "-warmup",
                           str(WARMUP), "-reps", "1", "-size", "64"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_counts_by_transport_equal_what_go_sent(start_server, shmclient):
    server = start_server("--model", "echo", "--transport", "shm,unix,tcp,http",
                          "--tcp-port", "0", "--http-port", "0")
    url = server.ready.metrics
    assert url == server.ready.address("http") + "/metrics"
    for transport in ("shm", "unix", "tcp"):
        go_bench(shmclient, server.ready.address(transport))
    samples = scrape(url)
    for transport in ("shm", "unix", "tcp"):
        assert requests_total(samples, transport=transport, type="ECHO", outcome="OK") == \
            MEASURED + WARMUP, transport
        assert samples["shmserve_requests_in_flight", frozenset({("transport", transport)})] == 0
    # Echoes answered in native code (the ring's and the streams') are counted, not timed.
    for transport in ("shm", "unix", "tcp"):
        assert ("shmserve_request_duration_seconds_count",
                frozenset({("transport", transport), ("type", "ECHO")})) not in samples
    name = server.ready["shm"]["name"]
    assert samples["shmserve_ring_info", frozenset({
        ("name", name), ("generation", server.ready["shm"]["generation"]), ("slots", "64"),
        ("slot_request_bytes", "262144"), ("slot_reply_bytes", "65536")})] == 1


def test_errors_are_counted_by_code_and_model_calls_by_batch(start_server):
    server = start_server("--model", "examples/models/regressor.py:build", "--transport",
                          "unix,shm", "--metrics-port", "0")
    assert server.ready.metrics.startswith("http://127.0.0.1:")
    body = bytes(tensors.encode([("x", np.ones((2, 8), np.float32))]))
    client = PacketClient(server.ready["unix"]["path"])
    for _ in range(3):
        assert client.call(MsgType.INFER, body)[0] == MsgType.INFER
    with pytest.raises(ServerError, match="BAD_LENGTH"):
        client.call(MsgType.PROMPT, b"\x00")
    client.close()
    ring = RingClient(server.ready["shm"]["name"])
    with pytest.raises(ServerError, match="BAD_LENGTH"):
        ring.call(MsgType.INFER, b"\x01\x00")
    ring.close()
    samples = scrape(server.ready.metrics)
    assert requests_total(samples, transport="unix", type="INFER", outcome="OK") == 3
    assert samples["shmserve_request_duration_seconds_count",
                   frozenset({("transport", "unix"), ("type", "INFER")})] == 3
    assert requests_total(samples, transport="unix", type="PROMPT",
                          outcome=ErrorCode.BAD_LENGTH.name) == 1
    assert requests_total(samples, transport="shm", type="INFER",
                          outcome=ErrorCode.BAD_LENGTH.name) == 1
    assert samples["shmserve_model_call_duration_seconds_count", frozenset()] == 3
    assert samples["shmserve_batch_size_sum", frozenset()] == 3


def test_a_request_is_counted_before_its_client_can_see_the_answer():
    """A client that scrapes right after its answer finds it counted: the count is taken before
    the final frame goes out, not after (where a scrape could win the race)."""
    metrics = Metrics("m")
    recorder = metrics.recorder("unix")
    seen = []

    class Watched(Request):
        __slots__ = ()

        def _send(self, msg_type, payload, final):
            seen.append((dict(recorder.requests), recorder.in_flight))

    Watched(MsgType.PROMPT, b"", recorder).fail(ErrorCode.BAD_LENGTH, "short")
    Watched(MsgType.ECHO, b"x", recorder).reply(MsgType.ECHO, b"x")
    assert seen == [({(MsgType.PROMPT, ErrorCode.BAD_LENGTH): 1}, 0),
                    ({(MsgType.PROMPT, ErrorCode.BAD_LENGTH): 1, (MsgType.ECHO, 0): 1}, 0)]


def test_no_metrics_without_http_or_a_metrics_port(start_server):
    server = start_server("--model", "echo", "--transport", "shm")
    assert server.ready.metrics is None
