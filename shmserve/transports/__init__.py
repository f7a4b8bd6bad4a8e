"""Transports: each module here defines ``build(dispatcher, args)`` returning an object with
``start()``, ``set_ready()``, ``stop()`` and ``describe() -> dict``."""
import importlib

NAMES = ("shm", "uds", "tcp", "http")


def load(name: str, dispatcher, args):
    if name not in NAMES:
        raise ValueError(f"unknown transport {name!r}; available: {', '.join(NAMES)}")
    return importlib.import_module(f"{__name__}.{name}").build(dispatcher, args)
