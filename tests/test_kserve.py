"""The Open Inference Protocol (KServe v2) endpoints against real servers (spec section 12.1)."""
import http.client
import importlib.util
import json
import os

import numpy as np
import pytest

from conftest import REPO, Server, stop_all


def load_example(name):
    path = os.path.join(REPO, "examples", "models", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def regressor_server():
    server = Server("--model", "examples/models/regressor.py:build", "--transport", "http",
                    "--port", "0")
    yield server
    stop_all([server])


@pytest.fixture(scope="module")
def typed_server():
    server = Server("--model", "examples/models/identity.py:typed", "--transport", "http",
                    "--port", "0")
    yield server
    stop_all([server])


def call(server, method, path, body=b"", headers=None):
    """(status, headers as a dict, body bytes); ``body`` a dict is sent as JSON."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    connection = http.client.HTTPConnection(server.ready["http"]["host"],
                                            server.ready["http"]["port"], timeout=10)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def get(server, path):
    status, _, data = call(server, "GET", path)
    return status, json.loads(data)


def infer(server, request, model="regressor", binary=b"", headers=None):
    body = json.dumps(request).encode()
    headers = dict(headers or {})
    if binary:
        headers["Inference-Header-Content-Length"] = str(len(body))
    return call(server, "POST", f"/v2/models/{model}/infer", body + binary, headers)


def infer_json(server, request, model="regressor"):
    status, _, data = infer(server, request, model)
    return status, json.loads(data)


def split_binary(headers, data):
    """The JSON header and the raw bytes of each binary output, in order."""
    length = int(headers["inference-header-content-length"])
    reply, offset, raw = json.loads(data[:length]), length, {}
    for output in reply["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        if size is not None:
            raw[output["name"]] = data[offset:offset + size]
            offset += size
    assert offset == len(data)
    return reply, raw


X = np.arange(24, dtype=np.float32).reshape(3, 8) / 10


def x_input(**changes):
    return {"name": "x", "shape": [3, 8], "datatype": "FP32", "data": X.tolist(), **changes}


def typed_inputs(rows=2):
    rng = np.random.default_rng(1)
    return {"a": rng.integers(-100, 100, (rows, 4), dtype=np.int32),
            "b": rng.normal(size=rows), "mask": rng.integers(0, 2, rows).astype(bool),
            "img": rng.integers(0, 256, (rows, 2, 2), dtype=np.uint8)}


KSERVE = {np.dtype(np.int32): "INT32", np.dtype(np.float64): "FP64",
          np.dtype(np.bool_): "BOOL", np.dtype(np.uint8): "UINT8"}


def test_server_metadata_and_health(regressor_server):
    status, meta = get(regressor_server, "/v2")
    assert status == 200 and meta["name"] == "shmserve" and meta["version"]
    assert "binary_tensor_data" in meta["extensions"]
    assert get(regressor_server, "/v2/health/live") == (200, {"live": True})
    assert get(regressor_server, "/v2/health/ready") == (200, {"ready": True})
    assert get(regressor_server, "/v2/models/regressor/ready")[0] == 200
    assert get(regressor_server, "/v2/models/regressor/versions/1/ready")[0] == 200


def test_model_metadata_matches_the_signature(regressor_server, typed_server):
    for server, model in ((regressor_server, load_example("regressor").build()),
                          (typed_server, load_example("identity").typed())):
        for path in (f"/v2/models/{model.name}", f"/v2/models/{model.name}/versions/1"):
            status, meta = get(server, path)
            assert status == 200
            assert meta == {"name": model.name, "platform": "shmserve", "versions": ["1"],
                            **{group: [{"name": t.name, "datatype": t.dtype.name,
                                        "shape": list(t.shape)}
                                       for t in getattr(model.signature, group)]
                               for group in ("inputs", "outputs")},
                            "max_batch_size": model.signature.max_batch_size}


def test_json_infer_gives_what_numpy_computes(regressor_server):
    model = load_example("regressor").build()
    status, reply = infer_json(regressor_server, {"id": "req-7", "inputs": [x_input()]})
    assert status == 200 and reply["model_name"] == "regressor" and reply["id"] == "req-7"
    [output] = reply["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("y", "FP32", [3, 1])
    np.testing.assert_allclose(output["data"], (X @ model.weights + model.bias).reshape(-1),
                               rtol=1e-6)
    # Flat data is the same tensor as nested, row-major; no id in, none out.
    status, flat = infer_json(regressor_server, {"inputs": [x_input(data=X.reshape(-1).tolist())]})
    assert status == 200 and "id" not in flat and flat["outputs"] == reply["outputs"]


def test_binary_round_trip_is_byte_identical(typed_server):
    inputs = typed_inputs(3)
    request = {"inputs": [{"name": name, "shape": list(a.shape), "datatype": KSERVE[a.dtype],
                           "parameters": {"binary_data_size": a.nbytes}}
                          for name, a in inputs.items()],
               "parameters": {"binary_data_output": True}}
    status, headers, data = infer(typed_server, request, "typed",
                                  b"".join(a.tobytes() for a in inputs.values()))
    assert status == 200, data
    reply, raw = split_binary(headers, data)
    assert [o["name"] for o in reply["outputs"]] == ["a2", "b_sum", "mask_not", "img"]
    assert raw["img"] == inputs["img"].tobytes()
    assert raw["a2"] == (inputs["a"] * 2).tobytes()
    assert raw["b_sum"] == (inputs["b"] + inputs["a"].sum(axis=1)).tobytes()
    assert raw["mask_not"] == (~inputs["mask"]).tobytes()


def test_outputs_selection_mixes_json_and_binary(typed_server):
    inputs = typed_inputs()
    request = {"inputs": [{"name": name, "shape": list(a.shape), "datatype": KSERVE[a.dtype],
                           "data": a.tolist()} for name, a in inputs.items()],
               "outputs": [{"name": "mask_not"},
                           {"name": "img", "parameters": {"binary_data": True}}]}
    status, headers, data = infer(typed_server, request, "typed")
    assert status == 200, data
    reply, raw = split_binary(headers, data)
    mask, img = reply["outputs"]
    assert mask == {"name": "mask_not", "datatype": "BOOL", "shape": [2],
                    "data": (~inputs["mask"]).tolist()}
    assert img["name"] == "img" and img["shape"] == [2, 2, 2]
    assert raw == {"img": inputs["img"].tobytes()}
    # Only JSON outputs: a plain JSON reply, no header length.
    request["outputs"] = [{"name": "a2"}]
    status, headers, data = infer(typed_server, request, "typed")
    assert status == 200 and "inference-header-content-length" not in headers
    assert json.loads(data)["outputs"][0]["data"] == (inputs["a"] * 2).reshape(-1).tolist()


@pytest.mark.parametrize("path", ["/v2/models/nope", "/v2/models/nope/ready",
                                  "/v2/models/regressor/versions/2", "/v2/repository/index",
                                  "/v2/models/regressor/versions"])
def test_unknown_models_and_paths_are_404(regressor_server, path):
    status, reply = get(regressor_server, path)
    assert status == 404 and isinstance(reply["error"], str)
    status, _, data = call(regressor_server, "POST", "/v2/models/nope/infer",
                           json.dumps({"inputs": [x_input()]}).encode())
    assert status == 404 and "'nope'" in json.loads(data)["error"]


def test_wrong_method_is_405(regressor_server):
    status, _, data = call(regressor_server, "GET", "/v2/models/regressor/infer")
    assert status == 405 and isinstance(json.loads(data)["error"], str)


@pytest.mark.parametrize("request_, prefix, mentions", [
    ({"inputs": [x_input(datatype="FP64")]}, "BAD_DTYPE", "'x'"),
    ({"inputs": [x_input(datatype="FLOAT")]}, "BAD_DTYPE", "'x'"),
    ({"inputs": [x_input(datatype="BYTES", data=["a"] * 24)]}, "BAD_DTYPE", "'x'"),
    ({"inputs": [x_input(data=[True] * 24)]}, "BAD_DTYPE", "'x'"),
    ({"inputs": [x_input(data=["1.5"] * 24)]}, "BAD_DTYPE", "'x'"),
    ({"inputs": [x_input(shape=[4, 6])]}, "BAD_SHAPE", "'x'"),
    ({"inputs": [x_input(shape=[3, -1])]}, "BAD_SHAPE", "'x'"),
    ({"inputs": [x_input(data=X.reshape(-1).tolist()[:-1])]}, "BAD_TENSOR", "'x'"),
    ({"inputs": [x_input(data=[[1, [2]]])]}, "BAD_TENSOR", "'x'"),
    ({"inputs": [x_input(name="z")]}, "BAD_INPUT", "'z'"),
    ({"inputs": [x_input(), x_input()]}, "BAD_INPUT", "1 input(s): x"),
    ({"inputs": []}, "BAD_TENSOR", "tensor_count"),
    ({"inputs": [x_input(data=None)]}, "BAD_ARGUMENT", "'x'"),
    ({"inputs": [x_input(shape="3x8")]}, "BAD_ARGUMENT", "'x'"),
    ({"inputs": [{"shape": [3, 8], "datatype": "FP32", "data": []}]}, "BAD_ARGUMENT",
     "inputs[0]"),
    ({"inputs": [5]}, "BAD_ARGUMENT", "inputs[0]"),
    ({"inputs": {"x": []}}, "BAD_ARGUMENT", "'inputs'"),
    ({"inputs": [x_input()], "outputs": [{"name": "nope"}]}, "BAD_INPUT", "'nope'"),
    ({"inputs": [x_input()], "id": 5}, "BAD_ARGUMENT", "'id'"),
    ({"inputs": [x_input(parameters={"binary_data_size": 96})]}, "BAD_ARGUMENT", "'x'"),
])
def test_bad_json_requests_are_400_naming_the_input(regressor_server, request_, prefix,
                                                    mentions):
    status, reply = infer_json(regressor_server, request_)
    assert status == 400, reply
    assert reply["error"].startswith(f"{prefix}: ") and mentions in reply["error"], reply


def test_int_out_of_range_is_400(typed_server):
    inputs = typed_inputs(1)
    request = {"inputs": [{"name": name, "shape": list(a.shape), "datatype": KSERVE[a.dtype],
                           "data": a.tolist()} for name, a in inputs.items()]}
    request["inputs"][0]["data"] = [2 ** 31, 0, 0, 0]
    status, reply = infer_json(typed_server, request, "typed")
    assert status == 400 and reply["error"].startswith("BAD_ARGUMENT: input 'a'"), reply


def binary_x(size=X.nbytes):
    return {"inputs": [{"name": "x", "shape": [3, 8], "datatype": "FP32",
                        "parameters": {"binary_data_size": size}}]}


@pytest.mark.parametrize("request_, binary, header, prefix", [
    (binary_x(X.nbytes - 4), X.tobytes()[:-4], None, "BAD_TENSOR"),  # size vs shape
    (binary_x(), X.tobytes()[:-4], None, "BAD_TENSOR"),  # past the body
    (binary_x(), X.tobytes() + b"\0" * 4, None, "BAD_TENSOR"),  # bytes nobody claims
    (binary_x(), X.tobytes(), "100000", "BAD_LENGTH"),  # header length past the body
    (binary_x(), X.tobytes(), "-5", "BAD_LENGTH"),
    (binary_x(), X.tobytes(), "9" * 5000, "BAD_LENGTH"),
    (binary_x(), X.tobytes(), "10", "BAD_ARGUMENT"),  # cuts the JSON short
])
def test_bad_binary_requests_are_400(regressor_server, request_, binary, header, prefix):
    body = json.dumps(request_).encode()
    headers = {"Inference-Header-Content-Length": header or str(len(body))}
    status, _, data = call(regressor_server, "POST", "/v2/models/regressor/infer", body + binary,
                           headers)
    assert status == 400, data
    assert json.loads(data)["error"].startswith(f"{prefix}: "), data


def test_binary_request_json_reply(regressor_server):
    status, headers, data = infer(regressor_server, binary_x(), binary=X.tobytes())
    assert status == 200 and "inference-header-content-length" not in headers
    _, reference = infer_json(regressor_server, {"inputs": [x_input()]})
    assert json.loads(data)["outputs"] == reference["outputs"]


@pytest.mark.parametrize("body", [b"not json", b"\xff\xfe", b"[1, 2]", b"{" * 100_000])
def test_malformed_bodies_are_400(regressor_server, body):
    status, _, data = call(regressor_server, "POST", "/v2/models/regressor/infer", body)
    assert status == 400 and isinstance(json.loads(data)["error"], str)


def test_classic_endpoints_still_work(regressor_server):
    status, _, data = call(regressor_server, "POST", "/echo", b'{"prompt": "hi"}')
    assert status == 200 and json.loads(data) == {"echo_prompt": "hi"}
    status, reply = get(regressor_server, "/healthz")
    assert status == 200 and reply == {"status": "ready", "model": "regressor"}
    status, _, data = call(regressor_server, "GET", "/nope")
    assert status == 404 and json.loads(data)["error"]["name"] == "UNKNOWN_TYPE"


def test_tritonclient(regressor_server):
    try:
        import tritonclient.http as triton
    except ImportError as exc:
        pytest.skip(f"tritonclient[http] is not installed ({exc})")
    address = regressor_server.ready["http"]["address"].removeprefix("http://")
    client = triton.InferenceServerClient(address)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("regressor")
    meta = client.get_model_metadata("regressor")
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 8]}]
    model = load_example("regressor").build()
    for binary in (False, True):
        x = triton.InferInput("x", list(X.shape), "FP32")
        x.set_data_from_numpy(X, binary_data=binary)
        y = triton.InferRequestedOutput("y", binary_data=binary)
        result = client.infer("regressor", [x], outputs=[y], request_id="t1")
        np.testing.assert_allclose(result.as_numpy("y"), X @ model.weights + model.bias,
                                   rtol=1e-6)
        assert result.get_response()["id"] == "t1"
    with pytest.raises(triton.InferenceServerException, match="BAD_SHAPE"):
        bad = triton.InferInput("x", [1, 4], "FP32")
        bad.set_data_from_numpy(np.ones((1, 4), np.float32))
        client.infer("regressor", [bad])
    client.close()
