"""Start a ``shmserve serve`` child process, wait for its ready line, and clean up after it.

The one launcher of the Python side: the tests, the benchmarks and the soak all start servers
through ``ServerProcess``, so the ready line is read (``shmserve.ready``) and a ring's objects
are removed (``layout.ring_files``) the same way everywhere.
"""
from __future__ import annotations

import os
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time

from . import layout as L
from .ready import Ready, parse_ready


class ServerExited(RuntimeError):
    """The server exited (or printed something else) before its ready line."""


class ServerProcess:
    """``shmserve serve ARGS`` on a ring NAME of its own (a fresh random name by default),
    with its Unix socket at ``socket``; ``command_prefix`` runs it under a wrapper (setpriv,
    nice). stderr goes to a file, so a chatty server can never block on a full pipe;
    ``stderr_text()`` reads it."""

    def __init__(self, *args: str, name: str | None = None, socket: str | None = None,
                 ready_timeout: float = 120.0, env: dict | None = None, cwd: str | None = None,
                 python: str = sys.executable, name_prefix: str = "s",
                 command_prefix: tuple[str, ...] = ()):
        self.name = name or f"{name_prefix}{os.getpid()}-{secrets.token_hex(3)}"
        self.socket = socket or os.path.join(tempfile.gettempdir(),
                                             f"shmserve-run-{self.name}.sock")
        self.argv = [*command_prefix, python, "-m", "shmserve.cli", "serve", "--name", self.name,
                     "--socket", self.socket, *args]
        self._stderr = tempfile.TemporaryFile(mode="w+b")
        self.proc = subprocess.Popen(self.argv, cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=self._stderr, env={**os.environ, **(env or {})})
        try:
            self.ready: Ready = self._wait_ready(ready_timeout)
        except BaseException:
            self.cleanup()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_ready(self, timeout: float) -> Ready:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            readable, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if readable:
                line = self.proc.stdout.readline().decode("utf-8", "replace")
                if line:
                    try:
                        return parse_ready(line)
                    except ValueError as exc:
                        raise ServerExited(f"{exc}\n{self.stderr_text()}") from None
            if self.proc.poll() is not None:
                raise ServerExited(f"server exited {self.proc.returncode} before it was "
                                   f"ready:\n{self.stderr_text()}")
        raise TimeoutError(f"server did not report ready in {timeout:.0f} s:\n"
                           f"{self.stderr_text()}")

    def stderr_text(self, tail: int = 20000) -> str:
        self._stderr.flush()
        size = self._stderr.seek(0, os.SEEK_END)
        self._stderr.seek(max(0, size - tail))
        return self._stderr.read().decode("utf-8", "replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the server and wait for it; returns its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def leftovers(self) -> list[str]:
        """What of this server is still on disk: its ring's files and its socket."""
        return L.ring_files(self.name) + ([self.socket] if os.path.lexists(self.socket) else [])

    def cleanup(self) -> None:
        """Kill the server if it still runs and remove whatever it left, however it ended."""
        self.kill()
        for path in self.leftovers():
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if self.proc.stdout:
            self.proc.stdout.close()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()
