"""The Open Inference Protocol (KServe v2) REST paths on the HTTP transport (spec section
12.1), so that KServe and Triton HTTP clients call the sidecar unchanged.

An infer is encoded as the TensorList an INFER request carries and submitted to the same
dispatcher the ring feeds; the reply TensorList is decoded into the v2 response. Model
metadata is a METADATA request, whose reply is already v2 model metadata."""
from __future__ import annotations

import json
import math

import numpy as np

from .. import __version__, tensors
from ..protocol import ErrorCode, MsgType
from .http import HttpError, _http_error, _json_field, _json_object, _send_body, _send_json

HEADER_LENGTH = b"inference-header-content-length"
EXTENSIONS = ["binary_tensor_data"]


def _parameters(fields: dict, where: str) -> dict:
    value = fields.get("parameters", {})
    if not isinstance(value, dict):
        raise _http_error(ErrorCode.BAD_ARGUMENT, f"{where}field 'parameters' must be an object")
    return value


def _flag(parameters: dict, key: str, where: str, default: bool) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise _http_error(ErrorCode.BAD_ARGUMENT, f"{where}parameter {key!r} must be true or false")
    return value


def _flatten(data: list) -> list:
    """Nested lists in row-major order as one list. Iterative: json bounds the nesting, but
    a deep one should not cost a Python frame per level."""
    flat, pending = [], [iter(data)]
    while pending:
        for item in pending[-1]:
            if isinstance(item, list):
                pending.append(iter(item))
                break
            flat.append(item)
        else:
            pending.pop()
    return flat


def _json_types(dtype: tensors.DType) -> tuple[type, ...]:
    # Exact types: bool is an int to Python, and numpy would turn "1.5" into a float.
    if dtype.name == "BOOL":
        return (bool,)
    if dtype.np.kind in "iu":
        return (int,)
    return (int, float)


def _from_json(data: list, dtype: tensors.DType, shape: list[int], where: str) -> np.ndarray:
    flat = _flatten(data)
    count = math.prod(shape)
    if len(flat) != count:
        raise _http_error(ErrorCode.BAD_TENSOR,
                          f"{where}{len(flat)} values in 'data', shape {shape} holds {count}")
    allowed = _json_types(dtype)
    wrong = next((v for v in flat if type(v) not in allowed), None)
    if wrong is not None:
        raise _http_error(ErrorCode.BAD_DTYPE,
                          f"{where}value {json.dumps(wrong)[:40]} in 'data' is not a {dtype.name}")
    try:
        with np.errstate(over="ignore"):  # a float beyond the dtype's range is inf, as in C
            return np.array(flat, dtype.np).reshape(shape)
    except OverflowError:
        raise _http_error(ErrorCode.BAD_ARGUMENT,
                          f"{where}a value in 'data' is out of range for {dtype.name}") from None


class KServe:
    """The /v2 routes of an ``http.App``, whose ``_submit`` and ``_final`` reach the
    dispatcher."""

    def __init__(self, app):
        self.app = app
        self.name = app.dispatcher.model.name
        # The METADATA reply is the dispatcher's own bytes: read the versions once for routing.
        self.versions = json.loads(app.dispatcher.metadata)["versions"]
        self.server_routes = {("v2",): ("GET", self.server_metadata),
                              ("v2", "health", "live"): ("GET", self.live),
                              ("v2", "health", "ready"): ("GET", self.ready)}
        self.model_routes = {(): ("GET", self.model_metadata), ("ready",): ("GET", self.ready),
                             ("infer",): ("POST", self.infer)}

    @staticmethod
    def serves(path: str) -> bool:
        return path == "/v2" or path.startswith("/v2/")

    @staticmethod
    def error_body(exc: HttpError) -> dict:
        if exc.code is None:
            return {"error": exc.message}
        return {"error": f"{ErrorCode(exc.code).name}: {exc.message}"}

    def route(self, scope):
        """The handler for ``scope``'s method and /v2 path, taking (body, send)."""
        method, path = scope["method"], scope["path"]
        parts = tuple(path.split("/")[1:])
        found = self.server_routes.get(parts)
        if found is None and parts[:2] == ("v2", "models") and len(parts) > 2:
            found = self.model_routes.get(self._model_path(parts[2], parts[3:]))
        if found is None:
            raise HttpError(404, None, f"{method} {path} is not served")
        want, handler = found
        if method != want:
            raise HttpError(405, None, f"{method} {path} is not served; use {want}")
        return lambda body, send: handler(scope, body, send)

    def _model_path(self, name: str, rest: tuple[str, ...]) -> tuple[str, ...]:
        """What follows /v2/models/NAME[/versions/V], once NAME and V are known to be served."""
        if name != self.name:
            raise HttpError(404, None, f"model {name!r} is not served; this server serves "
                            f"{self.name!r}")
        if rest[:1] == ("versions",):
            if len(rest) < 2 or rest[1] not in self.versions:
                version = rest[1] if len(rest) > 1 else ""
                raise HttpError(404, None, f"model {name!r} has no version {version!r}; it has "
                                f"{', '.join(self.versions)}")
            rest = rest[2:]
        return rest

    async def server_metadata(self, scope, body, send):
        await _send_json(send, 200, {"name": "shmserve", "version": __version__,
                                     "extensions": EXTENSIONS})

    async def live(self, scope, body, send):
        await _send_json(send, 200, {"live": True})

    async def ready(self, scope, body, send):
        # The transport is only reachable once the model is loaded (the ready line follows it).
        await _send_json(send, 200, {"ready": True})

    async def model_metadata(self, scope, body, send):
        _, payload = await self.app._final(self.app._submit(MsgType.METADATA, b""))
        await _send_body(send, 200, payload, b"application/json")

    async def infer(self, scope, body, send):
        request, binary = self._split(scope, body)
        request_id = _json_field(request, "id", str) if "id" in request else None
        inputs = _json_field(request, "inputs", list)
        pairs, used = [], 0
        for index, entry in enumerate(inputs):
            name, array, used = self._input(index, entry, binary, used)
            pairs.append((name, array))
        if used != len(binary):
            raise _http_error(ErrorCode.BAD_TENSOR,
                              f"{len(binary) - used} bytes after the JSON header "
                              f"are not claimed by any input's binary_data_size")
        selected = self._outputs(request)
        try:
            encoded = tensors.encode(pairs)
        except ValueError as exc:  # too many tensors, or a name over 255 bytes
            raise _http_error(ErrorCode.BAD_TENSOR, str(exc)) from None
        _, payload = await self.app._final(self.app._submit(MsgType.INFER, encoded))
        await self._respond(send, request_id, tensors.decode(payload), selected)

    @staticmethod
    def _split(scope, body) -> tuple[dict, memoryview]:
        """The JSON header and the binary data after it (binary tensor data extension)."""
        values = [v for k, v in scope["headers"] if k == HEADER_LENGTH]  # ASGI lowercases
        if not values:
            return _json_object(body), memoryview(b"")
        # At most 20 digits: int() refuses a few thousand, and no body is that long anyway.
        if (len(values) > 1 or not values[0].isdigit() or len(values[0]) > 20
                or int(values[0]) > len(body)):
            given = b", ".join(values).decode("latin-1")
            raise _http_error(ErrorCode.BAD_LENGTH,
                              f"Inference-Header-Content-Length {given[:40]!r} is not one "
                              f"length within the {len(body)}-byte body")
        length = int(values[0])
        view = memoryview(body)
        return _json_object(view[:length]), view[length:]

    @staticmethod
    def _input(index: int, entry, binary: memoryview, used: int):
        """One v2 input as (name, array, binary bytes used so far)."""
        if not isinstance(entry, dict):
            raise _http_error(ErrorCode.BAD_ARGUMENT, f"inputs[{index}] must be an object")
        name = _json_field(entry, "name", str, f"inputs[{index}]: ")
        if not name:
            raise _http_error(ErrorCode.BAD_ARGUMENT, f"inputs[{index}]: field 'name' is empty")
        where = f"input {name!r}: "
        shape = _json_field(entry, "shape", list, where)
        if len(shape) > tensors.MAX_RANK or any(
                type(d) is not int or not 0 <= d <= tensors.MAX_DIM for d in shape):
            raise _http_error(ErrorCode.BAD_SHAPE,
                              f"{where}shape {json.dumps(shape)[:80]} needs rank "
                              f"<= {tensors.MAX_RANK} and dims 0..{tensors.MAX_DIM}")
        datatype = _json_field(entry, "datatype", str, where)
        dtype = tensors.BY_NAME.get(datatype)
        if dtype is None:
            raise _http_error(ErrorCode.BAD_DTYPE,
                              f"{where}datatype {datatype[:40]!r} is not served; "
                              f"use one of {', '.join(tensors.BY_NAME)}")
        size = _parameters(entry, where).get("binary_data_size")
        if size is None:
            return name, _from_json(_json_field(entry, "data", list, where), dtype, shape,
                                    where), used
        if type(size) is not int or "data" in entry:
            raise _http_error(ErrorCode.BAD_ARGUMENT,
                              f"{where}binary_data_size must be an int, and "
                              f"the input then has no 'data'")
        want = math.prod(shape) * dtype.size
        if size != want:
            raise _http_error(ErrorCode.BAD_TENSOR,
                              f"{where}binary_data_size {size}, but "
                              f"{dtype.name}{shape} is {want} bytes")
        if used + size > len(binary):
            raise _http_error(ErrorCode.BAD_TENSOR,
                              f"{where}binary data ends at byte {used + size}, "
                              f"past the {len(binary)} bytes after the JSON header")
        array = np.frombuffer(binary[used:used + size], dtype.np).reshape(shape)
        return name, array, used + size

    @staticmethod
    def _outputs(request: dict) -> dict[str, bool] | bool:
        """{output name: send as binary} for a selection, else whether to send all as binary."""
        everything = _flag(_parameters(request, ""), "binary_data_output", "", False)
        if "outputs" not in request:
            return everything
        wanted = _json_field(request, "outputs", list)
        selected: dict[str, bool] = {}
        for index, entry in enumerate(wanted):
            if not isinstance(entry, dict):
                raise _http_error(ErrorCode.BAD_ARGUMENT, f"outputs[{index}] must be an object")
            name = _json_field(entry, "name", str, f"outputs[{index}]: ")
            if name in selected:
                raise _http_error(ErrorCode.BAD_ARGUMENT, f"output {name!r} requested twice")
            selected[name] = _flag(_parameters(entry, f"output {name!r}: "), "binary_data",
                                   f"output {name!r}: ", everything)
        return selected

    async def _respond(self, send, request_id: str | None, outputs, selected) -> None:
        by_name = dict(outputs)
        if isinstance(selected, bool):
            selected = dict.fromkeys(by_name, selected)
        unknown = [name for name in selected if name not in by_name]
        if unknown:
            raise _http_error(ErrorCode.BAD_INPUT,
                              f"no output named {unknown[0]!r}; the model "
                              f"returns {', '.join(by_name)}")
        described, chunks = [], []
        for name, binary in selected.items():
            array = by_name[name]
            dtype = tensors.dtype_of(array.dtype)
            entry = {"name": name, "datatype": dtype.name, "shape": list(array.shape)}
            if binary:
                entry["parameters"] = {"binary_data_size": array.nbytes}
                chunks.append(array)
            else:
                # bfloat16 scalars are not JSON numbers; every bfloat16 is exactly a float32.
                flat = array.reshape(-1)
                entry["data"] = (flat.astype(np.float32) if dtype.name == "BF16" else flat).tolist()
            described.append(entry)
        reply = {"model_name": self.name, "outputs": described}
        if request_id is not None:
            reply = {"model_name": self.name, "id": request_id, "outputs": described}
        if not chunks:
            await _send_json(send, 200, reply)
            return
        header = json.dumps(reply).encode()
        await _send_body(send, 200, b"".join([header, *chunks]), b"application/octet-stream",
                         [(HEADER_LENGTH, str(len(header)).encode())])
