"""The ready line (spec/PROTOCOL.md section 14): the one JSON line a server prints on stdout
once it serves. ``ready_line`` writes it and ``parse_ready`` reads it; nothing else in Python
knows its shape (goclient/sidecar is the Go side)."""
from __future__ import annotations

import dataclasses
import json

READY_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Ready:
    pid: int
    model: dict
    # transport name (shm, unix, tcp, http) -> {"address": ..., and its details}
    transports: dict[str, dict]
    metrics: str | None = None  # the Prometheus /metrics URL, when metrics are served

    def address(self, transport: str) -> str:
        """The address a client dials for ``transport`` (shm://NAME, unix://PATH,
        tcp://HOST:PORT, or the HTTP base URL)."""
        try:
            return self.transports[transport]["address"]
        except KeyError:
            raise KeyError(f"the server does not serve {transport!r}; it serves "
                           f"{', '.join(self.transports) or 'nothing'}") from None

    def __getitem__(self, transport: str) -> dict:
        return self.transports[transport]


def ready_line(pid: int, model: dict, transports: dict[str, dict],
               metrics: str | None = None) -> str:
    line = {"event": "ready", "ready_version": READY_VERSION, "pid": pid, "model": model,
            "transports": transports}
    if metrics is not None:
        line["metrics"] = metrics
    return json.dumps(line)


def parse_ready(line: str) -> Ready:
    """Raises ValueError for anything that is not a ready line this reader understands."""
    try:
        message = json.loads(line)
    except ValueError:
        raise ValueError(f"not a ready line (not JSON): {line.strip()[:200]!r}") from None
    if not isinstance(message, dict) or message.get("event") != "ready":
        raise ValueError(f"not a ready line: {line.strip()[:200]!r}")
    if message.get("ready_version") != READY_VERSION:
        raise ValueError(f"ready line version {message.get('ready_version')!r}; this reader "
                         f"knows {READY_VERSION}")
    transports = message.get("transports")
    if not isinstance(transports, dict) or not all(
            isinstance(t, dict) and isinstance(t.get("address"), str) for t in transports.values()):
        raise ValueError(f"ready line without a transports object of addresses: {line.strip()[:200]!r}")
    metrics = message.get("metrics")
    return Ready(pid=int(message["pid"]), model=message.get("model") or {},
                 transports=transports, metrics=metrics if isinstance(metrics, str) else None)
