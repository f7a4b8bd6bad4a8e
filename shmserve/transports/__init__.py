"""Transports: each module here defines ``build(dispatcher, args)`` returning an object with
``start()``, ``set_ready()``, ``stop()`` and ``describe() -> dict`` (its member of the ready
line, spec section 14)."""
import importlib

NAMES = ("shm", "unix", "tcp", "http")
# Earlier spellings that scripts may still pass: the Unix socket transport was "uds".
ALIASES = {"uds": "unix"}


def canonical(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in NAMES:
        raise ValueError(f"unknown transport {name!r}; available: {', '.join(NAMES)}")
    return name


def load(name: str, dispatcher, args):
    return importlib.import_module(f"{__name__}.{canonical(name)}").build(dispatcher, args)
