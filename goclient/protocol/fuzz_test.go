package protocol

import (
	"bytes"
	"errors"
	"testing"
)

// fuzzMaxBody keeps each input cheap: a huge length prefix must fail as
// TOO_LARGE without allocating, which the small limit also exercises.
const fuzzMaxBody = 1 << 16

func FuzzReadPacket(f *testing.F) {
	var vectors packetVectors
	loadVectors(f, "packets.json", &vectors)
	for _, c := range vectors.Cases {
		if wire := mustHex(f, c.Hex); len(wire) <= fuzzMaxBody {
			f.Add(wire)
		}
	}
	f.Fuzz(func(t *testing.T, wire []byte) {
		r := bytes.NewReader(wire)
		typ, body, err := ReadPacket(r, fuzzMaxBody)
		if err != nil {
			if !errors.Is(err, ErrTruncated) && !errors.Is(err, ErrBadLength) && !errors.Is(err, ErrTooLarge) {
				t.Fatalf("untyped framing error: %v", err)
			}
			return
		}
		consumed := wire[:len(wire)-r.Len()]
		if encoded, err := AppendPacket(nil, typ, body); err != nil || !bytes.Equal(encoded, consumed) {
			t.Fatalf("decoded packet re-encodes to %x, read %x", encoded, consumed)
		}
	})
}

func FuzzDecodeBodies(f *testing.F) {
	var vectors bodyVectors
	loadVectors(f, "bodies.json", &vectors)
	for _, c := range vectors.Cases {
		typ := 0
		switch {
		case c.Type != nil:
			typ = *c.Type
		case c.ReplyType != nil:
			typ = *c.ReplyType
		}
		if c.Repeat <= 1 {
			f.Add(uint8(typ), mustHex(f, c.BodyHex))
		}
	}
	f.Fuzz(func(t *testing.T, typ uint8, body []byte) {
		if err := CheckRequest(MsgType(typ), body); err != nil {
			var protocolErr *Error
			if !errors.As(err, &protocolErr) {
				t.Fatalf("untyped request error: %v", err)
			}
		}
		if request, err := DecodePromptRequest(body); err == nil {
			if encoded := AppendPromptRequest(nil, request); !bytes.Equal(encoded, body) {
				t.Fatalf("prompt re-encodes to %x, want %x", encoded, body)
			}
		}
		if records, err := DecodeScoreRecords(body); err == nil {
			var encoded []byte
			for _, record := range records {
				encoded = AppendScoreRecord(encoded, record)
				_ = record.Label()
			}
			if !bytes.Equal(encoded, body) {
				t.Fatalf("score records re-encode to %x, want %x", encoded, body)
			}
		}
		if decoded, err := DecodeErrorBody(body); err == nil && uint16(decoded.Code) != uint16(body[0])|uint16(body[1])<<8 {
			t.Fatalf("error code %d from %x", decoded.Code, body[:2])
		}
	})
}
