"""Models served by shmserve. Each model is one module here that defines ``build(args)``.

``build`` receives the parsed ``shmserve serve`` arguments and returns a ``Model``; heavy
imports (TensorFlow, LiteRT, JAX) happen inside ``build`` so ``shmserve --help`` and the
echo model stay light.
"""
from __future__ import annotations

import importlib
import pkgutil

from ..protocol import MsgType


class Model:
    name = "model"
    handles: frozenset[MsgType] = frozenset()
    # True when handle() returns before every request is answered (work runs on a thread).
    answers_later = False

    def warmup(self) -> None:
        """Run whatever compiles or allocates, before the server reports ready."""

    def handle(self, requests: list) -> None:
        """Answer validated requests (each a type in ``handles``) via ``request.reply``."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"model": self.name}

    def close(self) -> None:
        """Release threads and engines."""


def available() -> list[str]:
    """Names of the model modules, found without importing them."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__)
                  if not m.name.startswith("_") and m.name in _SERVABLE)


# Modules here that are building blocks (engines, tools) rather than servable models.
_SERVABLE = {"echo", "cifar", "gemma"}


def load(name: str, args) -> Model:
    if name not in available():
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}")
    return importlib.import_module(f"{__name__}.{name}").build(args)
