// Package ring is the client side of the shared-memory ring of
// spec/PROTOCOL.md sections 6-11: attach, slot claim, publish, spin-then-block
// waits for reply frames, flow control, cancellation and liveness.
package ring

import "strconv"

// Everything this package knows about the byte layout of a ring is in this
// file, next to the diagrams of spec section 7; shmserve/layout.py is its
// Python twin and spec/vectors/ring.json keeps the two honest.
//
// Mapping (all offsets from the start of the shared memory):
//
//	+--------------------------------+ 0
//	| header (HeaderSize bytes)      |
//	+--------------------------------+ HeaderSize
//	| slot 0                         |
//	+--------------------------------+ HeaderSize + slot_stride
//	| slot 1 ...                     |
//	+--------------------------------+ HeaderSize + slot_count*slot_stride = total_size
//
// Header, four 64-byte cache lines:
//
//	 0               8       10      12      16      20      24      28      32
//	 +---------------+-------+-------+-------+-------+-------+-------+-------+
//	 | magic         |v_major|v_minor|hdr_sz |slots  |stride |req_cap|rsp_cap|  line 0: written
//	 +---------------+-------+-------+-------+-------+-------+-------+-------+  once by the
//	32              40              48      52      56              64          server, magic
//	 +---------------+---------------+-------+-------+---------------+          last
//	 | total_size    | generation    |pid    |flags  | reserved      |
//	 +---------------+---------------+-------+-------+---------------+
//	64      68      72              80                              128
//	 +-------+-------+---------------+-------------------------------+  line 1: server,
//	 |state  |rsvd   | heartbeat_ns  | reserved                      |  at run time
//	 +-------+-------+---------------+-------------------------------+
//	128             136                                             192
//	 +---------------+-----------------------------------------------+  line 2: clients
//	 | doorbell      | reserved                                      |  (fetch-add)
//	 +---------------+-----------------------------------------------+
//	192-255 reserved                                                    line 3
const (
	headerMagicOffset        = 0  // [8]byte "SHMSRING"
	headerVersionMajorOffset = 8  // u16
	headerVersionMinorOffset = 10 // u16
	headerSizeOffset         = 12 // u32
	headerSlotCountOffset    = 16 // u32
	headerSlotStrideOffset   = 20 // u32
	headerReqCapacityOffset  = 24 // u32
	headerRespCapacityOffset = 28 // u32
	headerTotalSizeOffset    = 32 // u64
	headerGenerationOffset   = 40 // u64
	headerServerPIDOffset    = 48 // u32
	headerFlagsOffset        = 52 // u32
	headerServerStateOffset  = 64 // u32, a ServerState
	headerHeartbeatOffset    = 72 // u64, CLOCK_MONOTONIC ns
	headerDoorbellOffset     = 128
)

// Slot, slot_stride bytes, starting on a 64-byte boundary:
//
//	0       4       8               16      20  21  24      28      32          64
//	+-------+-------+---------------+-------+---+---+-------+-------+-----------+
//	|owner  |req_seq| req_id        |req_len|typ|rsv|ack_seq|cancel |reserved   |  client line
//	+-------+-------+---------------+-------+---+---+-------+-------+-----------+
//	64      68      72              80      84  85  86                         128
//	+-------+-------+---------------+-------+---+---+---------------------------+
//	|frm_seq|frm_rsq| frame_req_id  |frm_len|typ|flg| reserved                  |  server line
//	+-------+-------+---------------+-------+---+---+---------------------------+
//	128                       128+req_capacity            128+req_cap+resp_cap
//	+-------------------------+---------------------------+
//	| request data            | reply data                |
//	+-------------------------+---------------------------+
const (
	slotOwnerOffset       = 0  // u32 pid, 0 = free; claimed by CAS
	slotReqSeqOffset      = 4  // u32, the client's publish word
	slotReqIDOffset       = 8  // u64
	slotReqLenOffset      = 16 // u32
	slotReqTypeOffset     = 20 // u8
	slotAckSeqOffset      = 24 // u32
	slotCancelSeqOffset   = 28 // u32
	slotFrameSeqOffset    = 64 // u32, the server's publish word
	slotFrameReqSeqOffset = 68 // u32
	slotFrameReqIDOffset  = 72 // u64
	slotFrameLenOffset    = 80 // u32
	slotFrameTypeOffset   = 84 // u8
	slotFrameFlagsOffset  = 85 // u8
	slotDataOffset        = 128
)

const (
	// Magic marks a fully created ring; the server writes it last.
	Magic              = "SHMSRING"
	VersionMajor       = 1
	VersionMinor       = 0
	HeaderSize         = 256
	CacheLine          = 64
	MinSlots, MaxSlots = 1, 1024
	MinReqCapacity     = 3072
	MinRespCapacity    = 64
	// MaxCapacity bounds either capacity, as shmserve/layout.py does, so a
	// corrupt header cannot make a slot stride overflow 32 bits.
	MaxCapacity = 1 << 30

	frameFlagFinal = 1 << 0
)

// ServerState is the header's server_state (section 7.1).
type ServerState uint32

const (
	StateStarting ServerState = 1
	StateReady    ServerState = 2
	StateStopping ServerState = 3
	StateStopped  ServerState = 4
)

func (s ServerState) String() string {
	switch s {
	case StateStarting:
		return "STARTING"
	case StateReady:
		return "READY"
	case StateStopping:
		return "STOPPING"
	case StateStopped:
		return "STOPPED"
	}
	return "UNKNOWN"
}

func align64(n uint64) uint64 { return (n + CacheLine - 1) &^ (CacheLine - 1) }

// Object names of section 6.
func shmName(ring string) string        { return "/shmserve." + ring }
func shmPath(ring string) string        { return "/dev/shm/shmserve." + ring }
func requestSemName(ring string) string { return "/shmserve." + ring + ".req" }
func slotSemName(ring string, slot int) string {
	return "/shmserve." + ring + ".s" + strconv.Itoa(slot)
}
func lockPath(ring string) string { return "/dev/shm/shmserve." + ring + ".lock" }
