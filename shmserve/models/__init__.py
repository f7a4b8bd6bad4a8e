"""Finding and building the model to serve: ``--model TARGET``.

TARGET is one of:

- a built-in name (``BUILTIN``) or the name of an installed plugin: an entry point in the
  ``shmserve.models`` group (``[project.entry-points."shmserve.models"]`` in its pyproject);
- ``package.module:attr`` (the gunicorn/uvicorn convention), the module importable;
- ``path/to/file.py:attr``, imported from that file (its folder goes first on ``sys.path`` so
  it can import its neighbours).

``attr`` is a ``shmserve.Model`` instance, a ``Model`` subclass or a factory function returning
one. A class or factory is called with the keyword arguments it names, taken from the serve
options that were given (``model_path``, ``threads``, ...; one left out leaves the factory's
default) and from ``--model-option KEY=VALUE`` (strings).
Every failure is a ``ModelLoadError`` with one line saying which step failed.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import pathlib
import sys

from ..dispatch import check_model
from ..model import Model

ENTRY_POINT_GROUP = "shmserve.models"
# Built-ins are ordinary users of the public API; heavy imports happen inside their modules, so
# only the one that is served pays for TensorFlow, LiteRT or JAX.
BUILTIN = {
    "echo": "shmserve.models.echo:EchoModel",
    "cifar": "shmserve.models.cifar:build",
    "gemma": "shmserve.models.gemma:build",
    "keras": "shmserve.models.keras_model:build",
    "litert": "shmserve.models.litert_model:build",
    "jax": "shmserve.models.jax_model:build",
}


class ModelLoadError(Exception):
    """``--model`` names nothing servable; the message says which step failed."""


def thread_count(threads) -> int:
    """``--threads`` (or a factory's ``threads``) as the adapters take it, checked."""
    count = int(threads)
    if count < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    return count


def available() -> dict[str, str]:
    """Every servable name and what it points at, without importing any of them."""
    found = dict(BUILTIN)
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry.name, entry.value)
    return found


def resolve(target: str):
    """The object TARGET names: a Model, a Model subclass or a factory."""
    plugins = {e.name: e for e in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    if target in BUILTIN:
        target = BUILTIN[target]
    elif target in plugins:
        try:
            return plugins[target].load()
        except Exception as exc:
            raise ModelLoadError(f"plugin {target!r} ({plugins[target].value}) does not load: "
                                 f"{type(exc).__name__}: {exc}") from exc
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise ModelLoadError(f"{target!r} is not a built-in ({', '.join(BUILTIN)}), not an "
                             f"installed plugin, and not MODULE:ATTR or FILE.py:ATTR")
    module = _import(module_name)
    value = module
    for part in attr.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise ModelLoadError(f"{module_name} has no attribute {attr!r}") from None
    return value


def _import(module_name: str):
    if module_name.endswith(".py") or "/" in module_name:
        path = pathlib.Path(module_name).resolve()
        if not path.is_file():
            raise ModelLoadError(f"model file {module_name} does not exist")
        loaded = sys.modules.get(path.stem)
        if getattr(loaded, "__file__", None) == str(path):  # one file, one module object
            return loaded
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.parent))
        sys.modules[path.stem] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(path.stem, None)
            raise ModelLoadError(f"model file {module_name} does not import: "
                                 f"{type(exc).__name__}: {exc}") from exc
        return module
    try:
        return importlib.import_module(module_name)
    except Exception as exc:
        raise ModelLoadError(f"module {module_name} does not import: {type(exc).__name__}: "
                             f"{exc}") from exc


def build(target: str, serve_options: dict, model_options: dict[str, str]) -> Model:
    """Resolve TARGET and build the model, passing the options its factory names."""
    value = resolve(target)
    if isinstance(value, Model):
        if model_options:
            raise ModelLoadError(f"{target} is a ready Model instance; it takes no "
                                 f"--model-option ({', '.join(model_options)})")
        model = value
    elif callable(value):
        model = _call_factory(target, value, serve_options, model_options)
    else:
        raise ModelLoadError(f"{target} is a {type(value).__name__}, not a shmserve.Model, a "
                             f"Model subclass or a factory")
    try:
        check_model(model)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{target} did not give a servable model: {exc}") from exc
    return model


def _call_factory(target: str, factory, serve_options: dict, model_options: dict[str, str]):
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        parameters = {}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    unknown = [k for k in model_options if k not in parameters and not takes_any]
    if unknown:
        raise ModelLoadError(f"{target} takes no option {', '.join(map(repr, unknown))}; it takes "
                             f"{', '.join(n for n in parameters if n not in ('self', 'args')) or 'none'}")
    kwargs = {k: v for k, v in serve_options.items() if k in parameters}
    kwargs.update(model_options)
    try:
        return factory(**kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{target} failed to build the model: {type(exc).__name__}: "
                             f"{exc}") from exc
