"""HTTP/JSON transport (spec section 12): the classic ``/echo`` and ``/prompt`` endpoints,
plus ``/classify`` and ``/healthz``, as a bare ASGI app under uvicorn (no framework: it is
the latency path of last resort, and routing four paths needs none)."""
from __future__ import annotations

import asyncio
import json
import logging
import threading

from ..dispatch import Request
from ..protocol import (LABELS, MAX_PACKET_BODY, ErrorCode, MsgType, decode_error,
                        decode_scores, encode_prompt)

log = logging.getLogger("shmserve.http")

_STATUS = {ErrorCode.TOO_LARGE: 413, ErrorCode.INTERNAL: 500, ErrorCode.SHUTTING_DOWN: 503}


class HttpRequest(Request):
    """Replies may come from a model's thread: hand them to the event loop's queue."""

    __slots__ = ("loop", "loop_thread", "queue")

    def __init__(self, loop, msg_type: int, body: bytes):
        super().__init__(msg_type, body)
        self.loop = loop
        self.loop_thread = threading.get_ident()  # requests are made on the loop's thread
        self.queue: asyncio.Queue = asyncio.Queue()

    def _send(self, msg_type, payload, final):
        item = (msg_type, bytes(payload), final)
        if threading.get_ident() == self.loop_thread:
            self.queue.put_nowait(item)
        else:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def _error_body(code: int, message: str) -> dict:
    name = ErrorCode(code).name if code in ErrorCode._value2member_map_ else str(code)
    return {"error": {"code": int(code), "name": name, "message": message}}


class HttpError(Exception):
    def __init__(self, status: int, code: int, message: str):
        super().__init__(message)
        self.status, self.body = status, _error_body(code, message)


def _http_error(code: int, message: str) -> HttpError:
    return HttpError(_STATUS.get(code, 400), code, message)


class App:
    def __init__(self, dispatcher):
        self.dispatcher = dispatcher
        self.routes = {("POST", "/echo"): self.echo, ("POST", "/prompt"): self.prompt,
                       ("POST", "/classify"): self.classify, ("GET", "/healthz"): self.health}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        handler = self.routes.get((scope["method"], scope["path"]))
        try:
            if handler is None:
                known = any(path == scope["path"] for _, path in self.routes)
                raise HttpError(405 if known else 404, ErrorCode.UNKNOWN_TYPE,
                                f"{scope['method']} {scope['path']} is not served")
            body = await self._read_body(receive)
            await handler(body, send)
        except HttpError as exc:
            await _send_json(send, exc.status, exc.body)

    @staticmethod
    async def _read_body(receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_PACKET_BODY:
                raise HttpError(413, ErrorCode.TOO_LARGE, f"body over {MAX_PACKET_BODY} bytes")
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    def _submit(self, msg_type: int, body: bytes) -> HttpRequest:
        request = HttpRequest(asyncio.get_running_loop(), msg_type, body)
        self.dispatcher.dispatch([request])
        return request

    async def _final(self, request: HttpRequest) -> tuple[int, bytes]:
        msg_type, payload, _ = await request.queue.get()
        if msg_type == MsgType.ERROR:
            raise _http_error(*decode_error(payload))
        return msg_type, payload

    async def echo(self, body, send):
        text = _json_field(body, "prompt", str)
        _, payload = await self._final(self._submit(MsgType.ECHO, text.encode()))
        await _send_json(send, 200, {"echo_prompt": payload.decode()})

    async def prompt(self, body, send):
        fields = _json_object(body)
        text = _json_field(fields, "prompt", str)
        steps = _json_field(fields, "sampling_steps", int)
        if not 0 <= steps < 1 << 32:
            raise _http_error(ErrorCode.BAD_ARGUMENT, f"sampling_steps {steps} out of range")
        if not fields.get("stream"):
            _, payload = await self._final(self._submit(MsgType.PROMPT, encode_prompt(text, steps)))
            await _send_json(send, 200, {"response": payload.decode()})
            return
        request = self._submit(MsgType.PROMPT_STREAM, encode_prompt(text, steps))
        msg_type, payload, final = await request.queue.get()
        if msg_type == MsgType.ERROR:  # failed before the first token: a plain error status
            raise _http_error(*decode_error(payload))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/x-ndjson")]})
        while True:
            if msg_type == MsgType.STREAM_CHUNK:
                line = {"chunk": payload.decode()}
            elif msg_type == MsgType.ERROR:
                line = _error_body(*decode_error(payload))
            else:
                line = {"done": True}
            await send({"type": "http.response.body", "body": json.dumps(line).encode() + b"\n",
                        "more_body": not final})
            if final:
                return
            msg_type, payload, final = await request.queue.get()

    async def classify(self, body, send):
        _, payload = await self._final(self._submit(MsgType.CLASSIFY_SCORES, body))
        [(index, probabilities)] = decode_scores(payload)
        await _send_json(send, 200, {"label": LABELS[index], "index": index,
                                     "probabilities": list(probabilities)})

    async def health(self, body, send):
        await _send_json(send, 200, {"status": "ready", **self.dispatcher.model.describe()})


def _json_object(body) -> dict:
    if isinstance(body, dict):
        return body
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _http_error(ErrorCode.INVALID_UTF8, f"body is not UTF-8 at byte {exc.start}") \
            from None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise _http_error(ErrorCode.BAD_ARGUMENT, f"body is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _http_error(ErrorCode.BAD_ARGUMENT, "body must be a JSON object")
    return value


def _json_field(body, key: str, kind: type):
    value = _json_object(body).get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _http_error(ErrorCode.BAD_ARGUMENT, f"field {key!r} must be a {kind.__name__}")
    return value


async def _send_json(send, status: int, value: dict) -> None:
    body = json.dumps(value).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class HttpTransport:
    def __init__(self, dispatcher, host: str, port: int):
        import uvicorn  # only when HTTP is asked for

        config = uvicorn.Config(App(dispatcher), host=host, port=port, log_level="warning",
                                access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.host, self.port = host, port
        self._thread = threading.Thread(target=self.server.run, name="http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def set_ready(self) -> None:
        """Waits until uvicorn listens, so the ready line never precedes the socket."""
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"HTTP server failed to start on {self.host}:{self.port}")
            self._thread.join(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]

    def describe(self) -> dict:
        return {"http": f"http://{self.host}:{self.port}"}

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)


def build(dispatcher, args):
    return HttpTransport(dispatcher, args.http_host, args.port)
