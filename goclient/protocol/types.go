// Package protocol holds the parts of spec/PROTOCOL.md that every transport
// shares: message types (section 3), error codes (section 4), body codecs and
// stream-packet framing (section 5).
package protocol

import "fmt"

// MsgType is the type byte that starts every message (section 3).
type MsgType uint8

const (
	TypeEcho           MsgType = 0x00
	TypeClassify       MsgType = 0x01
	TypeClassifyScores MsgType = 0x02
	TypeClassifyBatch  MsgType = 0x03
	TypePrompt         MsgType = 0x04
	TypePromptStream   MsgType = 0x05
	TypeStreamChunk    MsgType = 0x06
	TypeStreamEnd      MsgType = 0x07
	TypeInfer          MsgType = 0x08
	TypeMetadata       MsgType = 0x09
	TypeError          MsgType = 0xFF
)

var typeNames = map[MsgType]string{
	TypeEcho:           "ECHO",
	TypeClassify:       "CLASSIFY",
	TypeClassifyScores: "CLASSIFY_SCORES",
	TypeClassifyBatch:  "CLASSIFY_BATCH",
	TypePrompt:         "PROMPT",
	TypePromptStream:   "PROMPT_STREAM",
	TypeStreamChunk:    "STREAM_CHUNK",
	TypeStreamEnd:      "STREAM_END",
	TypeInfer:          "INFER",
	TypeMetadata:       "METADATA",
	TypeError:          "ERROR",
}

func (t MsgType) String() string {
	if name, ok := typeNames[t]; ok {
		return name
	}
	return fmt.Sprintf("TYPE_0x%02X", uint8(t))
}

// IsRequest reports whether a client may send t; the server answers any other
// type with UNKNOWN_TYPE.
func (t MsgType) IsRequest() bool {
	return t <= TypePromptStream || t == TypeInfer || t == TypeMetadata
}

// IsReply reports whether a server may send t. PROMPT_STREAM is the only
// request type that never comes back: its replies are chunks and an end.
func (t MsgType) IsReply() bool {
	return t <= TypePrompt || (t >= TypeStreamChunk && t <= TypeMetadata) || t == TypeError
}

// Limits from section 2.
const (
	// MaxPacketBody is the largest body a stream packet may carry; the length
	// prefix also counts the type byte, so it may be one more.
	MaxPacketBody = 16 << 20
	// MaxBatchImages bounds one CLASSIFY_BATCH request.
	MaxBatchImages = 256
)

// Image geometry (section 3): planar RGB, one byte per sample.
const (
	ImageSide        = 32
	ImagePlane       = ImageSide * ImageSide
	ImageBytes       = 3 * ImagePlane
	ClassCount       = 10
	ScoreRecordBytes = 4 + 4*ClassCount
)

// Labels are the CIFAR-10 class names by class index.
var Labels = [ClassCount]string{
	"airplane", "automobile", "bird", "cat", "deer",
	"dog", "frog", "horse", "ship", "truck",
}
