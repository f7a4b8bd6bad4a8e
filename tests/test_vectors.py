"""The Python implementation against spec/vectors (the Go suite runs the same files)."""
import json
import pathlib
import struct

import pytest

from shmserve import layout as L
from shmserve.protocol import (FramingError, MsgType, ProtocolError, check_request,
                               decode_error, decode_packet, decode_prompt, decode_scores)

VECTORS = pathlib.Path(__file__).parent.parent / "spec" / "vectors"


def cases(name):
    data = json.loads((VECTORS / f"{name}.json").read_text())
    return [pytest.param(c, id=c["name"]) for c in data["cases"]]


@pytest.mark.parametrize("case", cases("packets"))
def test_packet(case):
    data = bytes.fromhex(case["hex"])
    if "error" in case:
        with pytest.raises(FramingError) as info:
            decode_packet(data)
        assert info.value.name == case["error"]
    else:
        msg_type, body, used = decode_packet(data)
        assert (msg_type, body.hex(), used) == (case["type"], case["body_hex"], len(data))


def decode_request(msg_type, body):
    msg_type = check_request(msg_type, len(body))
    if msg_type in (MsgType.PROMPT, MsgType.PROMPT_STREAM):
        prompt, steps = decode_prompt(body)
        return {"prompt": prompt, "max_new_tokens": steps}
    if msg_type in (MsgType.CLASSIFY, MsgType.CLASSIFY_SCORES, MsgType.CLASSIFY_BATCH):
        return {"images": len(body) // 3072}
    return {}


@pytest.mark.parametrize("case", cases("bodies"))
def test_body(case):
    body = bytes.fromhex(case["body_hex"]) * case.get("repeat", 1)
    if case.get("reply_type") == MsgType.CLASSIFY_SCORES:
        [(index, probabilities)] = decode_scores(body)
        assert index == case["index"] and list(probabilities) == case["probabilities"]
    elif case.get("reply_type") == MsgType.ERROR:
        assert decode_error(body) == (case["code"], case["message"])
    elif "error" in case:
        with pytest.raises(ProtocolError) as info:
            decode_request(case["type"], body)
        assert info.value.code.name == case["error"]
    else:
        fields = decode_request(case["type"], body)
        for key, value in fields.items():
            assert case[key] == value


@pytest.mark.parametrize("case", cases("ring"))
def test_ring_record(case):
    data = bytes.fromhex(case["hex"])
    if case["kind"] == "header":
        if "error" in case:
            with pytest.raises(L.LayoutError) as info:
                L.parse_header(data, case["mapping_size"])
            assert info.value.name == case["error"]
        else:
            geometry, generation = L.parse_header(data + bytes(case["mapping_size"] - len(data)),
                                                  case["mapping_size"])
            assert geometry.slot_count == case["slot_count"]
            assert geometry.slot_stride == case["slot_stride"]
            assert geometry.total_size == case["total_size"]
            assert f"{generation:016x}" == case["generation"]
            assert struct.unpack_from("<I", data, L.H_SERVER_STATE)[0] == case["server_state"]
    elif case["kind"] == "frame":
        frame = L.Frame._make(L.FRAME_LINE.unpack_from(data))
        check = lambda: L.check_frame(frame, case["req_seq"], int(case["req_id"], 16),
                                      case["resp_capacity"])
        if "error" in case:
            with pytest.raises(L.FrameError) as info:
                check()
            assert info.value.name == case["error"]
        else:
            check()
            assert (frame.final, frame.msg_type, frame.length) == \
                (case["final"], case["frame_type"], case["frame_len"])
    else:
        record = L.RequestRecord._make(L.REQUEST_LINE.unpack_from(data))
        problem = L.check_request_record(record.owner, record.length, case["req_capacity"])
        if problem:
            assert case["error"] == "CORRUPT_RECORD", problem
            return
        if "error" in case:
            with pytest.raises(ProtocolError) as info:
                check_request(record.msg_type, record.length)
            assert info.value.code.name == case["error"]
        else:
            assert check_request(record.msg_type, record.length) == case["req_type"]
            assert (record.length, record.req_id) == (case["req_len"], case["req_id"])


def test_layout_offsets_match_spec_table():
    """The offsets table of spec section 7 is the source; this catches a drifted constant."""
    spec = (VECTORS.parent / "PROTOCOL.md").read_text()
    for field, const in [("magic", L.H_MAGIC), ("generation", L.H_GENERATION),
                         ("server_state", L.H_SERVER_STATE), ("heartbeat_ns", L.H_HEARTBEAT_NS),
                         ("doorbell", L.H_DOORBELL), ("owner", L.S_OWNER),
                         ("req_seq", L.S_REQ_SEQ), ("ack_seq", L.S_ACK_SEQ),
                         ("cancel_seq", L.S_CANCEL_SEQ), ("frame_seq", L.S_FRAME_SEQ),
                         ("frame_flags", L.S_FRAME_FLAGS)]:
        assert any(line.split()[:1] == [str(const)] and field in line.split()
                   for line in spec.splitlines()), field
