"""Message types, error codes and body codecs shared by every transport.

Mirrors spec/PROTOCOL.md sections 3-5. Body fields are little-endian; only the
stream-packet length prefix is big-endian (for wire compatibility with the
classic image server).
"""
from __future__ import annotations

import enum
import struct


class MsgType(enum.IntEnum):
    ECHO = 0x00
    CLASSIFY = 0x01          # reply: UTF-8 label name (classic)
    CLASSIFY_SCORES = 0x02   # reply: ScoreRecord
    CLASSIFY_BATCH = 0x03    # body: N x 3072 bytes; reply: N x ScoreRecord
    PROMPT = 0x04            # body: PromptHeader + UTF-8 prompt; reply: UTF-8 text
    PROMPT_STREAM = 0x05     # same body; replies: STREAM_CHUNK* then STREAM_END
    STREAM_CHUNK = 0x06      # reply only: a UTF-8 piece of the generated text
    STREAM_END = 0x07        # reply only: empty body, ends a stream
    INFER = 0x08             # body: TensorList of inputs; reply: TensorList of outputs
    METADATA = 0x09          # body: empty; reply: the model's signature as UTF-8 JSON
    ERROR = 0xFF             # reply only: ErrorBody


REQUEST_TYPES = frozenset({MsgType.ECHO, MsgType.CLASSIFY, MsgType.CLASSIFY_SCORES,
                           MsgType.CLASSIFY_BATCH, MsgType.PROMPT, MsgType.PROMPT_STREAM,
                           MsgType.INFER, MsgType.METADATA})


class ErrorCode(enum.IntEnum):
    UNKNOWN_TYPE = 1        # type byte is not a request type
    BAD_LENGTH = 2          # body size is wrong for the type
    TOO_LARGE = 3           # request exceeds the transport's maximum
    INVALID_UTF8 = 4
    BAD_ARGUMENT = 5        # e.g. max_new_tokens out of range
    PROMPT_TOO_LONG = 6     # prompt + steps do not fit the model's cache
    EMPTY_PROMPT = 7
    UNSUPPORTED = 8         # valid type, but the served model does not handle it
    INTERNAL = 9            # the model raised; the server keeps serving
    CANCELLED = 10          # the client cancelled (ring) before the reply was complete
    SHUTTING_DOWN = 11      # the server is stopping and will not start new work
    CORRUPT_RECORD = 12     # a ring slot failed validation
    BAD_TENSOR = 13         # a TensorList is malformed
    BAD_DTYPE = 14          # a tensor's dtype is unknown or not the signature's
    BAD_SHAPE = 15          # a tensor's shape does not match the signature
    BAD_INPUT = 16          # the tensors do not bind to the signature's inputs


class ProtocolError(Exception):
    """A typed failure that is sent back to the client as an ERROR reply."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = ErrorCode(code)
        self.message = message


IMAGE_BYTES = 3 * 32 * 32
# CIFAR-10 class names by ScoreRecord class index (section 3).
LABELS: tuple[str, ...] = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                           "horse", "ship", "truck")
SCORE_CLASSES = 10
# ScoreRecord: u8 class index, 3 bytes zero, 10 x f32 probabilities.
SCORE_RECORD = struct.Struct("<B3x10f")
# PromptHeader: u32 max_new_tokens; the UTF-8 prompt follows.
PROMPT_HEADER = struct.Struct("<I")
# ErrorBody: u16 code, then a UTF-8 message.
ERROR_HEADER = struct.Struct("<H")

MAX_PACKET_BODY = 16 * 1024 * 1024
MAX_BATCH_IMAGES = 256
PACKET_LENGTH = struct.Struct(">I")
_PACKET_HEADER = struct.Struct(">IB")  # length (type byte + body), type


class FramingError(Exception):
    """A stream packet that cannot be decoded; ``name`` is TRUNCATED, BAD_LENGTH or TOO_LARGE."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name}: {message}")
        self.name = name


def packet_header(msg_type: int, body_len: int) -> bytes:
    """The 5 bytes before a body of ``body_len`` bytes (section 5)."""
    return _PACKET_HEADER.pack(body_len + 1, msg_type)


def encode_packet(msg_type: int, body: bytes | bytearray | memoryview = b"") -> bytes:
    return packet_header(msg_type, len(body)) + bytes(body)


def check_packet_length(length: int, max_body: int = MAX_PACKET_BODY) -> None:
    """Section 5 rules for the big-endian length prefix (type byte + body)."""
    if length == 0:
        raise FramingError("BAD_LENGTH", "packet length 0: every packet has a type byte")
    if length - 1 > max_body:
        raise FramingError("TOO_LARGE", f"packet body of {length - 1} bytes exceeds the "
                           f"maximum of {max_body}")


def decode_packet(data: bytes | memoryview, max_body: int = MAX_PACKET_BODY) -> tuple[int, bytes, int]:
    """Decode one packet from the front of ``data``: (type, body, bytes consumed)."""
    if len(data) < 4:
        raise FramingError("TRUNCATED", f"{len(data)} bytes, the length prefix needs 4")
    (length,) = PACKET_LENGTH.unpack_from(data)
    check_packet_length(length, max_body)
    if len(data) < 4 + length:
        raise FramingError("TRUNCATED", f"packet needs {4 + length} bytes, have {len(data)}")
    return data[4], bytes(data[5:4 + length]), 4 + length


def encode_error(code: ErrorCode, message: str) -> bytes:
    return ERROR_HEADER.pack(code) + message.encode("utf-8", "replace")


def decode_error(body: bytes) -> tuple[int, str]:
    if len(body) < ERROR_HEADER.size:
        raise ProtocolError(ErrorCode.BAD_LENGTH, "ERROR body shorter than its 2-byte code")
    (code,) = ERROR_HEADER.unpack_from(body)
    return code, bytes(body[ERROR_HEADER.size:]).decode("utf-8", "replace")


def check_request(msg_type: int, length: int) -> MsgType:
    """Section 3 body-size rules; returns the MsgType or raises ProtocolError."""
    if msg_type == MsgType.ECHO:  # the hot paths: no enum construction
        return MsgType.ECHO
    if msg_type == MsgType.INFER and length >= 8:
        return MsgType.INFER
    if msg_type not in REQUEST_TYPES:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"type 0x{msg_type:02x} is not a request type")
    msg_type = MsgType(msg_type)
    if msg_type in (MsgType.CLASSIFY, MsgType.CLASSIFY_SCORES) and length != IMAGE_BYTES:
        raise ProtocolError(ErrorCode.BAD_LENGTH, f"{msg_type.name} needs a {IMAGE_BYTES}-byte "
                            f"planar RGB 32x32 image, got {length} bytes")
    if msg_type is MsgType.CLASSIFY_BATCH:
        count, rest = divmod(length, IMAGE_BYTES)
        if rest or not 1 <= count <= MAX_BATCH_IMAGES:
            raise ProtocolError(ErrorCode.BAD_LENGTH, f"CLASSIFY_BATCH needs 1..{MAX_BATCH_IMAGES} "
                                f"images of {IMAGE_BYTES} bytes, got {length} bytes")
    if msg_type is MsgType.INFER and length < 8:
        raise ProtocolError(ErrorCode.BAD_LENGTH, f"INFER body of {length} bytes: a TensorList "
                            f"header needs 8")
    if msg_type is MsgType.METADATA and length:
        raise ProtocolError(ErrorCode.BAD_LENGTH, f"METADATA takes an empty body, got {length} "
                            f"bytes")
    if msg_type in (MsgType.PROMPT, MsgType.PROMPT_STREAM) and length < PROMPT_HEADER.size:
        raise ProtocolError(ErrorCode.BAD_LENGTH, f"{msg_type.name} body needs a "
                            f"{PROMPT_HEADER.size}-byte max_new_tokens field, got {length} bytes")
    return msg_type


def encode_prompt(prompt: str, max_new_tokens: int) -> bytes:
    return PROMPT_HEADER.pack(max_new_tokens) + prompt.encode("utf-8")


def decode_prompt(body) -> tuple[str, int]:
    """PromptRequest -> (prompt, max_new_tokens); range checks on steps are the model's."""
    if len(body) < PROMPT_HEADER.size:
        raise ProtocolError(ErrorCode.BAD_LENGTH, "prompt body shorter than its 4-byte header")
    (steps,) = PROMPT_HEADER.unpack_from(body)
    try:
        prompt = bytes(body[PROMPT_HEADER.size:]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(ErrorCode.INVALID_UTF8, f"prompt is not valid UTF-8 at byte "
                            f"{exc.start}") from None
    if not prompt:
        raise ProtocolError(ErrorCode.EMPTY_PROMPT, "prompt is empty")
    return prompt, steps


def encode_scores(probabilities) -> bytes:
    """(N, 10) float probabilities -> N ScoreRecords."""
    out = bytearray(SCORE_RECORD.size * len(probabilities))
    for i, row in enumerate(probabilities):
        values = [float(v) for v in row]
        SCORE_RECORD.pack_into(out, i * SCORE_RECORD.size, max(range(SCORE_CLASSES),
                                                                key=values.__getitem__), *values)
    return bytes(out)


def decode_scores(body: bytes) -> list[tuple[int, tuple[float, ...]]]:
    if len(body) % SCORE_RECORD.size:
        raise ProtocolError(ErrorCode.BAD_LENGTH, f"{len(body)} bytes is not a whole number of "
                            f"{SCORE_RECORD.size}-byte ScoreRecords")
    return [(rec[0], rec[1:]) for rec in SCORE_RECORD.iter_unpack(body)]
