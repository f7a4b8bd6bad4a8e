package protocol

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"testing"
)

func TestErrorMatchesSentinelOfItsCode(t *testing.T) {
	err := fmt.Errorf("classify: %w", &Error{Code: CodeBadLength, Message: "3071 bytes"})
	if !errors.Is(err, ErrBadLength) || errors.Is(err, ErrTooLarge) {
		t.Fatal("errors.Is does not follow the code")
	}
	if !IsCode(err, CodeBadLength) || IsCode(err, CodeInternal) || IsCode(errors.New("x"), CodeBadLength) {
		t.Fatal("IsCode does not follow the code")
	}
	if got := err.Error(); got != "classify: shmserve: BAD_LENGTH: 3071 bytes" {
		t.Fatalf("message %q", got)
	}
}

func TestReservedCodeIsStillAnError(t *testing.T) {
	decoded, err := DecodeErrorBody([]byte{0x39, 0x30, 'h', 'i'})
	if err != nil || decoded.Code != 12345 || decoded.Code.String() != "CODE_12345" {
		t.Fatalf("DecodeErrorBody = %v, %v", decoded, err)
	}
}

func TestErrorBodyRules(t *testing.T) {
	if _, err := DecodeErrorBody([]byte{1}); !errors.Is(err, ErrProtocolViolation) {
		t.Fatalf("1-byte ERROR body: %v", err)
	}
	decoded, err := DecodeErrorBody([]byte{1, 0, 'o', 0xff, 'k'})
	if err != nil || decoded.Message != "o\uFFFDk" {
		t.Fatalf("invalid UTF-8 in a message should be replaced, got %q, %v", decoded.Message, err)
	}
}

func TestClassicEchoFraming(t *testing.T) {
	body := bytes.Repeat([]byte{7}, ImageBytes)
	packet, err := AppendPacket(nil, TypeEcho, body)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(packet[:PacketHeaderBytes], []byte{0x00, 0x00, 0x0C, 0x01, 0x00}) {
		t.Fatalf("3072-byte echo starts % x", packet[:PacketHeaderBytes])
	}
}

func TestAppendPacketRefusesOversizedBody(t *testing.T) {
	if _, err := AppendPacket(nil, TypeEcho, make([]byte, MaxPacketBody+1)); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("err = %v", err)
	}
}

func TestReadPacketPassesOtherReadErrorsThrough(t *testing.T) {
	failure := errors.New("connection reset")
	r := io.MultiReader(bytes.NewReader([]byte{0, 0}), &failingReader{failure})
	if _, _, err := ReadPacket(r, MaxPacketBody); !errors.Is(err, failure) || errors.Is(err, ErrTruncated) {
		t.Fatalf("err = %v, want the reader's own error", err)
	}
	_, _, err := ReadPacket(bytes.NewReader(nil), MaxPacketBody)
	if !errors.Is(err, ErrTruncated) || !errors.Is(err, io.EOF) {
		t.Fatalf("clean EOF = %v, want TRUNCATED wrapping io.EOF", err)
	}
}

type failingReader struct{ err error }

func (f *failingReader) Read([]byte) (int, error) { return 0, f.err }

func TestScoreRecordRules(t *testing.T) {
	record := AppendScoreRecord(nil, Scores{Index: 9, Probabilities: [ClassCount]float32{9: 1}})
	if len(record) != ScoreRecordBytes {
		t.Fatalf("record is %d bytes", len(record))
	}
	decoded, err := DecodeScoreRecords(append(record, record...))
	if err != nil || len(decoded) != 2 || decoded[1].Label() != "truck" {
		t.Fatalf("DecodeScoreRecords = %+v, %v", decoded, err)
	}
	for name, bad := range map[string][]byte{
		"short":         record[:43],
		"index 10":      append([]byte{10}, record[1:]...),
		"dirty padding": append([]byte{1, 0, 1}, record[3:]...),
	} {
		if _, err := DecodeScoreRecords(bad); !errors.Is(err, ErrProtocolViolation) {
			t.Errorf("%s: err = %v", name, err)
		}
	}
}

func TestCheckRequestPrompt(t *testing.T) {
	ok := AppendPromptRequest(nil, PromptRequest{MaxNewTokens: 8, Prompt: "hi"})
	if err := CheckRequest(TypePrompt, ok); err != nil {
		t.Fatal(err)
	}
	if err := CheckRequest(TypePromptStream, ok[:4]); !errors.Is(err, ErrEmptyPrompt) {
		t.Fatalf("empty prompt: %v", err)
	}
	if err := CheckRequest(TypeStreamEnd, nil); !errors.Is(err, ErrUnknownType) {
		t.Fatalf("reply-only type: %v", err)
	}
}

func TestTypeClasses(t *testing.T) {
	for typ := range 256 {
		m := MsgType(typ)
		wantRequest := m <= TypePromptStream || m == TypeInfer || m == TypeMetadata
		wantReply := m <= TypePrompt || m == TypeStreamChunk || m == TypeStreamEnd || m == TypeInfer || m == TypeMetadata || m == TypeError
		if m.IsRequest() != wantRequest || m.IsReply() != wantReply {
			t.Errorf("%v: IsRequest %v IsReply %v", m, m.IsRequest(), m.IsReply())
		}
	}
}
