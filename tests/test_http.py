"""The classic HTTP/JSON endpoints against a real server (uvicorn)."""
import http.client
import json

import pytest


@pytest.fixture(scope="module")
def http_server():
    from conftest import Server, stop_all
    server = Server("--model", "echo", "--transport", "http", "--port", "0")
    yield server
    stop_all([server])


def post(server, path, body, method="POST"):
    connection = http.client.HTTPConnection(server.ready["http"]["host"],
                                            server.ready["http"]["port"], timeout=10)
    connection.request(method, path, body=body if isinstance(body, bytes) else json.dumps(body))
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, response.getheader("content-type"), data


def test_echo_matches_the_classic_server(http_server):
    status, kind, data = post(http_server, "/echo", {"prompt": "héllo, world"})
    assert (status, kind) == (200, "application/json")
    assert json.loads(data) == {"echo_prompt": "héllo, world"}


@pytest.mark.parametrize("body, status, name", [
    (b"not json", 400, "BAD_ARGUMENT"),
    (b"\xff\xfe", 400, "INVALID_UTF8"),
    ({"prompt": 5}, 400, "BAD_ARGUMENT"),
    ({}, 400, "BAD_ARGUMENT"),
])
def test_echo_bad_bodies_are_typed_errors(http_server, body, status, name):
    got_status, _, data = post(http_server, "/echo", body)
    assert got_status == status and json.loads(data)["error"]["name"] == name


def test_prompt_on_a_model_without_text_is_unsupported(http_server):
    status, _, data = post(http_server, "/prompt", {"prompt": "hi", "sampling_steps": 3})
    assert status == 400 and json.loads(data)["error"]["name"] == "UNSUPPORTED"


def test_unknown_path_and_method(http_server):
    assert post(http_server, "/nope", {})[0] == 404
    assert post(http_server, "/echo", b"", method="GET")[0] == 405
    status, _, data = post(http_server, "/healthz", b"", method="GET")
    assert status == 200 and json.loads(data)["status"] == "ready"
