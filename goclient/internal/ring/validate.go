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

// Frame is one reply frame as the client consumed it. Data aliases the
// slot's reply data in shared memory: it is valid only until the client acks
// the frame or releases the slot.
type Frame struct {
	Seq   uint32
	Type  protocol.MsgType
	Final bool
	Data  []byte
}

// ValidateFrame checks the reply frame in slot (one slot's bytes) against the
// request it must answer, as section 9 asks: a frame for another req_seq or
// req_id means the slot was taken from this client, and must never be taken
// for its reply. seq is the frame_seq the caller loaded before calling, so the
// fields read here are the ones that publish made visible.
func ValidateFrame(slot []byte, g Geometry, seq, reqSeq uint32, reqID uint64) (Frame, error) {
	if len(slot) < g.SlotStride || g.SlotStride < SlotDataOffset+g.ReqCapacity+g.RespCapacity {
		return Frame{}, invalid(BadGeometry, "slot of %d bytes cannot hold stride %d", len(slot), g.SlotStride)
	}
	if got := binary.LittleEndian.Uint32(slot[SlotFrameReqSeqOffset:]); got != reqSeq {
		return Frame{}, invalid(Misrouted, "frame answers req_seq %d, the request was %d", got, reqSeq)
	}
	if got := binary.LittleEndian.Uint64(slot[SlotFrameReqIDOffset:]); got != reqID {
		return Frame{}, invalid(Misrouted, "frame answers req_id %d, the request was %d", got, reqID)
	}
	length := binary.LittleEndian.Uint32(slot[SlotFrameLenOffset:])
	if uint64(length) > uint64(g.RespCapacity) {
		return Frame{}, invalid(CorruptRecord, "frame_len %d exceeds resp_capacity %d", length, g.RespCapacity)
	}
	frame := Frame{
		Seq:   seq,
		Type:  protocol.MsgType(slot[SlotFrameTypeOffset]),
		Final: slot[SlotFrameFlagsOffset]&FrameFlagFinal != 0,
	}
	switch {
	case !frame.Type.IsReply():
		return Frame{}, invalid(CorruptRecord, "frame_type %v is not a reply type", frame.Type)
	case frame.Type == protocol.TypeStreamChunk && frame.Final:
		return Frame{}, invalid(CorruptRecord, "a STREAM_CHUNK frame is never FINAL: STREAM_END ends a stream")
	case frame.Type == protocol.TypeStreamEnd && !frame.Final:
		return Frame{}, invalid(CorruptRecord, "a STREAM_END frame is always FINAL")
	}
	dataStart := SlotDataOffset + g.ReqCapacity
	frame.Data = slot[dataStart : dataStart+int(length) : dataStart+int(length)]
	return frame, nil
}
