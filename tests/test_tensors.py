"""TensorList codec and signature binding against spec/vectors/tensors.json (the Go suite runs
the same file), plus round trips of every dtype."""
import json
import pathlib

import numpy as np
import pytest

from shmserve import tensors
from shmserve.protocol import ProtocolError

VECTORS = json.loads((pathlib.Path(__file__).parent.parent / "spec" / "vectors" /
                      "tensors.json").read_text())
SIGNATURE = tensors.Signature(
    [tensors.TensorSpec(t["name"], t["datatype"], t["shape"]) for t in VECTORS["signature"]["inputs"]],
    [tensors.TensorSpec(t["name"], t["datatype"], t["shape"]) for t in VECTORS["signature"]["outputs"]],
    VECTORS["signature"]["max_batch_size"])


def as_expected(pairs):
    return sorted(({"name": name, "datatype": tensors.dtype_of(a.dtype).name,
                    "shape": list(a.shape), "data_hex": a.tobytes().hex()} for name, a in pairs),
                  key=lambda t: t["name"])


@pytest.mark.parametrize("case", [pytest.param(c, id=c["name"]) for c in VECTORS["cases"]])
def test_vector(case):
    body = bytes.fromhex(case["body_hex"])
    if "error" in case:
        with pytest.raises(ProtocolError) as info:
            tensors.bind(SIGNATURE, tensors.decode(body))
        assert info.value.code.name == case["error"]
        return
    decoded = tensors.decode(body)
    if case.get("reply"):
        assert as_expected(decoded) == sorted(case["ok"], key=lambda t: t["name"])
        assert bytes(tensors.encode(decoded)) == body  # canonical: re-encoding gives the bytes
        return
    bound = tensors.bind(SIGNATURE, decoded)
    assert as_expected(bound.items()) == sorted(case["ok"], key=lambda t: t["name"])


def test_dtype_codes_match_spec():
    assert {d.name: d.code for d in tensors.DTYPES} == VECTORS["dtype_codes"]


@pytest.mark.parametrize("dtype", [d.name for d in tensors.DTYPES])
def test_round_trip_every_dtype_is_a_view(dtype):
    kind = tensors.BY_NAME[dtype].np
    array = (np.arange(24) % 2).astype(kind).reshape(2, 3, 4)
    body = tensors.encode([("a", array), ("b", array[:1])])
    (name_a, a), (name_b, b) = tensors.decode(memoryview(body))
    assert (name_a, name_b) == ("a", "b")
    assert a.dtype == kind and np.array_equal(a, array) and np.array_equal(b, array[:1])
    assert a.ctypes.data % 64 == np.frombuffer(body, np.uint8).ctypes.data % 64
    assert a.base is not None and not a.flags.owndata  # a view of the body, not a copy


def test_outputs_checked_against_signature():
    with pytest.raises(TypeError, match="shape"):
        tensors.OutputEncoder(SIGNATURE).encode(np.zeros((2, 4), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        tensors.OutputEncoder(SIGNATURE).encode(np.zeros((2, 3), np.int32))
    body = tensors.OutputEncoder(SIGNATURE).encode(np.zeros((2, 3), np.float64))  # same kind: cast
    [(name, y)] = tensors.decode(body)
    assert name == "y" and y.dtype == np.float32


def test_output_encoder_checks_every_reply_after_a_shape_is_known():
    # The first reply of a shape leaves a plan behind; later replies of that shape skip the
    # checks only while they are already in the declared dtype, and nothing else may pass.
    encoder = tensors.OutputEncoder(SIGNATURE)
    first = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert tensors.decode(encoder.encode(first))[0][1].tolist() == first.tolist()
    again = first[::-1] * 2
    [(_, y)] = tensors.decode(encoder.encode({"y": again}))
    assert y.tolist() == again.tolist()
    big_endian = first.astype(">f4")
    assert tensors.decode(encoder.encode(big_endian))[0][1].tolist() == first.tolist()
    with pytest.raises(TypeError, match="dtype"):
        encoder.encode(first.astype(np.int32))
    with pytest.raises(TypeError, match="shape"):
        encoder.encode(np.zeros((2, 3, 1), np.float32))
    with pytest.raises(TypeError, match="signature declares"):
        encoder.encode({"y": first, "z": first})
    assert bytes(encoder.encode(first.T.copy().T)) == bytes(tensors.encode([("y", first)]))


def test_encode_writes_little_endian_whatever_the_array_order():
    array = np.arange(5, dtype=">i4")
    body = tensors.encode([("a", array)])
    assert body == tensors.encode([("a", array.astype("<i4"))])
    assert tensors.decode(body)[0][1].tolist() == [0, 1, 2, 3, 4]


def test_dispatcher_binds_each_request_by_its_own_header_whatever_came_before():
    # The dispatcher reuses the last request's binding when the header bytes repeat: requests
    # of other shapes, other names and a corrupt header in between must each get their own.
    from shmserve import Model
    from shmserve.dispatch import Dispatcher, Request
    from shmserve.protocol import MsgType

    class Double(Model):
        signature = tensors.Signature([tensors.TensorSpec("x", "float32", (-1, -1))],
                                      [tensors.TensorSpec("y", "float32", (-1, -1))], 8)

        def infer(self, inputs):
            return {"y": inputs["x"] * 2}

    class Captured(Request):
        __slots__ = ("replies",)

        def _send(self, msg_type, payload, final):
            self.replies = (msg_type, bytes(payload))

    dispatcher = Dispatcher(Double())
    wide, narrow = np.arange(8, dtype=np.float32).reshape(2, 4), np.ones((1, 3), np.float32)
    bodies = [tensors.encode([("x", wide)]), tensors.encode([("x", narrow)]),
              tensors.encode([("x", wide + 1)]), tensors.encode([("", narrow * 3)]),
              tensors.encode([("x", wide)])]
    corrupt = bytearray(bodies[0])
    corrupt[8] = 99  # the first tensor's dtype code
    for body in bodies[:2] + [corrupt] + bodies[2:]:
        request = Captured(MsgType.INFER, memoryview(bytearray(body)))
        dispatcher.dispatch([request])
        msg_type, reply = request.replies
        if body is corrupt:
            assert msg_type == MsgType.ERROR
            continue
        [(name, got)] = tensors.decode(reply)
        assert msg_type == MsgType.INFER and name == "y"
        assert got.tolist() == (tensors.decode(body)[0][1] * 2).tolist()
