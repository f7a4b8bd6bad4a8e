"""TensorList, the body of INFER requests and replies (spec/PROTOCOL.md section 3.1), and the
signature a model declares. This module and goclient/protocol/tensor.go are the only places
that know the byte format; spec/vectors/tensors.json keeps them honest.

TensorList::

    0        2        4                8
    +--------+--------+----------------+
    | count  | rsvd   | reserved       |   then `count` TensorHeaders, each padded to 8,
    +--------+--------+----------------+   then each tensor's data at a multiple of 64

TensorHeader::

    0    1    2        4        8                16               24           24+8*rank
    +----+----+--------+--------+----------------+----------------+------------+--------+
    |dtyp|rank|name_len| rsvd   | data_offset    | data_len       | dims (u64) | name   |
    +----+----+--------+--------+----------------+----------------+------------+--------+

Decoding never copies tensor data: each input is a numpy view of the body it came in.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import struct
from collections.abc import Mapping, Sequence

import numpy as np

from .protocol import ErrorCode, ProtocolError

LIST_HEADER = struct.Struct("<HHI")
TENSOR_HEADER = struct.Struct("<BBHIQQ")  # dtype, rank, name_len, reserved, data_offset, data_len
DATA_ALIGN = 64
HEADER_ALIGN = 8
MAX_TENSORS = 64
MAX_RANK = 8
MAX_DIM = 2 ** 31 - 1
MAX_NAME = 255


def _bfloat16() -> np.dtype:
    import ml_dtypes  # numpy has no bfloat16; ml_dtypes is the one JAX and TensorFlow use

    return np.dtype(ml_dtypes.bfloat16)


@dataclasses.dataclass(frozen=True)
class DType:
    code: int
    name: str  # the KServe v2 datatype name
    numpy: str  # a numpy dtype string, little-endian; "" for bfloat16 (resolved lazily)

    # Cached: these are read per tensor per request, and building a numpy dtype is not free.
    @functools.cached_property
    def np(self) -> np.dtype:
        return _bfloat16() if self.name == "BF16" else np.dtype(self.numpy)

    @functools.cached_property
    def size(self) -> int:
        return 2 if self.name == "BF16" else np.dtype(self.numpy).itemsize


DTYPES: tuple[DType, ...] = (
    DType(1, "BOOL", "|b1"), DType(2, "UINT8", "|u1"), DType(3, "INT8", "|i1"),
    DType(4, "UINT16", "<u2"), DType(5, "INT16", "<i2"), DType(6, "UINT32", "<u4"),
    DType(7, "INT32", "<i4"), DType(8, "UINT64", "<u8"), DType(9, "INT64", "<i8"),
    DType(10, "FP16", "<f2"), DType(11, "BF16", ""), DType(12, "FP32", "<f4"),
    DType(13, "FP64", "<f8"),
)
BY_CODE = {d.code: d for d in DTYPES}
BY_NAME = {d.name: d for d in DTYPES}


# id(numpy dtype) -> (that dtype, its DType) for every dtype object already seen: dtype_of
# runs per tensor per request, and hashing a numpy dtype costs more than the rest of it. The
# dtype is kept, so its id is never reused while it is here.
_BY_NUMPY: dict[int, tuple[np.dtype, DType]] = {}


def dtype_of(value) -> DType:
    """The DType for a KServe name ("FP32"), a numpy dtype or anything numpy accepts ("float32",
    and "bfloat16" whether or not ml_dtypes was imported yet)."""
    if isinstance(value, DType):
        return value
    known = _BY_NUMPY.get(id(value))
    if known is not None and known[0] is value:
        return known[1]
    if isinstance(value, str):
        if value.upper() in BY_NAME:
            return BY_NAME[value.upper()]
        if value.lower() == "bfloat16":
            return BY_NAME["BF16"]
    kind = np.dtype(value)
    for d in DTYPES:
        if d.np == kind.newbyteorder("<") and (d.name == "BF16") == (kind.name == "bfloat16"):
            if isinstance(value, np.dtype) and len(_BY_NUMPY) < 1024:
                _BY_NUMPY[id(value)] = (value, d)
            return d
    raise ValueError(f"dtype {kind} has no protocol code; use one of "
                     f"{', '.join(d.name for d in DTYPES)}")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One named input or output: a dtype and a shape where -1 matches any size."""

    name: str
    dtype: DType
    shape: tuple[int, ...]

    def __init__(self, name: str, dtype, shape: Sequence[int]):
        if not isinstance(name, str) or not 0 < len(name.encode()) <= MAX_NAME:
            raise ValueError(f"tensor name {name!r}: 1..{MAX_NAME} bytes of UTF-8")
        shape = tuple(int(d) for d in shape)
        if len(shape) > MAX_RANK or any(d < -1 or d > MAX_DIM for d in shape):
            raise ValueError(f"tensor {name!r}: shape {shape} needs rank <= {MAX_RANK} and dims "
                             f"-1 or 0..{MAX_DIM}")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", dtype_of(dtype))
        object.__setattr__(self, "shape", shape)

    def metadata(self) -> dict:
        return {"name": self.name, "datatype": self.dtype.name, "shape": list(self.shape)}


@dataclasses.dataclass(frozen=True)
class Signature:
    """What a model takes and returns. With ``max_batch_size`` > 0, dim 0 of every input and
    output is the batch dimension (declare it as -1) and concurrent requests may be stacked."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 0

    def __init__(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 max_batch_size: int = 0):
        inputs, outputs = tuple(inputs), tuple(outputs)
        if not 1 <= len(inputs) <= MAX_TENSORS or not 1 <= len(outputs) <= MAX_TENSORS:
            raise ValueError(f"a signature needs 1..{MAX_TENSORS} inputs and outputs")
        for group in (inputs, outputs):
            names = [t.name for t in group]
            if len(set(names)) != len(names):
                raise ValueError(f"tensor names repeat: {names}")
        if max_batch_size < 0:
            raise ValueError("max_batch_size must be >= 0")
        if max_batch_size and any(not t.shape or t.shape[0] != -1 for t in inputs + outputs):
            raise ValueError("a batched signature declares dim 0 of every tensor as -1")
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "outputs", outputs)
        object.__setattr__(self, "max_batch_size", int(max_batch_size))

    def metadata(self, name: str) -> dict:
        return {"name": name, "platform": "shmserve", "versions": ["1"],
                "inputs": [t.metadata() for t in self.inputs],
                "outputs": [t.metadata() for t in self.outputs],
                "max_batch_size": self.max_batch_size}


def metadata_json(name: str, signature: Signature | None) -> bytes:
    if signature is None:
        value = {"name": name, "platform": "shmserve", "versions": ["1"], "inputs": [],
                 "outputs": [], "max_batch_size": 0}
    else:
        value = signature.metadata(name)
    return json.dumps(value, separators=(",", ":")).encode()


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _tensor_error(code: ErrorCode, message: str) -> ProtocolError:
    return ProtocolError(code, message)


@dataclasses.dataclass(frozen=True)
class Layout:
    """A decoded TensorList header: for each tensor (name, dtype, shape, data_offset).

    The same header bytes always decode the same way, so a server keeps layouts by the exact
    header bytes and skips the parse for repeated shapes."""

    tensors: tuple[tuple[str, DType, tuple[int, ...], int], ...]
    size: int  # the body length this layout describes


def parse_layout(body) -> tuple[Layout, int]:
    """Check the header part of a TensorList (section 3.1, errors 1-2 except the BOOL check):
    returns the layout and how many leading bytes of the body it was read from."""
    size = len(body)
    if size < LIST_HEADER.size:
        raise _tensor_error(ErrorCode.BAD_LENGTH, f"TensorList of {size} bytes: the header "
                            f"needs {LIST_HEADER.size}")
    count, reserved, reserved2 = LIST_HEADER.unpack_from(body)
    if reserved or reserved2:
        raise _tensor_error(ErrorCode.BAD_TENSOR, "TensorList reserved bytes are not 0")
    if count > MAX_TENSORS:
        raise _tensor_error(ErrorCode.BAD_TENSOR, f"tensor_count {count} is over {MAX_TENSORS}")
    pos = LIST_HEADER.size
    headers = []
    for index in range(count):
        if pos + TENSOR_HEADER.size > size:
            raise _tensor_error(ErrorCode.BAD_TENSOR, f"tensor {index}: header past the end of "
                                f"the {size}-byte body")
        code, rank, name_len, reserved, data_offset, data_len = TENSOR_HEADER.unpack_from(body, pos)
        label = f"tensor {index}"
        if reserved:
            raise _tensor_error(ErrorCode.BAD_TENSOR, f"{label}: reserved bytes are not 0")
        if rank > MAX_RANK:
            raise _tensor_error(ErrorCode.BAD_TENSOR, f"{label}: rank {rank} is over {MAX_RANK}")
        if name_len > MAX_NAME:
            raise _tensor_error(ErrorCode.BAD_TENSOR, f"{label}: name_len {name_len} is over "
                                f"{MAX_NAME}")
        end = pos + TENSOR_HEADER.size + 8 * rank + name_len
        if end > size:
            raise _tensor_error(ErrorCode.BAD_TENSOR, f"{label}: header past the end of the "
                                f"{size}-byte body")
        dims = struct.unpack_from(f"<{rank}Q", body, pos + TENSOR_HEADER.size)
        try:
            name = bytes(body[end - name_len:end]).decode("utf-8")
        except UnicodeDecodeError:
            raise _tensor_error(ErrorCode.BAD_TENSOR, f"{label}: name is not UTF-8") from None
        if name:
            label = f"tensor {index} ({name!r})"
        if any(d > MAX_DIM for d in dims):
            raise _tensor_error(ErrorCode.BAD_TENSOR, f"{label}: a dim in {list(dims)} is over "
                                f"{MAX_DIM}")
        dtype = BY_CODE.get(code)
        if dtype is None:
            raise _tensor_error(ErrorCode.BAD_DTYPE, f"{label}: unknown dtype code {code}")
        count_elements = 1
        for d in dims:
            count_elements *= d
        if data_len != count_elements * dtype.size:
            raise _tensor_error(ErrorCode.BAD_TENSOR, f"{label}: data_len {data_len}, but "
                                f"{dtype.name}{list(dims)} is {count_elements * dtype.size} bytes")
        headers.append((name, dtype, dims, data_offset, data_len, label))
        pos = _align(end, HEADER_ALIGN)
    if count == 0:
        raise _tensor_error(ErrorCode.BAD_TENSOR, "tensor_count is 0")
    cursor = _align(pos, DATA_ALIGN)
    tensors = []
    for name, dtype, dims, data_offset, data_len, label in headers:
        if data_offset != cursor:
            raise _tensor_error(ErrorCode.BAD_TENSOR, f"{label}: data_offset {data_offset}, the "
                                f"canonical layout puts it at {cursor}")
        if data_offset + data_len > size:
            raise _tensor_error(ErrorCode.BAD_TENSOR, f"{label}: data ends at byte "
                                f"{data_offset + data_len}, past the {size}-byte body")
        tensors.append((name, dtype, dims, data_offset))
        end = data_offset + data_len
        cursor = _align(end, DATA_ALIGN)
    if end != size:
        raise _tensor_error(ErrorCode.BAD_TENSOR, f"{size - end} bytes after the last tensor")
    return Layout(tuple(tensors), size), pos


def views(body, layout: Layout) -> list[tuple[str, np.ndarray]]:
    """Zero-copy numpy views of every tensor in ``body`` (checks BOOL bytes)."""
    out = []
    for name, dtype, dims, offset in layout.tensors:
        count = math.prod(dims)
        array = np.frombuffer(body, dtype.np, count, offset).reshape(dims)
        if dtype.code == 1 and count and array.view(np.uint8).max() > 1:
            raise _tensor_error(ErrorCode.BAD_TENSOR, f"tensor {name or len(out)!r}: a BOOL "
                                f"byte is not 0 or 1")
        out.append((name, array))
    return out


def decode(body) -> list[tuple[str, np.ndarray]]:
    """A TensorList as (name, view) pairs; names are "" for positional tensors."""
    layout, _ = parse_layout(body)
    return views(body, layout)


def bind(signature: Signature, tensors: list[tuple[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Section 3.1 errors 4-6: match decoded tensors to the signature's inputs."""
    specs = signature.inputs
    named = [bool(name) for name, _ in tensors]
    if any(named) and not all(named):
        raise _tensor_error(ErrorCode.BAD_INPUT, "name every tensor or none")
    if len(tensors) > len(specs):
        raise _tensor_error(ErrorCode.BAD_INPUT, f"{len(tensors)} tensors, the model takes "
                            f"{len(specs)} input(s): {', '.join(s.name for s in specs)}")
    if all(named):
        by_name: dict[str, np.ndarray] = {}
        known = {s.name for s in specs}
        for name, array in tensors:
            if name not in known:
                raise _tensor_error(ErrorCode.BAD_INPUT, f"no input named {name!r}; the model "
                                    f"takes {', '.join(s.name for s in specs)}")
            if name in by_name:
                raise _tensor_error(ErrorCode.BAD_INPUT, f"input {name!r} given twice")
            by_name[name] = array
    else:
        by_name = {spec.name: array for spec, (_, array) in zip(specs, tensors)}
    for spec in specs:
        if spec.name not in by_name:
            raise _tensor_error(ErrorCode.BAD_INPUT, f"input {spec.name!r} is missing")
    for spec in specs:
        array = by_name[spec.name]
        kind = dtype_of(array.dtype)
        if kind.code != spec.dtype.code:
            raise _tensor_error(ErrorCode.BAD_DTYPE, f"input {spec.name!r}: dtype {kind.name}, "
                                f"the signature says {spec.dtype.name}")
    batch = None
    for spec in specs:
        shape = by_name[spec.name].shape
        if len(shape) != len(spec.shape) or any(want not in (-1, got)
                                                for want, got in zip(spec.shape, shape)):
            raise _tensor_error(ErrorCode.BAD_SHAPE, f"input {spec.name!r}: shape {list(shape)}, "
                                f"the signature says {list(spec.shape)}")
        if signature.max_batch_size:
            rows = shape[0]
            if not 1 <= rows <= signature.max_batch_size:
                raise _tensor_error(ErrorCode.BAD_SHAPE, f"input {spec.name!r}: batch of {rows}, "
                                    f"the model takes 1..{signature.max_batch_size}")
            if batch is not None and rows != batch:
                raise _tensor_error(ErrorCode.BAD_SHAPE, f"input {spec.name!r}: batch of {rows}, "
                                    f"other inputs have {batch}")
            batch = rows
    return by_name


class Binding:
    """A Layout matched to a signature's inputs once (``bind`` passed for it): a request with
    the same header bytes and length only needs its views built, in signature order."""

    __slots__ = ("plan", "header", "size")

    def __init__(self, signature: Signature, layout: Layout, header: bytes):
        if layout.tensors[0][0]:
            by_name = {t[0]: t for t in layout.tensors}
        else:
            by_name = {spec.name: t for spec, t in zip(signature.inputs, layout.tensors)}
        plan = []
        for spec in signature.inputs:
            _, dtype, dims, offset = by_name[spec.name]
            if dims and all(dims):
                # A dtype of one row: frombuffer makes the whole shape at once, no reshape.
                plan.append((spec.name, np.dtype((dtype.np, dims[1:])), dims[0], None, offset,
                             dtype.code == 1))
            else:  # a scalar, or a zero dim (a row of no bytes is no dtype): flat, reshaped
                plan.append((spec.name, dtype.np, math.prod(dims), dims, offset, dtype.code == 1))
        self.plan = tuple(plan)
        self.header = header
        self.size = layout.size

    def matches(self, body) -> bool:
        return len(body) == self.size and body[:len(self.header)] == self.header

    def arrays(self, body) -> dict[str, np.ndarray]:
        out = {}
        for name, dtype, count, dims, offset, is_bool in self.plan:
            array = np.frombuffer(body, dtype, count, offset)
            if dims is not None:
                array = array.reshape(dims)
            if is_bool and count and array.view(np.uint8).max() > 1:
                raise _tensor_error(ErrorCode.BAD_TENSOR, f"tensor {name!r}: a BOOL byte is "
                                    f"not 0 or 1")
            out[name] = array
        return out


# Header plans kept by encode() and by each OutputEncoder: a model answers a handful of
# shapes, and packing the headers costs more than copying a few KiB of data.
_PLANS_KEPT = 256
# The header padded up to the first tensor's data, and the padding after each tensor's data.
_Plan = tuple[bytes, tuple[bytes, ...]]
_HEADERS: dict[tuple, _Plan] = {}


def _header_plan(tensors: Sequence[tuple[str, DType, np.ndarray]]) -> _Plan:
    """The plan of a canonical TensorList of these (name, dtype, array)."""
    pos = LIST_HEADER.size
    at = []
    for name, _, array in tensors:
        raw = name.encode()
        if len(raw) > MAX_NAME or array.ndim > MAX_RANK:
            raise ValueError(f"tensor {name!r}: name over {MAX_NAME} bytes or rank over {MAX_RANK}")
        at.append((raw, pos))
        pos = _align(pos + TENSOR_HEADER.size + 8 * array.ndim + len(raw), HEADER_ALIGN)
    cursor = _align(pos, DATA_ALIGN)
    header = bytearray(cursor)
    LIST_HEADER.pack_into(header, 0, len(tensors), 0, 0)
    pads = []
    for (raw, header_pos), (_, dtype, array) in zip(at, tensors):
        TENSOR_HEADER.pack_into(header, header_pos, dtype.code, array.ndim, len(raw), 0, cursor,
                                array.nbytes)
        struct.pack_into(f"<{array.ndim}Q", header, header_pos + TENSOR_HEADER.size, *array.shape)
        name_at = header_pos + TENSOR_HEADER.size + 8 * array.ndim
        header[name_at:name_at + len(raw)] = raw
        end = cursor + array.nbytes
        cursor = _align(end, DATA_ALIGN)
        pads.append(bytes(cursor - end))
    if pads:
        pads[-1] = b""  # the body ends with the last tensor's data
    return bytes(header), tuple(pads)


def encode(tensors: Sequence[tuple[str, np.ndarray]]) -> bytearray:
    """Encode (name, array) pairs as a canonical TensorList (names may be "" for positional)."""
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"{len(tensors)} tensors: at most {MAX_TENSORS}")
    typed = []
    for name, array in tensors:
        array = np.asarray(array)
        dtype = dtype_of(array.dtype)
        if array.dtype != dtype.np:  # big-endian: the wire is little-endian
            array = array.astype(dtype.np)
        typed.append((name, dtype, array))
    key = tuple((name, dtype.code, array.shape) for name, dtype, array in typed)
    plan = _HEADERS.get(key)
    if plan is None:
        plan = _header_plan(typed)
        if len(_HEADERS) < _PLANS_KEPT:
            _HEADERS[key] = plan
    return _write(plan, [array for _, _, array in typed])


def _write(plan: _Plan, arrays: Sequence[np.ndarray]) -> bytearray:
    header, pads = plan
    out = bytearray(header)
    for array, pad in zip(arrays, pads):
        try:
            out.extend(array)  # its buffer, with no array made for it: C-contiguous ones only
        except TypeError:
            out.extend(np.ascontiguousarray(array))
        out += pad
    return out


class OutputEncoder:
    """Encodes a model's outputs (a mapping by name, a sequence in signature order, or one
    array for a one-output model) as INFER reply bodies, checked against the signature. The
    check and the header are done once per distinct output shapes; a reply of shapes already
    seen, in the declared dtypes, goes straight to the copy."""

    __slots__ = ("specs", "_names", "_dtypes", "_plans")

    def __init__(self, signature: Signature):
        self.specs = signature.outputs
        self._names = [s.name for s in self.specs]
        self._dtypes = [s.dtype.np for s in self.specs]
        self._plans: dict[tuple[tuple[int, ...], ...], _Plan] = {}

    def encode(self, outputs) -> bytearray:
        arrays = self._ordered(outputs)
        shapes = []
        for array, dtype in zip(arrays, self._dtypes):
            if type(array) is not np.ndarray or array.dtype != dtype:
                break
            shapes.append(array.shape)
        else:
            plan = self._plans.get(tuple(shapes))
            if plan is not None:
                return _write(plan, arrays)
        arrays = self._checked(arrays)
        key = tuple(a.shape for a in arrays)
        plan = self._plans.get(key)
        if plan is None:
            plan = _header_plan([(s.name, s.dtype, a) for s, a in zip(self.specs, arrays)])
            if len(self._plans) < _PLANS_KEPT:
                self._plans[key] = plan
        return _write(plan, arrays)

    def _ordered(self, outputs) -> list:
        if isinstance(outputs, dict) or (not isinstance(outputs, (list, tuple, np.ndarray))
                                         and isinstance(outputs, Mapping)):  # the ABC is slow
            try:
                arrays = [outputs[name] for name in self._names]
            except KeyError:
                arrays = None
            if arrays is None or len(outputs) != len(self._names):
                raise TypeError(f"model outputs {sorted(outputs)}; the signature declares "
                                f"{self._names}")
            return arrays
        arrays = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        if len(arrays) != len(self._names):
            raise TypeError(f"model returned {len(arrays)} output(s); the signature declares "
                            f"{len(self._names)}")
        return arrays

    def _checked(self, arrays: list) -> list[np.ndarray]:
        checked = []
        for spec, array in zip(self.specs, arrays):
            array = np.asarray(array)
            if dtype_of(array.dtype).code != spec.dtype.code:
                # numpy widens easily (a float64 result for an FP32 output): convert within
                # the same kind of number, and refuse a change of kind, which is a model bug.
                if array.dtype.kind != spec.dtype.np.kind:
                    raise TypeError(f"output {spec.name!r}: dtype {array.dtype}, the signature "
                                    f"says {spec.dtype.name}")
            if array.dtype != spec.dtype.np:  # also a big-endian array of the right kind
                array = array.astype(spec.dtype.np)
            shape = array.shape
            if len(shape) != len(spec.shape) or not all(w == -1 or w == g
                                                        for w, g in zip(spec.shape, shape)):
                raise TypeError(f"output {spec.name!r}: shape {list(array.shape)}, the signature "
                                f"says {list(spec.shape)}")
            checked.append(array)
        return checked
