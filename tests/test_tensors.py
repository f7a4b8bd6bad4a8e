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
        tensors.encode_outputs(SIGNATURE, np.zeros((2, 4), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        tensors.encode_outputs(SIGNATURE, np.zeros((2, 3), np.int32))
    body = tensors.encode_outputs(SIGNATURE, np.zeros((2, 3), np.float64))  # same kind: cast
    [(name, y)] = tensors.decode(body)
    assert name == "y" and y.dtype == np.float32
