"""HTTP/JSON transport (spec section 12): the classic ``/echo`` and ``/prompt`` endpoints,
plus ``/classify`` and ``/healthz``, as a bare ASGI app under uvicorn (no framework: it is
the latency path of last resort, and routing a handful of paths needs none). The Open
Inference Protocol's ``/v2`` paths (section 12.1) are routed to ``kserve``."""
from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import operator
import threading

from ..dispatch import Request
from ..protocol import (LABELS, MAX_PACKET_BODY, ErrorCode, MsgType, decode_error,
                        decode_scores, encode_prompt)
from .peers import ConnectionGate, RefusalLog, owner_uids_allowed, peer_of

log = logging.getLogger("shmserve.http")

_STATUS = {ErrorCode.TOO_LARGE: 413, ErrorCode.INTERNAL: 500, ErrorCode.SHUTTING_DOWN: 503}
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_MAX_HEADER_BYTES = 64 * 1024


class _Exchange:
    """One HTTP request as the app serves it. Once its body is read, the only message
    ``receive`` can still bring is http.disconnect: watching for it lets a model stop
    generating for a client that has gone (``Request.cancelled``)."""

    __slots__ = ("receive", "gone", "watcher")

    def __init__(self, receive):
        self.receive = receive
        self.gone = False
        self.watcher: asyncio.Task | None = None

    def watch(self) -> None:
        if self.watcher is None:
            self.watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass
        self.gone = True

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()


# The exchange being served by the current task: the route handlers need not pass it on.
_exchange: contextvars.ContextVar[_Exchange] = contextvars.ContextVar("shmserve_http_exchange")


class HttpRequest(Request):
    """Replies may come from a model's thread: hand them to the event loop's queue."""

    __slots__ = ("loop", "loop_thread", "queue", "exchange")

    def __init__(self, loop, msg_type: int, body: bytes, exchange: _Exchange, recorder):
        super().__init__(msg_type, body, recorder)
        self.loop = loop
        self.loop_thread = threading.get_ident()  # requests are made on the loop's thread
        self.queue: asyncio.Queue = asyncio.Queue()
        self.exchange = exchange

    def cancelled(self) -> bool:
        return self.exchange.gone

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
    """``code`` is None only for a /v2 routing error, which has no protocol code to name."""

    def __init__(self, status: int, code: int | None, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    @property
    def body(self) -> dict:
        return _error_body(self.code, self.message)


def _http_error(code: int, message: str) -> HttpError:
    return HttpError(_STATUS.get(code, 400), code, message)


class App:
    def __init__(self, dispatcher):
        from .kserve import KServe  # it builds on this module's helpers: import once whole

        self.dispatcher = dispatcher
        self.recorder = dispatcher.recorder("http")
        self.routes = {("POST", "/echo"): self.echo, ("POST", "/prompt"): self.prompt,
                       ("POST", "/classify"): self.classify, ("GET", "/healthz"): self.health}
        if dispatcher.metrics is not None:
            self.routes["GET", "/metrics"] = self.metrics
        self.kserve = KServe(self)

    def _route(self, scope):
        handler = self.routes.get((scope["method"], scope["path"]))
        if handler is None:
            known = any(path == scope["path"] for _, path in self.routes)
            raise HttpError(405 if known else 404, ErrorCode.UNKNOWN_TYPE,
                            f"{scope['method']} {scope['path']} is not served")
        return handler

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        # KServe clients read errors as {"error": string}, the classic ones as an object.
        v2 = self.kserve.serves(scope["path"])
        error_body = self.kserve.error_body if v2 else operator.attrgetter("body")
        exchange = _Exchange(receive)
        _exchange.set(exchange)
        started = False

        async def send_tracked(message):
            nonlocal started
            started = True
            await send(message)

        try:
            handler = self.kserve.route(scope) if v2 else self._route(scope)
            body = await self._read_body(receive)
            await handler(body, send_tracked)
        except HttpError as exc:
            await _send_json(send, exc.status, error_body(exc))
        except Exception as exc:  # a bug of ours: still the spec's JSON error, not text/plain
            log.exception("%s %s failed", scope["method"], scope["path"])
            if not started:
                await _send_json(send, 500, error_body(HttpError(
                    500, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")))
        finally:
            exchange.close()

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
        exchange = _exchange.get()
        if self.dispatcher.model.serves_prompts:  # generation runs long: notice a client leaving
            exchange.watch()
        request = HttpRequest(asyncio.get_running_loop(), msg_type, body, exchange,
                              self.recorder)
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

    async def metrics(self, body, send):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        await _send_body(send, 200, generate_latest(self.dispatcher.metrics.registry),
                         CONTENT_TYPE_LATEST.encode())

    async def health(self, body, send):
        # Only the name: describe() has file paths, and every local user can ask.
        await _send_json(send, 200, {"status": "ready", "model": self.dispatcher.model.name})


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
    except RecursionError:
        raise _http_error(ErrorCode.BAD_ARGUMENT, "body is JSON nested too deep") from None
    if not isinstance(value, dict):
        raise _http_error(ErrorCode.BAD_ARGUMENT, "body must be a JSON object")
    return value


def _json_field(body, key: str, kind: type, where: str = ""):
    """``body[key]`` if it is a ``kind``; ``where`` ("input 'x': ") says whose field it is."""
    value = _json_object(body).get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _http_error(ErrorCode.BAD_ARGUMENT, f"{where}field {key!r} must be a "
                          f"{kind.__name__}")
    if kind is str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:  # JSON's \ud800 escapes decode to lone surrogates
            raise _http_error(ErrorCode.INVALID_UTF8, f"{where}field {key!r} is not valid "
                              f"Unicode at character {exc.start}") from None
    return value


async def _send_json(send, status: int, value: dict) -> None:
    await _send_body(send, status, json.dumps(value).encode(), b"application/json")


async def _send_body(send, status: int, body, content_type: bytes, headers=()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": bytes(body)})


def _guarded_protocol(gate: ConnectionGate, admit_peer, header_timeout: float,
                      max_header_bytes: int):
    """uvicorn's httptools protocol with the limits it lacks: a connection cap (total and per
    peer), a time and a size limit on each request's head. Without them one client dribbling
    headers, or sending one endless header line, held a connection for ever and stalled the
    event loop for everyone (the parser re-copies an unfinished header on every read)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    refusals = RefusalLog(log, "http")

    class GuardedHttp(HttpToolsProtocol):
        _peer = None  # set once admitted: connection_lost gives its place back
        _head_timer = None
        # True while the bytes arriving belong to a request's head (request line and
        # headers): from the connection's start and from each request's end.
        _in_head = True
        _head_bytes = 0

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            try:
                peer = peer_of(transport.get_extra_info("socket"))
            except OSError:
                transport.close()
                return
            if admit_peer is not None and not admit_peer(peer):
                refusals.refused(f"peer {peer} is not allowed (--tcp-peers)")
                transport.close()
                return
            refusal = gate.admit(peer)
            if refusal:
                refusals.refused(refusal)
                transport.close()
                return
            self._peer = peer
            self._arm_head_timer()

        def connection_lost(self, exc) -> None:
            if self._peer is not None:
                gate.release(self._peer)
                self._peer = None
            self._cancel_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                if self._head_timer is None:
                    # A kept-alive connection's next head starts its clock with its first
                    # byte; until then it is idle, which is --idle-timeout's to end.
                    self._arm_head_timer()
                self._head_bytes += len(data)
            super().data_received(data)
            # Checked after parsing: a read that completed the head may carry body bytes.
            if self._in_head and self._head_bytes > max_header_bytes:
                self._refuse_head(431, f"request head over {max_header_bytes} bytes "
                                  "(--max-header-bytes)")

        def on_headers_complete(self) -> None:
            self._in_head, self._head_bytes = False, 0
            self._cancel_head_timer()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head = True

        def _unsupported_upgrade_warning(self) -> None:
            """An Upgrade request is served as plain HTTP (ws="none"); uvicorn's two warning
            lines per such request would let any client flood the log."""
            log.debug("ignored an Upgrade header")

        def _arm_head_timer(self) -> None:
            self._cancel_head_timer()
            self._head_timer = self.loop.call_later(header_timeout, self._head_timed_out)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self._in_head and not self.transport.is_closing():
                if self._head_bytes:
                    self._refuse_head(408, f"request head incomplete after {header_timeout} s "
                                      "(--header-timeout)")
                else:
                    self.transport.close()

        def _refuse_head(self, status: int, message: str) -> None:
            body = json.dumps(_error_body(ErrorCode.TOO_LARGE if status == 431 else
                                          ErrorCode.BAD_LENGTH, message)).encode()
            reason = b"Request Header Fields Too Large" if status == 431 else b"Request Timeout"
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                                 % (status, reason, len(body), body))
            self._in_head = False
            self.transport.close()

    return GuardedHttp


class HttpTransport:
    def __init__(self, dispatcher, host: str, port: int, *, idle_timeout: float,
                 header_timeout: float = DEFAULT_HEADER_TIMEOUT_S,
                 max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES, max_connections: int,
                 max_peer_connections: int, admit_peer=None):
        import uvicorn  # only when HTTP is asked for

        protocol = _guarded_protocol(ConnectionGate(max_connections, max_peer_connections),
                                     admit_peer, header_timeout, max_header_bytes)
        # ws="none": the app serves no WebSocket, and an upgrade request answered by it
        # ended in uvicorn's 500 "returned without completing handshake".
        config = uvicorn.Config(App(dispatcher), host=host, port=port, log_level="warning",
                                access_log=False, lifespan="off", http=protocol, ws="none",
                                timeout_keep_alive=idle_timeout)
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
        return {"address": f"http://{self.host}:{self.port}", "host": self.host,
                "port": self.port}

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)


def build(dispatcher, args):
    admit = owner_uids_allowed(args.group_access) if args.tcp_peers == "owner" else None
    return HttpTransport(dispatcher, args.http_host, args.port, idle_timeout=args.idle_timeout,
                         header_timeout=args.header_timeout,
                         max_header_bytes=args.max_header_bytes,
                         max_connections=args.max_connections,
                         max_peer_connections=args.max_peer_connections, admit_peer=admit)
