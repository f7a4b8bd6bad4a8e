// Package ring is the client side of the shared-memory ring of
// spec/PROTOCOL.md sections 6-11: attach, slot claim, publish, spin-then-block
// waits for reply frames, flow control, cancellation and liveness.
package ring

import (
	"os"
	"strconv"
	"strings"
)

// Everything the Go side knows about the byte layout of a ring is in this
// file, next to the diagrams of spec section 7; shmserve/layout.py is its
// Python twin and spec/vectors/ring.json keeps the two honest. The names are
// exported for ringtest, the Go server that the tests run against.
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
	HeaderMagicOffset        = 0  // [8]byte "SHMSRING"
	HeaderVersionMajorOffset = 8  // u16
	HeaderVersionMinorOffset = 10 // u16
	HeaderSizeOffset         = 12 // u32
	HeaderSlotCountOffset    = 16 // u32
	HeaderSlotStrideOffset   = 20 // u32
	HeaderReqCapacityOffset  = 24 // u32
	HeaderRespCapacityOffset = 28 // u32
	HeaderTotalSizeOffset    = 32 // u64
	HeaderGenerationOffset   = 40 // u64
	HeaderServerPIDOffset    = 48 // u32
	HeaderFlagsOffset        = 52 // u32, HeaderFlag* bits
	HeaderServerStateOffset  = 64 // u32, a ServerState
	HeaderHeartbeatOffset    = 72 // u64, CLOCK_MONOTONIC ns
	HeaderDoorbellOffset     = 128
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
	SlotOwnerOffset       = 0  // u32 pid, 0 = free; claimed by CAS
	SlotReqSeqOffset      = 4  // u32, the client's publish word
	SlotReqIDOffset       = 8  // u64
	SlotReqLenOffset      = 16 // u32
	SlotReqTypeOffset     = 20 // u8
	SlotAckSeqOffset      = 24 // u32
	SlotCancelSeqOffset   = 28 // u32
	SlotFrameSeqOffset    = 64 // u32, the server's publish word
	SlotFrameReqSeqOffset = 68 // u32
	SlotFrameReqIDOffset  = 72 // u64
	SlotFrameLenOffset    = 80 // u32
	SlotFrameTypeOffset   = 84 // u8
	SlotFrameFlagsOffset  = 85 // u8
	SlotDataOffset        = 128
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

	FrameFlagFinal = 1 << 0
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

// Align64 rounds n up to a whole number of cache lines.
func Align64(n uint64) uint64 { return (n + CacheLine - 1) &^ (CacheLine - 1) }

// Object names of section 6. The shared memory is opened by its path under
// /dev/shm (what shm_open does on Linux); semaphores by their POSIX names.

// ShmPath is the file of ring's shared memory.
func ShmPath(ring string) string { return "/dev/shm/shmserve." + ring }

// RequestSemName is the semaphore the server waits on.
func RequestSemName(ring string) string { return "/shmserve." + ring + ".req" }

// SlotSemName is the semaphore the owner of slot waits on.
func SlotSemName(ring string, slot int) string {
	return "/shmserve." + ring + ".s" + strconv.Itoa(slot)
}

// LockPath is the liveness lock the server holds for its whole life.
func LockPath(ring string) string { return "/dev/shm/shmserve." + ring + ".lock" }

// SemPath is the file behind the POSIX semaphore semName (glibc's layout).
func SemPath(semName string) string { return "/dev/shm/sem." + strings.TrimPrefix(semName, "/") }

// HeaderFlagGroupAccess is the header flag of a server started with
// --group-access: its objects are 0660 instead of 0600.
const HeaderFlagGroupAccess = 1

// DefaultSocketDir is the directory of the server's Unix socket when
// --socket does not name one: private to the user (shmserve/layout.py
// computes the same path).
func DefaultSocketDir() string { return "/tmp/shmserve-" + strconv.Itoa(os.Geteuid()) }

// DefaultSocketPath is the Unix socket a server of ring serves by default.
func DefaultSocketPath(ring string) string { return DefaultSocketDir() + "/" + ring + ".sock" }
