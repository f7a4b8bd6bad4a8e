"""Regenerates the conformance vectors from the spec's byte layouts, with nothing but
``struct``, so the vectors never inherit a bug from either implementation.

    python3 spec/vectors/make_vectors.py   # rewrites packets.json, bodies.json, ring.json
"""
import json
import pathlib
import struct

HERE = pathlib.Path(__file__).parent
MAX_BODY = 16 * 1024 * 1024


def packet(msg_type, body):
    return struct.pack(">IB", len(body) + 1, msg_type) + body


def packets():
    image = bytes(range(256)) * 12
    ok = [
        ("echo empty", 0, b""),
        ("echo hello", 0, b"hello"),
        ("echo 3072 bytes (classic image size, length 00 00 0C 01)", 0, image),
        ("classify image", 1, image),
        ("classify reply label", 1, b"airplane"),
        ("prompt", 4, struct.pack("<I", 16) + "Hi, Gemma".encode()),
        ("stream chunk", 6, "héllo".encode()),
        ("stream end", 7, b""),
        ("error reply", 0xFF, struct.pack("<H", 1) + b"type 0x42 is not a request type"),
        ("unknown type still frames", 0x42, b"\x01\x02"),
    ]
    cases = [{"name": n, "hex": packet(t, b).hex(), "type": t, "body_hex": b.hex()}
             for n, t, b in ok]
    cases[2]["note"] = "length field 3073 = 00 00 0c 01"
    bad = [
        ("empty input", b"", "TRUNCATED"),
        ("partial length", b"\x00\x00", "TRUNCATED"),
        ("length 0", b"\x00\x00\x00\x00", "BAD_LENGTH"),
        ("body missing", b"\x00\x00\x00\x05\x00ab", "TRUNCATED"),
        ("max body + 1", struct.pack(">I", MAX_BODY + 2), "TOO_LARGE"),
        ("huge length", b"\xff\xff\xff\xff\x00", "TOO_LARGE"),
    ]
    cases += [{"name": n, "hex": h.hex(), "error": e} for n, h, e in bad]
    cases.append({"name": "largest allowed length, body still to come",
                  "hex": struct.pack(">IB", MAX_BODY + 1, 0).hex(), "error": "TRUNCATED"})
    return {"max_body": MAX_BODY, "cases": cases}


def bodies():
    image = bytes(3072)
    prompt = lambda steps, text: struct.pack("<I", steps) + text
    c = []

    def add(name, t, body, repeat=1, **result):
        c.append({"name": name, "type": t, "body_hex": body.hex(),
                  **({"repeat": repeat} if repeat > 1 else {}), **result})

    add("echo anything", 0, b"\x00\xff", ok=True)
    add("classify 3072", 1, image, ok=True, images=1)
    add("classify 3071", 1, image[:-1], error="BAD_LENGTH")
    add("classify 3073", 1, image + b"\x00", error="BAD_LENGTH")
    add("scores 3072", 2, image, ok=True, images=1)
    add("scores empty", 2, b"", error="BAD_LENGTH")
    add("batch of 2", 3, image, repeat=2, ok=True, images=2)
    add("batch empty", 3, b"", error="BAD_LENGTH")
    add("batch not a multiple", 3, image + b"\x00", error="BAD_LENGTH")
    add("batch of 256", 3, image, repeat=256, ok=True, images=256)
    add("batch of 257", 3, image, repeat=257, error="BAD_LENGTH")
    add("prompt", 4, prompt(32, "Why is the sky blue?".encode()), ok=True, max_new_tokens=32,
        prompt="Why is the sky blue?")
    add("prompt stream utf-8", 5, prompt(7, "日本語".encode()), ok=True, max_new_tokens=7,
        prompt="日本語")
    add("prompt short header", 4, b"\x01\x00", error="BAD_LENGTH")
    add("prompt empty", 4, prompt(5, b""), error="EMPTY_PROMPT")
    add("prompt invalid utf-8", 4, prompt(5, b"ok\xc3\x28"), error="INVALID_UTF8")
    add("prompt truncated utf-8", 5, prompt(5, "é".encode()[:1]), error="INVALID_UTF8")
    # Section 3's order: content errors before the model's max_new_tokens range.
    add("prompt empty with zero tokens", 4, prompt(0, b""), error="EMPTY_PROMPT")
    add("prompt invalid utf-8 with zero tokens", 5, prompt(0, b"\xff"), error="INVALID_UTF8")
    add("metadata", 9, b"", ok=True)
    add("metadata with a body", 9, b"\x00", error="BAD_LENGTH")
    add("infer shorter than a list header", 8, b"\x01\x00\x00", error="BAD_LENGTH")
    add("unknown type", 0x42, b"", error="UNKNOWN_TYPE")
    add("reply-only type as request", 6, b"x", error="UNKNOWN_TYPE")
    add("error type as request", 0xFF, b"\x01\x00", error="UNKNOWN_TYPE")
    scores = [0.01] * 10
    scores[3] = 0.91
    record = struct.pack("<B3x10f", 3, *scores)
    c.append({"name": "score record", "reply_type": 2, "body_hex": record.hex(),
              "index": 3, "probabilities": [struct.unpack("<f", struct.pack("<f", p))[0]
                                            for p in scores]})
    c.append({"name": "error body", "reply_type": 0xFF,
              "body_hex": (struct.pack("<H", 6) + b"prompt needs 2000 tokens").hex(),
              "code": 6, "message": "prompt needs 2000 tokens"})
    return {"cases": c}


def header(slots=4, req=3072, resp=64, magic=b"SHMSRING", major=1, minor=0, header_size=256,
           stride=None, total=None, generation=0x0123456789ABCDEF):
    stride = stride if stride is not None else (128 + req + resp + 63) // 64 * 64
    total = total if total is not None else 256 + slots * stride
    h = bytearray(256)
    struct.pack_into("<8sHHIIIIIQQII", h, 0, magic, major, minor, header_size, slots, stride,
                     req, resp, total, generation, 4242, 0)
    struct.pack_into("<IIQ", h, 64, 2, 0, 123456789)
    return bytes(h), 256 + slots * ((128 + req + resp + 63) // 64 * 64)


def ring():
    cases = []

    def add(name, mapping_size=None, expect=None, **kw):
        h, natural = header(**kw)
        cases.append({"name": name, "kind": "header", "hex": h.hex(),
                      "mapping_size": mapping_size if mapping_size is not None else natural,
                      **expect})

    add("valid 4 slots", expect={"ok": True, "slot_count": 4, "slot_stride": 3264,
                                 "req_capacity": 3072, "resp_capacity": 64,
                                 "total_size": 256 + 4 * 3264,
                                 "generation": "0123456789abcdef", "server_state": 2})
    add("valid minor 7", minor=7, expect={"ok": True, "slot_count": 4, "slot_stride": 3264,
                                          "req_capacity": 3072, "resp_capacity": 64,
                                          "total_size": 256 + 4 * 3264,
                                          "generation": "0123456789abcdef", "server_state": 2})
    add("bad magic", magic=b"SHMSRINX", expect={"error": "BAD_MAGIC"})
    add("zero magic (still being created)", magic=bytes(8), expect={"error": "BAD_MAGIC"})
    add("major 2", major=2, expect={"error": "BAD_VERSION"})
    add("header_size 128", header_size=128, expect={"error": "BAD_GEOMETRY"})
    add("zero slots", slots=0, expect={"error": "BAD_GEOMETRY"})
    add("too many slots", slots=1025, expect={"error": "BAD_GEOMETRY"})
    add("req_capacity below an image", req=3008, expect={"error": "BAD_GEOMETRY"})
    add("resp_capacity not a multiple of 64", resp=100, expect={"error": "BAD_GEOMETRY"})
    add("stride lies", stride=4096, expect={"error": "BAD_GEOMETRY"})
    add("total_size lies", total=999999, expect={"error": "BAD_GEOMETRY"})
    add("mapping shorter than total", mapping_size=1000, expect={"error": "BAD_GEOMETRY"})
    add("generation zero", generation=0, expect={"error": "BAD_GEOMETRY"})
    cases.append({"name": "mapping shorter than a header", "kind": "header",
                  "hex": header()[0][:100].hex(), "mapping_size": 100, "error": "BAD_GEOMETRY"})

    # Reply frames, checked by a client that sent req_seq 7 with req_id 0x1122334455667788
    # on a ring whose resp_capacity is 64.
    def frame(frame_seq=1, req_seq=7, req_id=0x1122334455667788, length=5, ftype=0, flags=1):
        line = bytearray(64)
        struct.pack_into("<IIQIBB", line, 0, frame_seq, req_seq, req_id, length, ftype, flags)
        return line.hex()

    expect = {"req_seq": 7, "req_id": "1122334455667788", "resp_capacity": 64}
    for name, kw, result in [
        ("final echo frame", {}, {"ok": True, "final": True, "frame_type": 0, "frame_len": 5}),
        ("non-final chunk", {"ftype": 6, "flags": 0, "length": 64},
         {"ok": True, "final": False, "frame_type": 6, "frame_len": 64}),
        ("frame_len over capacity", {"length": 65}, {"error": "CORRUPT_RECORD"}),
        ("answers another request", {"req_seq": 6}, {"error": "MISROUTED"}),
        ("answers another id", {"req_id": 1}, {"error": "MISROUTED"}),
        ("unknown frame type", {"ftype": 0x42}, {"error": "CORRUPT_RECORD"}),
        ("request-only type as frame", {"ftype": 5}, {"error": "CORRUPT_RECORD"}),
        ("infer reply frame", {"ftype": 8}, {"ok": True, "final": True, "frame_type": 8,
                                             "frame_len": 5}),
        ("final stream chunk", {"ftype": 6}, {"error": "CORRUPT_RECORD"}),
        ("non-final stream end", {"ftype": 7, "flags": 0, "length": 0}, {"error": "CORRUPT_RECORD"}),
        # Checks run in section 9's order: misrouted wins over every other fault.
        ("misrouted and oversized", {"req_seq": 6, "length": 65}, {"error": "MISROUTED"}),
    ]:
        cases.append({"name": name, "kind": "frame", "hex": frame(**kw), **expect, **result})

    # Request records, checked by the server (slot client line; req_capacity 3072).
    def request(owner=4242, req_seq=1, req_id=9, length=3072, rtype=1):
        line = bytearray(64)
        struct.pack_into("<IIQIB", line, 0, owner, req_seq, req_id, length, rtype)
        return line.hex()

    for name, kw, result in [
        ("classify request", {}, {"ok": True, "req_type": 1, "req_len": 3072, "req_id": 9}),
        ("req_len over capacity", {"length": 3073}, {"error": "CORRUPT_RECORD"}),
        ("huge req_len", {"length": 0xFFFFFFFF}, {"error": "CORRUPT_RECORD"}),
        ("unowned slot", {"owner": 0}, {"error": "CORRUPT_RECORD"}),
        ("unknown type", {"rtype": 0x42, "length": 1}, {"error": "UNKNOWN_TYPE"}),
        ("classify short", {"length": 100}, {"error": "BAD_LENGTH"}),
    ]:
        cases.append({"name": name, "kind": "request", "hex": request(**kw),
                      "req_capacity": 3072, **result})
    return {"frame_offset_note": "frame cases are the slot's server cache line (slot bytes "
                                 "64..127); request cases its client line (bytes 0..63)",
            "cases": cases}


DTYPE_CODES = {"BOOL": 1, "UINT8": 2, "INT8": 3, "UINT16": 4, "INT16": 5, "UINT32": 6, "INT32": 7,
               "UINT64": 8, "INT64": 9, "FP16": 10, "BF16": 11, "FP32": 12, "FP64": 13}
DTYPE_SIZES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "UINT32": 4, "INT32": 4,
               "UINT64": 8, "INT64": 8, "FP16": 2, "BF16": 2, "FP32": 4, "FP64": 8}


def align(n, to):
    return (n + to - 1) // to * to


def tensor_list(tensors, count=None, reserved=0, tensor_reserved=0, offsets=None, lens=None,
                tail=b""):
    """A TensorList laid out by section 3.1 with struct alone; the keyword arguments break one
    rule each, for the invalid cases. ``tensors``: (name, dtype code, dims, data bytes)."""
    headers = []
    pos = 8
    for name, code, dims, data in tensors:
        raw = name.encode()
        headers.append((raw, code, dims, data, pos))
        pos = align(pos + 24 + 8 * len(dims) + len(raw), 8)
    cursor = align(pos, 64)
    out = bytearray(pos)
    struct.pack_into("<HHI", out, 0, len(tensors) if count is None else count, 0, reserved)
    for i, (raw, code, dims, data, at) in enumerate(headers):
        offset = cursor if offsets is None else offsets[i]
        length = len(data) if lens is None else lens[i]
        struct.pack_into(f"<BBHIQQ{len(dims)}Q", out, at, code, len(dims), len(raw),
                         tensor_reserved, offset, length, *dims)
        out[at + 24 + 8 * len(dims):at + 24 + 8 * len(dims) + len(raw)] = raw
        out += bytes(cursor - len(out)) + data
        cursor = align(len(out), 64)
    return bytes(out) + tail


def tensors_vectors():
    """INFER bodies decoded against one signature (section 3.1)."""
    signature = {"name": "vectors", "platform": "shmserve", "versions": ["1"],
                 "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]},
                            {"name": "mask", "datatype": "BOOL", "shape": [-1]}],
                 "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
                 "max_batch_size": 4}
    x2 = struct.pack("<6f", 1, 2, 3, 4, 5, 6)
    mask2 = b"\x01\x00"
    x = ("x", 12, [2, 3], x2)
    mask = ("mask", 1, [2], mask2)
    ok_result = [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data_hex": x2.hex()},
                 {"name": "mask", "datatype": "BOOL", "shape": [2], "data_hex": mask2.hex()}]
    cases = []

    def add(name, body, **expect):
        cases.append({"name": name, "body_hex": body.hex(), **expect})

    add("named, in order", tensor_list([x, mask]), ok=ok_result)
    add("named, out of order", tensor_list([mask, x]), ok=ok_result)
    add("positional", tensor_list([("", 12, [2, 3], x2), ("", 1, [2], mask2)]), ok=ok_result)
    add("one row", tensor_list([("x", 12, [1, 3], x2[:12]), ("mask", 1, [1], b"\x01")]),
        ok=[{"name": "x", "datatype": "FP32", "shape": [1, 3], "data_hex": x2[:12].hex()},
            {"name": "mask", "datatype": "BOOL", "shape": [1], "data_hex": "01"}])
    add("shorter than the list header", b"\x01\x00\x00\x00", error="BAD_LENGTH")
    add("zero tensors", tensor_list([]), error="BAD_TENSOR")
    add("65 tensors", tensor_list([x, mask], count=65), error="BAD_TENSOR")
    add("list reserved not zero", tensor_list([x, mask], reserved=1), error="BAD_TENSOR")
    add("tensor reserved not zero", tensor_list([x, mask], tensor_reserved=7), error="BAD_TENSOR")
    add("header past the body", tensor_list([x, mask])[:40], error="BAD_TENSOR")
    add("rank 9", tensor_list([("x", 12, [1] * 9, x2[:4]), mask]), error="BAD_TENSOR")
    add("dim over 2^31-1", tensor_list([("x", 12, [2 ** 31, 0], b""), mask]), error="BAD_TENSOR")
    add("name not utf-8", tensor_list([("x", 12, [2, 3], x2), mask]).replace(b"mask", b"m\xffsk"),
        error="BAD_TENSOR")
    add("data_len is not dims times size", tensor_list([x, mask], lens=[20, 2]),
        error="BAD_TENSOR")
    add("data_offset not canonical", tensor_list([x, mask], offsets=[192, 256]),
        error="BAD_TENSOR")
    add("data past the body", tensor_list([x, mask])[:-1], error="BAD_TENSOR")
    add("bytes after the last tensor", tensor_list([x, mask], tail=b"\x00"), error="BAD_TENSOR")
    add("bool byte 2", tensor_list([x, ("mask", 1, [2], b"\x01\x02")]), error="BAD_TENSOR")
    add("unknown dtype code", tensor_list([("x", 99, [2, 3], x2), mask]), error="BAD_DTYPE")
    add("some named, some not", tensor_list([x, ("", 1, [2], mask2)]), error="BAD_INPUT")
    add("unknown input name", tensor_list([x, ("maks", 1, [2], mask2)]), error="BAD_INPUT")
    add("input given twice", tensor_list([x, x]), error="BAD_INPUT")
    add("input missing", tensor_list([x]), error="BAD_INPUT")
    add("more tensors than inputs", tensor_list([("", 12, [2, 3], x2), ("", 1, [2], mask2),
                                                 ("", 1, [2], mask2)]), error="BAD_INPUT")
    add("wrong dtype", tensor_list([("x", 13, [2, 3], x2 + x2), mask]), error="BAD_DTYPE")
    add("wrong rank", tensor_list([("x", 12, [6], x2), mask]), error="BAD_SHAPE")
    add("wrong fixed dim", tensor_list([("x", 12, [3, 2], x2), ("mask", 1, [3], b"\x01" * 3)]),
        error="BAD_SHAPE")
    add("batch of 0", tensor_list([("x", 12, [0, 3], b""), ("mask", 1, [0], b"")]),
        error="BAD_SHAPE")
    add("batch over max_batch_size",
        tensor_list([("x", 12, [5, 3], bytes(60)), ("mask", 1, [5], bytes(5))]),
        error="BAD_SHAPE")
    add("batches differ", tensor_list([x, ("mask", 1, [1], b"\x01")]), error="BAD_SHAPE")
    # Replies: what a client decodes (every dtype once, rank 0 and an empty tensor included).
    replies = []
    for dtype, dims in [("BOOL", [2]), ("UINT8", [3]), ("INT8", [1, 2]), ("UINT16", [2]),
                        ("INT16", [2]), ("UINT32", [1]), ("INT32", [2, 2]), ("UINT64", [1]),
                        ("INT64", []), ("FP16", [2]), ("BF16", [2]), ("FP32", [0, 3]),
                        ("FP64", [1])]:
        n = 1
        for d in dims:
            n *= d
        data = bytes((i * 37 + 1) % 2 if dtype == "BOOL" else (i * 37 + 1) % 256
                     for i in range(n * DTYPE_SIZES[dtype]))
        replies.append((f"out_{dtype.lower()}", DTYPE_CODES[dtype], dims, data, dtype))
    body = tensor_list([(n, c, d, data) for n, c, d, data, _ in replies])
    cases.append({"name": "reply with every dtype", "reply": True, "body_hex": body.hex(),
                  "ok": [{"name": n, "datatype": t, "shape": d, "data_hex": data.hex()}
                         for n, c, d, data, t in replies]})
    return {"signature": signature, "dtype_codes": DTYPE_CODES, "cases": cases}


if __name__ == "__main__":
    for name, build in (("packets", packets), ("bodies", bodies), ("ring", ring),
                        ("tensors", tensors_vectors)):
        (HERE / f"{name}.json").write_text(json.dumps(build(), indent=1, ensure_ascii=False) + "\n")
        print("wrote", HERE / f"{name}.json")
