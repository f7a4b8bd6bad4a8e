"""The classic HTTP baseline: Flask ``POST /echo`` (``{"prompt": s}`` -> ``{"echo_prompt": s}``)
under gunicorn's sync worker, the way the pre-shmserve sidecar was deployed.

    python bench/servers/flask_echo.py [--workers N]

Binds 127.0.0.1 on a free port and prints one JSON line, the ready line of spec/PROTOCOL.md section 14 (a ``http`` transport),
once gunicorn accepts connections, like ``shmserve serve`` does. One worker by default: the
shmserve sidecar under test is one Python process too.
"""
from __future__ import annotations

import argparse

from flask import Flask, jsonify, request
from gunicorn.app.base import BaseApplication

from shmserve.ready import ready_line

app = Flask(__name__)


@app.post("/echo")
def echo():
    return jsonify(echo_prompt=request.get_json()["prompt"])


class _Gunicorn(BaseApplication):
    def __init__(self, options: dict):
        self.options = options
        super().__init__()

    def load_config(self):
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self):
        return app


def _announce(server) -> None:
    host, port = server.LISTENERS[0].sock.getsockname()[:2]
    print(ready_line(server.pid, {"model": "echo", "server": "flask"},
                     {"http": {"address": f"http://{host}:{port}", "host": host, "port": port}}),
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    _Gunicorn({"bind": "127.0.0.1:0", "workers": args.workers, "worker_class": "sync",
               "loglevel": "warning", "accesslog": None, "when_ready": _announce}).run()


if __name__ == "__main__":
    main()
