"""Gemma served end to end with the tiny model: every transport, streaming, batching, errors,
and the Go client over shm and the Unix socket. Greedy decoding makes every path comparable."""
import concurrent.futures
import http.client
import json
import os
import subprocess

import pytest

from conftest import Server, stop_all
from shmserve.client import PacketClient, RingClient, ServerError
from shmserve.protocol import ErrorCode, MsgType, PROMPT_HEADER, encode_prompt

PROMPT = "Hello there"
STEPS = 12


@pytest.fixture(scope="module")
def gemma_server(tiny_gemma_dir, tmp_path_factory):
    # The classic environment variables stand in for --checkpoint/--tokenizer.
    env = {"MODEL_CHECKPOINT": os.path.join(tiny_gemma_dir, "checkpoint"),
           "MODEL_TOKENIZER": os.path.join(tiny_gemma_dir, "tokenizer.model"),
           "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache"))}
    server = Server("--model", "gemma", "--variant", "tiny", "--cache-length", "128",
                    "--max-new-tokens", "64", "--transport", "shm,unix,http", "--port", "0",
                    ready_timeout=300, env=env)
    yield server
    stop_all([server])


@pytest.fixture(scope="module")
def ring(gemma_server):
    client = RingClient(gemma_server.name)
    yield client
    client.close()


@pytest.fixture(scope="module")
def expected(ring):
    return ring.prompt(PROMPT, STEPS)


def http_post(server, body):
    connection = http.client.HTTPConnection(server.ready["http"]["host"],
                                            server.ready["http"]["port"], timeout=60)
    connection.request("POST", "/prompt", body=json.dumps(body))
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, data


def test_ready_line_names_the_variant(gemma_server):
    assert gemma_server.ready.model["variant"] == "tiny"


def test_same_text_on_every_transport(gemma_server, expected):
    assert expected  # the random model still emits tokens
    uds = PacketClient(gemma_server.socket, timeout=60)
    assert uds.call(MsgType.PROMPT, encode_prompt(PROMPT, STEPS))[1].decode() == expected
    uds.close()
    status, data = http_post(gemma_server, {"prompt": PROMPT, "sampling_steps": STEPS})
    assert status == 200 and json.loads(data) == {"response": expected}


def test_streams_join_to_the_same_text(gemma_server, ring, expected):
    frames = list(ring.frames(MsgType.PROMPT_STREAM, encode_prompt(PROMPT, STEPS), 60))
    assert frames[-1] == (MsgType.STREAM_END, b"")
    assert len(frames) > 2  # really streamed, not one chunk
    assert b"".join(body for kind, body in frames[:-1]).decode() == expected
    uds = PacketClient(gemma_server.socket, timeout=60)
    assert "".join(uds.stream(PROMPT, STEPS)) == expected
    uds.close()
    status, data = http_post(gemma_server, {"prompt": PROMPT, "sampling_steps": STEPS,
                                            "stream": True})
    lines = [json.loads(line) for line in data.splitlines()]
    assert status == 200 and lines[-1] == {"done": True}
    assert "".join(line["chunk"] for line in lines[:-1]) == expected


def test_concurrent_prompts_batch_without_mixing_replies(ring, expected):
    prompts = [PROMPT, "Another prompt", "A third one", PROMPT]
    singles = {p: ring.prompt(p, STEPS) for p in set(prompts)}
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: ring.prompt(p, STEPS), prompts))
    assert together == [singles[p] for p in prompts]
    assert singles[PROMPT] == expected


@pytest.mark.parametrize("body, code", [
    (encode_prompt("", 4), ErrorCode.EMPTY_PROMPT),
    (PROMPT_HEADER.pack(4) + b"ok\xc3\x28", ErrorCode.INVALID_UTF8),
    (encode_prompt(PROMPT, 0), ErrorCode.BAD_ARGUMENT),
    (encode_prompt(PROMPT, 65), ErrorCode.BAD_ARGUMENT),
    (encode_prompt("word " * 100, 64), ErrorCode.PROMPT_TOO_LONG),
    (b"\x01", ErrorCode.BAD_LENGTH),
])
def test_bad_prompts_get_typed_errors_on_ring_and_socket(gemma_server, ring, body, code):
    for msg_type in (MsgType.PROMPT, MsgType.PROMPT_STREAM):
        with pytest.raises(ServerError) as info:
            ring.call(msg_type, body, timeout=60)
        assert info.value.code == code
    uds = PacketClient(gemma_server.socket, timeout=60)
    with pytest.raises(ServerError) as info:
        uds.call(MsgType.PROMPT, body)
    assert info.value.code == code
    uds.close()


def test_http_errors(gemma_server):
    status, data = http_post(gemma_server, {"prompt": "", "sampling_steps": 4})
    assert status == 400 and json.loads(data)["error"]["name"] == "EMPTY_PROMPT"
    status, data = http_post(gemma_server, {"prompt": "word " * 100, "sampling_steps": 64})
    assert status == 400 and json.loads(data)["error"]["name"] == "PROMPT_TOO_LONG"


@pytest.mark.parametrize("transport", ["shm", "unix"])
def test_go_client_streams_the_same_text(gemma_server, shmclient, expected, transport):
    addr = f"shm://{gemma_server.name}" if transport == "shm" else f"unix://{gemma_server.socket}"
    for stream in ("true", "false"):
        run = subprocess.run([shmclient, "prompt", "-addr", addr, "-steps", str(STEPS),
                              f"-stream={stream}", PROMPT], capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr
        assert run.stdout.rstrip("\n") == expected


def test_sigterm_after_prompts_removes_every_object(tiny_gemma_dir, tmp_path):
    from conftest import ring_objects
    server = Server("--model", "gemma", "--variant", "tiny", "--cache-length", "128",
                    "--max-new-tokens", "64", "--transport", "shm",
                    "--checkpoint", os.path.join(tiny_gemma_dir, "checkpoint"),
                    "--tokenizer", os.path.join(tiny_gemma_dir, "tokenizer.model"),
                    ready_timeout=300, env={"XDG_CACHE_HOME": str(tmp_path)})
    try:
        client = RingClient(server.name)
        client.prompt(PROMPT, 4)
        list(client.frames(MsgType.PROMPT_STREAM, encode_prompt(PROMPT, 4), 60))
        client.close()
        assert server.stop() == 0, server.stderr
        assert ring_objects(server.name) == []
    finally:
        stop_all([server])
