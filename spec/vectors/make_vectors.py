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


if __name__ == "__main__":
    for name, build in (("packets", packets), ("bodies", bodies), ("ring", ring)):
        (HERE / f"{name}.json").write_text(json.dumps(build(), indent=1, ensure_ascii=False) + "\n")
        print("wrote", HERE / f"{name}.json")
