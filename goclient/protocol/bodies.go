package protocol

import (
	"encoding/binary"
	"fmt"
	"math"
	"strings"
	"unicode/utf8"
)

// Scores is one ScoreRecord: the argmax class and the ten probabilities.
type Scores struct {
	Index         int
	Probabilities [ClassCount]float32
}

// Label is the class name of s.Index.
func (s Scores) Label() string { return Labels[s.Index] }

// AppendScoreRecord appends the 44-byte ScoreRecord of s.
func AppendScoreRecord(dst []byte, s Scores) []byte {
	dst = append(dst, byte(s.Index), 0, 0, 0)
	for _, p := range s.Probabilities {
		dst = binary.LittleEndian.AppendUint32(dst, math.Float32bits(p))
	}
	return dst
}

// DecodeScoreRecords decodes a reply of back-to-back ScoreRecords. A record
// whose class index names no class, or whose padding is not zero, is a
// protocol violation: a label lookup would otherwise fail far from its cause.
func DecodeScoreRecords(body []byte) ([]Scores, error) {
	if len(body)%ScoreRecordBytes != 0 {
		return nil, fmt.Errorf("%w: %d bytes is not a whole number of %d-byte ScoreRecords",
			ErrProtocolViolation, len(body), ScoreRecordBytes)
	}
	records := make([]Scores, len(body)/ScoreRecordBytes)
	for i := range records {
		record := body[i*ScoreRecordBytes : (i+1)*ScoreRecordBytes]
		if int(record[0]) >= ClassCount {
			return nil, fmt.Errorf("%w: ScoreRecord %d has class index %d", ErrProtocolViolation, i, record[0])
		}
		if record[1]|record[2]|record[3] != 0 {
			return nil, fmt.Errorf("%w: ScoreRecord %d has non-zero padding", ErrProtocolViolation, i)
		}
		records[i].Index = int(record[0])
		for class := range records[i].Probabilities {
			bits := binary.LittleEndian.Uint32(record[4+4*class:])
			records[i].Probabilities[class] = math.Float32frombits(bits)
		}
	}
	return records, nil
}

// PromptRequest is the body of PROMPT and PROMPT_STREAM.
type PromptRequest struct {
	MaxNewTokens uint32
	Prompt       string
}

// AppendPromptRequest appends the encoded body of p.
func AppendPromptRequest(dst []byte, p PromptRequest) []byte {
	dst = binary.LittleEndian.AppendUint32(dst, p.MaxNewTokens)
	return append(dst, p.Prompt...)
}

// DecodePromptRequest decodes a PROMPT or PROMPT_STREAM body. The range of
// MaxNewTokens is the model's to judge, so it is not checked here.
func DecodePromptRequest(body []byte) (PromptRequest, error) {
	if len(body) < 4 {
		return PromptRequest{}, newError(CodeBadLength, "prompt body of %d bytes is shorter than its 4-byte max_new_tokens", len(body))
	}
	prompt := body[4:]
	if !utf8.Valid(prompt) {
		return PromptRequest{}, newError(CodeInvalidUTF8, "prompt is not valid UTF-8")
	}
	if len(prompt) == 0 {
		return PromptRequest{}, newError(CodeEmptyPrompt, "prompt is empty")
	}
	return PromptRequest{MaxNewTokens: binary.LittleEndian.Uint32(body), Prompt: string(prompt)}, nil
}

// AppendErrorBody appends the ErrorBody for e.
func AppendErrorBody(dst []byte, e *Error) []byte {
	dst = binary.LittleEndian.AppendUint16(dst, uint16(e.Code))
	return append(dst, e.Message...)
}

// DecodeErrorBody turns an ERROR reply body into the error it reports. The
// message is for humans, so bytes that are not UTF-8 are replaced rather than
// rejected; a body too short for its code is a protocol violation.
func DecodeErrorBody(body []byte) (*Error, error) {
	if len(body) < 2 {
		return nil, fmt.Errorf("%w: ERROR body of %d bytes is shorter than its 2-byte code", ErrProtocolViolation, len(body))
	}
	return &Error{
		Code:    Code(binary.LittleEndian.Uint16(body)),
		Message: strings.ToValidUTF8(string(body[2:]), "\uFFFD"),
	}, nil
}

// CheckRequestLength applies the type and body-size rules of section 3, the
// checks a server can make before it reads a body.
func CheckRequestLength(typ MsgType, length int) error {
	switch typ {
	case TypeEcho:
		return nil
	case TypeClassify, TypeClassifyScores:
		if length != ImageBytes {
			return newError(CodeBadLength, "%v needs a %d-byte planar RGB 32x32 image, got %d bytes", typ, ImageBytes, length)
		}
		return nil
	case TypeClassifyBatch:
		if length%ImageBytes != 0 || length == 0 || length > MaxBatchImages*ImageBytes {
			return newError(CodeBadLength, "CLASSIFY_BATCH needs 1..%d images of %d bytes, got %d bytes", MaxBatchImages, ImageBytes, length)
		}
		return nil
	case TypePrompt, TypePromptStream:
		if length < 4 {
			return newError(CodeBadLength, "%v body of %d bytes is shorter than its 4-byte max_new_tokens", typ, length)
		}
		return nil
	case TypeInfer:
		if length < tensorListHeaderBytes {
			return newError(CodeBadLength, "INFER body of %d bytes: a TensorList header needs %d", length, tensorListHeaderBytes)
		}
		return nil
	case TypeMetadata:
		if length != 0 {
			return newError(CodeBadLength, "METADATA takes an empty body, got %d bytes", length)
		}
		return nil
	}
	return newError(CodeUnknownType, "type 0x%02x is not a request type", uint8(typ))
}

// CheckRequest applies every body rule of section 3 to a request, so that a
// client fails a malformed request the way the server would, without a
// round trip.
func CheckRequest(typ MsgType, body []byte) error {
	if err := CheckRequestLength(typ, len(body)); err != nil {
		return err
	}
	if typ == TypePrompt || typ == TypePromptStream {
		_, err := DecodePromptRequest(body)
		return err
	}
	return nil
}
