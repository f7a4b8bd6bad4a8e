package ring

import (
	"encoding/binary"
	"fmt"

	"github.com/shmserve/shmserve/goclient/protocol"
)

// ValidationError reports a header or a reply frame that breaks spec section
// 7 or 9. Name is the error name spec/vectors/ring.json uses for the case.
// Shared memory is written by another process, so every such error is also a
// protocol violation.
type ValidationError struct {
	Name    string
	Message string
}

func (e *ValidationError) Error() string { return "shmserve ring: " + e.Name + ": " + e.Message }

func (e *ValidationError) Unwrap() error { return protocol.ErrProtocolViolation }

func invalid(name, format string, args ...any) *ValidationError {
	return &ValidationError{Name: name, Message: fmt.Sprintf(format, args...)}
}

// Names of validation failures, as in spec/vectors/ring.json.
const (
	BadMagic      = "BAD_MAGIC"
	BadVersion    = "BAD_VERSION"
	BadGeometry   = "BAD_GEOMETRY"
	Misrouted     = "MISROUTED"
	CorruptRecord = "CORRUPT_RECORD"
)

// Geometry is what a validated header says about the ring. The client keeps
// its own copy and never re-reads these fields from shared memory.
type Geometry struct {
	VersionMinor uint16
	SlotCount    int
	SlotStride   int
	ReqCapacity  int
	RespCapacity int
	TotalSize    int
	Generation   uint64
	ServerPID    uint32
}

// slot returns the bytes of slot i within mem, the whole mapping.
func (g Geometry) slot(mem []byte, i int) []byte {
	start := HeaderSize + i*g.SlotStride
	return mem[start : start+g.SlotStride : start+g.SlotStride]
}

// ValidateHeader checks a ring header the way section 11 asks a client to at
// attach: magic, major version, and a geometry that is consistent in itself
// and with mappingSize, the size of the mapped object.
func ValidateHeader(b []byte, mappingSize int) (Geometry, error) {
	if len(b) < HeaderSize {
		return Geometry{}, invalid(BadGeometry, "mapping of %d bytes is smaller than the %d-byte header", len(b), HeaderSize)
	}
	if string(b[HeaderMagicOffset:HeaderMagicOffset+len(Magic)]) != Magic {
		return Geometry{}, invalid(BadMagic, "not a shmserve ring, or not created yet (magic %q)", b[:len(Magic)])
	}
	if major := binary.LittleEndian.Uint16(b[HeaderVersionMajorOffset:]); major != VersionMajor {
		return Geometry{}, invalid(BadVersion, "ring layout version %d, this client speaks %d", major, VersionMajor)
	}
	u32 := func(offset int) uint64 { return uint64(binary.LittleEndian.Uint32(b[offset:])) }
	if size := u32(HeaderSizeOffset); size != HeaderSize {
		return Geometry{}, invalid(BadGeometry, "header_size %d, want %d", size, HeaderSize)
	}
	slots, reqCapacity, respCapacity := u32(HeaderSlotCountOffset), u32(HeaderReqCapacityOffset), u32(HeaderRespCapacityOffset)
	if slots < MinSlots || slots > MaxSlots {
		return Geometry{}, invalid(BadGeometry, "slot_count %d outside %d..%d", slots, MinSlots, MaxSlots)
	}
	if err := checkCapacity("req_capacity", reqCapacity, MinReqCapacity); err != nil {
		return Geometry{}, err
	}
	if err := checkCapacity("resp_capacity", respCapacity, MinRespCapacity); err != nil {
		return Geometry{}, err
	}
	stride := Align64(SlotDataOffset + reqCapacity + respCapacity)
	if got := u32(HeaderSlotStrideOffset); got != stride {
		return Geometry{}, invalid(BadGeometry, "slot_stride %d, the capacities imply %d", got, stride)
	}
	total := HeaderSize + slots*stride
	if got := binary.LittleEndian.Uint64(b[HeaderTotalSizeOffset:]); got != total || got != uint64(mappingSize) {
		return Geometry{}, invalid(BadGeometry, "total_size %d, the geometry implies %d, the mapping is %d bytes", got, total, mappingSize)
	}
	generation := binary.LittleEndian.Uint64(b[HeaderGenerationOffset:])
	if generation == 0 {
		return Geometry{}, invalid(BadGeometry, "generation is 0")
	}
	return Geometry{
		VersionMinor: binary.LittleEndian.Uint16(b[HeaderVersionMinorOffset:]),
		SlotCount:    int(slots),
		SlotStride:   int(stride),
		ReqCapacity:  int(reqCapacity),
		RespCapacity: int(respCapacity),
		TotalSize:    int(total),
		Generation:   generation,
		ServerPID:    binary.LittleEndian.Uint32(b[HeaderServerPIDOffset:]),
	}, nil
}

func checkCapacity(field string, value, minimum uint64) error {
	if value < minimum || value > MaxCapacity || value%CacheLine != 0 {
		return invalid(BadGeometry, "%s %d must be a multiple of %d in %d..%d", field, value, CacheLine, minimum, MaxCapacity)
	}
	return nil
}

// FrameHeader is the server line of a slot as a client validated it.
type FrameHeader struct {
	Seq   uint32
	Type  protocol.MsgType
	Final bool
	Len   int
}

// Frame is one reply frame as the client consumed it. Data aliases the
// slot's reply data in shared memory: it is valid only until the client acks
// the frame or releases the slot.
type Frame struct {
	FrameHeader
	Data []byte
}

// ValidateFrame checks the server line of a slot (its bytes 64..127) against
// the request the frame must answer, as section 9 asks: a frame for another
// req_seq or req_id means the slot was taken from this client, and must never
// pass for its reply; a frame_len over respCapacity would read past the slot.
func ValidateFrame(line []byte, respCapacity int, reqSeq uint32, reqID uint64) (FrameHeader, error) {
	if len(line) < CacheLine {
		return FrameHeader{}, invalid(CorruptRecord, "frame line of %d bytes, want %d", len(line), CacheLine)
	}
	field := func(offset int) []byte { return line[offset-SlotFrameSeqOffset:] }
	if got := binary.LittleEndian.Uint32(field(SlotFrameReqSeqOffset)); got != reqSeq {
		return FrameHeader{}, invalid(Misrouted, "frame answers req_seq %d, the request was %d", got, reqSeq)
	}
	if got := binary.LittleEndian.Uint64(field(SlotFrameReqIDOffset)); got != reqID {
		return FrameHeader{}, invalid(Misrouted, "frame answers req_id %d, the request was %d", got, reqID)
	}
	length := binary.LittleEndian.Uint32(field(SlotFrameLenOffset))
	if uint64(length) > uint64(respCapacity) {
		return FrameHeader{}, invalid(CorruptRecord, "frame_len %d exceeds resp_capacity %d", length, respCapacity)
	}
	frame := FrameHeader{
		Seq:   binary.LittleEndian.Uint32(field(SlotFrameSeqOffset)),
		Type:  protocol.MsgType(field(SlotFrameTypeOffset)[0]),
		Final: field(SlotFrameFlagsOffset)[0]&FrameFlagFinal != 0,
		Len:   int(length),
	}
	switch {
	case !frame.Type.IsReply():
		return FrameHeader{}, invalid(CorruptRecord, "frame_type %v is not a reply type", frame.Type)
	case frame.Type == protocol.TypeStreamChunk && frame.Final:
		return FrameHeader{}, invalid(CorruptRecord, "a STREAM_CHUNK frame is never FINAL: STREAM_END ends a stream")
	case frame.Type == protocol.TypeStreamEnd && !frame.Final:
		return FrameHeader{}, invalid(CorruptRecord, "a STREAM_END frame is always FINAL")
	}
	return frame, nil
}
