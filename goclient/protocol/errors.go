package protocol

import (
	"errors"
	"fmt"
)

// Code is an error code from section 4. Codes above CodeBadInput are
// reserved; a client receives them as errors all the same.
type Code uint16

const (
	CodeUnknownType   Code = 1
	CodeBadLength     Code = 2
	CodeTooLarge      Code = 3
	CodeInvalidUTF8   Code = 4
	CodeBadArgument   Code = 5
	CodePromptTooLong Code = 6
	CodeEmptyPrompt   Code = 7
	CodeUnsupported   Code = 8
	CodeInternal      Code = 9
	CodeCancelled     Code = 10
	CodeShuttingDown  Code = 11
	CodeCorruptRecord Code = 12
	CodeBadTensor     Code = 13
	CodeBadDType      Code = 14
	CodeBadShape      Code = 15
	CodeBadInput      Code = 16
)

var codeNames = map[Code]string{
	CodeUnknownType:   "UNKNOWN_TYPE",
	CodeBadLength:     "BAD_LENGTH",
	CodeTooLarge:      "TOO_LARGE",
	CodeInvalidUTF8:   "INVALID_UTF8",
	CodeBadArgument:   "BAD_ARGUMENT",
	CodePromptTooLong: "PROMPT_TOO_LONG",
	CodeEmptyPrompt:   "EMPTY_PROMPT",
	CodeUnsupported:   "UNSUPPORTED",
	CodeInternal:      "INTERNAL",
	CodeCancelled:     "CANCELLED",
	CodeShuttingDown:  "SHUTTING_DOWN",
	CodeCorruptRecord: "CORRUPT_RECORD",
	CodeBadTensor:     "BAD_TENSOR",
	CodeBadDType:      "BAD_DTYPE",
	CodeBadShape:      "BAD_SHAPE",
	CodeBadInput:      "BAD_INPUT",
}

// String returns the spec's name for c, or CODE_<n> for a reserved code.
func (c Code) String() string {
	if name, ok := codeNames[c]; ok {
		return name
	}
	return fmt.Sprintf("CODE_%d", uint16(c))
}

// Error is a typed protocol error: what a server sent in an ERROR reply, or
// what this package found wrong with a packet or body before sending it.
type Error struct {
	Code    Code
	Message string
}

func (e *Error) Error() string {
	if e.Message == "" {
		return "shmserve: " + e.Code.String()
	}
	return "shmserve: " + e.Code.String() + ": " + e.Message
}

// Is makes every *Error match the sentinel of its code, whatever its message,
// so callers write errors.Is(err, protocol.ErrBadLength).
func (e *Error) Is(target error) bool {
	sentinel, ok := target.(*Error)
	return ok && sentinel.Message == "" && sentinel.Code == e.Code
}

func newError(code Code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// Sentinels, one per code, for errors.Is.
var (
	ErrUnknownType   = &Error{Code: CodeUnknownType}
	ErrBadLength     = &Error{Code: CodeBadLength}
	ErrTooLarge      = &Error{Code: CodeTooLarge}
	ErrInvalidUTF8   = &Error{Code: CodeInvalidUTF8}
	ErrBadArgument   = &Error{Code: CodeBadArgument}
	ErrPromptTooLong = &Error{Code: CodePromptTooLong}
	ErrEmptyPrompt   = &Error{Code: CodeEmptyPrompt}
	ErrUnsupported   = &Error{Code: CodeUnsupported}
	ErrInternal      = &Error{Code: CodeInternal}
	ErrCancelled     = &Error{Code: CodeCancelled}
	ErrShuttingDown  = &Error{Code: CodeShuttingDown}
	ErrCorruptRecord = &Error{Code: CodeCorruptRecord}
	ErrBadTensor     = &Error{Code: CodeBadTensor}
	ErrBadDType      = &Error{Code: CodeBadDType}
	ErrBadShape      = &Error{Code: CodeBadShape}
	ErrBadInput      = &Error{Code: CodeBadInput}
)

// IsCode reports whether err is, or wraps, a protocol error with code.
func IsCode(err error, code Code) bool {
	var protocolErr *Error
	return errors.As(err, &protocolErr) && protocolErr.Code == code
}

// ErrTruncated reports a stream that ended inside a packet, or before one
// started; the underlying io error is wrapped alongside it.
var ErrTruncated = errors.New("shmserve: TRUNCATED packet")

// ErrProtocolViolation reports a reply the protocol does not allow: a frame
// for another request, a reply type that does not answer the request, a
// malformed body. The connection or slot it came from cannot be trusted.
var ErrProtocolViolation = errors.New("shmserve: protocol violation")
