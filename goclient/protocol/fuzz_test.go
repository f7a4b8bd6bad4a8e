package protocol

import (
	"bytes"
	"errors"
	"slices"
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

// FuzzDecodeTensorList feeds the decoder untrusted bodies: it must fail
// with a typed error or decode tensors that re-encode to a body of the same
// length which decodes to the same tensors (padding is ignored when read,
// so the bytes may differ only there), also into reused storage, and
// binding them must not panic.
func FuzzDecodeTensorList(f *testing.F) {
	var vectors tensorVectors
	loadVectors(f, "tensors.json", &vectors)
	for _, c := range vectors.Cases {
		f.Add(mustHex(f, c.BodyHex))
	}
	signature, err := DecodeMetadata(vectors.Signature)
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		tensors, err := DecodeTensorList(body)
		if err != nil {
			if !errors.Is(err, ErrBadLength) && !errors.Is(err, ErrBadTensor) && !errors.Is(err, ErrBadDType) {
				t.Fatalf("untyped TensorList error: %v", err)
			}
			return
		}
		encoded, err := AppendTensorList(nil, tensors)
		if err != nil || len(encoded) != len(body) {
			t.Fatalf("decoded list re-encodes to %d bytes (%v), read %d", len(encoded), err, len(body))
		}
		// The second decode reuses storage a different list left behind.
		stale := []Tensor{{Name: "stale", Shape: make([]int, MaxRank)}, {Name: "x", Shape: []int{1}}}
		again, err := DecodeTensorListInto(stale, encoded)
		if err != nil || len(again) != len(tensors) {
			t.Fatalf("re-encoded list decodes to %d tensors, %v", len(again), err)
		}
		for i := range again {
			a, b := again[i], tensors[i]
			if a.Name != b.Name || a.DType != b.DType || !slices.Equal(a.Shape, b.Shape) || !bytes.Equal(a.Data, b.Data) {
				t.Fatalf("tensor %d: %v then %v", i, b, a)
			}
		}
		if _, err := signature.Bind(tensors); err != nil {
			var protocolErr *Error
			if !errors.As(err, &protocolErr) {
				t.Fatalf("untyped Bind error: %v", err)
			}
		}
	})
}
