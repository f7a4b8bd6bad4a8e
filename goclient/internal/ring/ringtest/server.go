// Package ringtest is a Go server for the shmserve ring, for tests that
// must run without the Python server. It follows spec/PROTOCOL.md sections
// 6-11 with one goroutine owning the ring and a goroutine per request, and
// lets a test tamper with frames, hold the server in STARTING, stop it or
// kill it.
//
// It is a test server, not a second product: it does not reclaim the slots
// of dead clients (section 9), has no group access (section 6), and answers
// what its Handler returns without model-side validation. Request-line
// validation (ValidateRequest) lives here because only a server needs it.
package ringtest

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/shmserve/shmserve/goclient/internal/posixsem"
	"github.com/shmserve/shmserve/goclient/internal/ring"
	"github.com/shmserve/shmserve/goclient/protocol"
)

// Message is one reply message; the server cuts it into frames.
type Message struct {
	Type protocol.MsgType
	Body []byte
}

// Handler answers one request. ctx ends when the client cancels it or the
// server stops. A stream answer is its chunks followed by STREAM_END.
type Handler func(ctx context.Context, typ protocol.MsgType, body []byte) []Message

// FrameFields is what the server is about to publish in a slot.
type FrameFields struct {
	ReqSeq uint32
	ReqID  uint64
	Len    uint32
	Type   protocol.MsgType
	Flags  uint8
}

// Options configure a Server; zero values take the spec's defaults.
type Options struct {
	Slots, ReqCapacity, RespCapacity int
	// Handler answers requests; nil echoes every body back.
	Handler Handler
	// Tamper, when set, may rewrite each frame header before it is
	// published, to test the client's checks.
	Tamper func(slot int, h *FrameFields)
	// HoldStarting leaves the server in STARTING until MarkReady.
	HoldStarting bool
}

// Echo answers every request with its own body and type.
func Echo(_ context.Context, typ protocol.MsgType, body []byte) []Message {
	return []Message{{Type: typ, Body: body}}
}

// Server is one running ring server generation.
type Server struct {
	Name       string
	Generation uint64

	opts     Options
	geo      ring.Geometry
	mem      []byte
	lock     *os.File
	reqSem   *posixsem.Semaphore
	slotSems []*posixsem.Semaphore

	results chan result
	// handlers run the Handler calls; ending handlersCtx and waiting for
	// them comes before the semaphores they post are closed.
	handlers       sync.WaitGroup
	handlersCtx    context.Context
	cancelHandlers context.CancelFunc
	stop           context.CancelFunc
	done           chan struct{}
	grace          atomic.Int64 // nanoseconds; set by Stop before it cancels the loop
	killed         atomic.Bool
	once           sync.Once
}

type result struct {
	slot     int
	request  *activeRequest
	messages []Message
}

type activeRequest struct {
	seq    uint32
	id     uint64
	cancel context.CancelFunc
}

// slotState is the server's own memory of a slot; geometry and progress
// never come back from shared memory.
type slotState struct {
	servedSeq     uint32
	active        *activeRequest
	queue         []frame
	awaitingAck   bool
	lastPublished uint32
}

type frame struct {
	header FrameFields
	data   []byte
}

// Start creates the ring NAME as section 11 describes and serves it until
// Stop or Kill.
func Start(name string, opts Options) (*Server, error) {
	if err := ring.CheckName(name); err != nil {
		return nil, err
	}
	opts.Slots = cmp.Or(opts.Slots, 64)
	opts.ReqCapacity = cmp.Or(opts.ReqCapacity, 256<<10)
	opts.RespCapacity = cmp.Or(opts.RespCapacity, 64<<10)
	if opts.Handler == nil {
		opts.Handler = Echo
	}
	s := &Server{Name: name, opts: opts, results: make(chan result, opts.Slots), done: make(chan struct{})}
	s.handlersCtx, s.cancelHandlers = context.WithCancel(context.Background())
	if err := s.create(); err != nil {
		s.release()
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	s.stop = cancel
	s.setState(ring.StateStarting)
	if !opts.HoldStarting {
		s.setState(ring.StateReady)
	}
	go s.serve(ctx)
	return s, nil
}

func (s *Server) create() error {
	var err error
	if s.lock, err = os.OpenFile(ring.LockPath(s.Name), os.O_RDWR|os.O_CREATE, 0o600); err != nil {
		return err
	}
	if err := unix.Flock(int(s.lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		s.lock.Close()
		s.lock = nil
		return fmt.Errorf("a live server already serves %s: %w", s.Name, err)
	}
	if err := removeObjects(s.Name, false); err != nil {
		return err
	}
	stride := ring.Align64(uint64(ring.SlotDataOffset + s.opts.ReqCapacity + s.opts.RespCapacity))
	total := ring.HeaderSize + uint64(s.opts.Slots)*stride
	var generation [8]byte
	for binary.LittleEndian.Uint64(generation[:]) == 0 {
		rand.Read(generation[:])
	}
	s.Generation = binary.LittleEndian.Uint64(generation[:])
	fd, err := unix.Open(ring.ShmPath(s.Name), unix.O_RDWR|unix.O_CREAT|unix.O_EXCL|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return &os.PathError{Op: "create", Path: ring.ShmPath(s.Name), Err: err}
	}
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, int64(total)); err != nil {
		return err
	}
	if s.mem, err = unix.Mmap(fd, 0, int(total), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED); err != nil {
		return err
	}
	h := s.mem
	binary.LittleEndian.PutUint16(h[ring.HeaderVersionMajorOffset:], ring.VersionMajor)
	binary.LittleEndian.PutUint16(h[ring.HeaderVersionMinorOffset:], ring.VersionMinor)
	binary.LittleEndian.PutUint32(h[ring.HeaderSizeOffset:], ring.HeaderSize)
	binary.LittleEndian.PutUint32(h[ring.HeaderSlotCountOffset:], uint32(s.opts.Slots))
	binary.LittleEndian.PutUint32(h[ring.HeaderSlotStrideOffset:], uint32(stride))
	binary.LittleEndian.PutUint32(h[ring.HeaderReqCapacityOffset:], uint32(s.opts.ReqCapacity))
	binary.LittleEndian.PutUint32(h[ring.HeaderRespCapacityOffset:], uint32(s.opts.RespCapacity))
	binary.LittleEndian.PutUint64(h[ring.HeaderTotalSizeOffset:], total)
	binary.LittleEndian.PutUint64(h[ring.HeaderGenerationOffset:], s.Generation)
	binary.LittleEndian.PutUint32(h[ring.HeaderServerPIDOffset:], uint32(os.Getpid()))
	binary.LittleEndian.PutUint32(h[ring.HeaderFlagsOffset:], 0)
	if s.geo, err = ring.ValidateHeader(append([]byte(ring.Magic), h[len(ring.Magic):]...), len(h)); err != nil {
		return fmt.Errorf("ringtest built a header its client rejects: %w", err)
	}
	if s.reqSem, err = posixsem.Create(ring.RequestSemName(s.Name), 0o600); err != nil {
		return err
	}
	s.slotSems = make([]*posixsem.Semaphore, s.opts.Slots)
	for i := range s.slotSems {
		if s.slotSems[i], err = posixsem.Create(ring.SlotSemName(s.Name, i), 0o600); err != nil {
			return err
		}
	}
	copy(h[ring.HeaderMagicOffset:], ring.Magic)
	return nil
}

var semFilePattern = regexp.MustCompile(`^sem\.shmserve\.(.+)\.(req|s(?:0|[1-9][0-9]*))$`)

// removeObjects unlinks the shared memory and semaphores of NAME, matching
// semaphore names exactly so that a ring named "x.y" survives the cleanup
// of ring "x". withLock also removes the liveness lock file.
func removeObjects(name string, withLock bool) error {
	if err := os.Remove(ring.ShmPath(name)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	entries, err := os.ReadDir(filepath.Dir(ring.ShmPath(name)))
	if err != nil {
		return err
	}
	for _, entry := range entries {
		if m := semFilePattern.FindStringSubmatch(entry.Name()); m != nil && m[1] == name {
			if err := posixsem.Unlink("/shmserve." + name + "." + m[2]); err != nil && !errors.Is(err, os.ErrNotExist) {
				return err
			}
		}
	}
	if withLock {
		if err := os.Remove(ring.LockPath(name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	return nil
}

// RemoveObjects unlinks every object of NAME, as the next server would after
// a crash; tests call it after Kill.
func RemoveObjects(name string) error { return removeObjects(name, true) }

// MarkReady moves a server started with HoldStarting to READY.
func (s *Server) MarkReady() { s.setState(ring.StateReady) }

func (s *Server) setState(state ring.ServerState) {
	s.u32(ring.HeaderServerStateOffset).Store(uint32(state))
}

func (s *Server) u32(offset int) *atomic.Uint32 {
	return (*atomic.Uint32)(unsafe.Pointer(&s.mem[offset]))
}

func (s *Server) slotU32(slot, offset int) *atomic.Uint32 {
	return s.u32(ring.HeaderSize + slot*s.geo.SlotStride + offset)
}

// Owner is the owner word of slot i, for tests that check slots come back.
func (s *Server) Owner(i int) uint32 { return s.slotU32(i, ring.SlotOwnerOffset).Load() }

// SetOwner stores pid in slot i's owner word, as another client process
// claiming or releasing it would.
func (s *Server) SetOwner(i int, pid uint32) { s.slotU32(i, ring.SlotOwnerOffset).Store(pid) }

// Stop shuts down as section 11 describes: STOPPING, in-flight requests get
// grace to finish, then everything left is answered SHUTTING_DOWN, STOPPED,
// every slot semaphore posted, the objects unlinked and the lock released.
func (s *Server) Stop(grace time.Duration) {
	s.grace.Store(int64(grace))
	s.once.Do(func() {
		s.stop()
		<-s.done
		removeObjects(s.Name, true)
		s.release()
	})
}

// Kill stops serving at once and drops the liveness lock without any of the
// shutdown, as a SIGKILLed server would: the objects stay behind.
func (s *Server) Kill() {
	s.killed.Store(true)
	s.once.Do(func() {
		s.stop()
		<-s.done
		s.release()
	})
}

func (s *Server) release() {
	s.cancelHandlers()
	s.handlers.Wait()
	for _, sem := range s.slotSems {
		if sem != nil {
			sem.Close()
		}
	}
	if s.reqSem != nil {
		s.reqSem.Close()
	}
	if s.mem != nil {
		unix.Munmap(s.mem)
	}
	if s.lock != nil {
		s.lock.Close()
	}
}

// heartbeatInterval is how often the loop wakes without a doorbell (spec: at
// least every 250 ms).
const heartbeatInterval = 250 * time.Millisecond

func (s *Server) serve(ctx context.Context) {
	defer close(s.done)
	// A new ring is zeroed: every slot has served req_seq 0 so far.
	slots := make([]slotState, s.geo.SlotCount)
	doorbell := (*atomic.Uint64)(unsafe.Pointer(&s.mem[ring.HeaderDoorbellOffset]))
	heartbeat := (*atomic.Uint64)(unsafe.Pointer(&s.mem[ring.HeaderHeartbeatOffset]))
	beat := func() error {
		// CLOCK_MONOTONIC, as section 7.1 says: a probe compares it with its own.
		var now unix.Timespec
		if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &now); err != nil {
			return err
		}
		heartbeat.Store(uint64(now.Nano()))
		return nil
	}
	waiter := ring.NewWaiter(20*time.Microsecond, heartbeatInterval)
	running := phase{}
	var seen uint64
	doorbellRang := ring.NewWatch(func() bool { return doorbell.Load() != seen || len(s.results) > 0 })
	for ctx.Err() == nil {
		beat()
		seen = doorbell.Load()
		s.collectResults(slots)
		for i := range slots {
			s.serveSlot(i, &slots[i], running)
		}
		waiter.Await(ctx, s.reqSem, doorbellRang, beat)
	}
	if !s.killed.Load() {
		s.shutDown(slots)
	}
}

// phase is what serveSlot does with new and unfinished requests: serve them
// while running; answer new ones SHUTTING_DOWN while stopping, and
// unfinished ones too once the grace period ends.
type phase struct {
	stopping  bool
	graceEnds time.Time
}

func (s *Server) collectResults(slots []slotState) {
	for {
		select {
		case res := <-s.results:
			state := &slots[res.slot]
			if state.active != res.request {
				continue // cancelled meanwhile; its error is already queued
			}
			state.active = nil
			if len(res.messages) == 0 {
				res.messages = []Message{errorMessage(protocol.CodeInternal, "handler returned no reply")}
			}
			state.queue = s.frames(res.request, res.messages)
		default:
			return
		}
	}
}

func (s *Server) slotMem(i int) []byte {
	return s.mem[ring.HeaderSize+i*s.geo.SlotStride:][:s.geo.SlotStride]
}

// serveSlot starts a new request, ends one that was cancelled, and
// publishes the next queued frame once the client has acked the previous one.
func (s *Server) serveSlot(i int, state *slotState, p phase) {
	slotMem := s.slotMem(i)
	if seq := s.slotU32(i, ring.SlotReqSeqOffset).Load(); seq != state.servedSeq {
		state.servedSeq = seq
		state.awaitingAck = false
		request := &activeRequest{seq: seq, id: binary.LittleEndian.Uint64(slotMem[ring.SlotReqIDOffset:])}
		if p.stopping {
			state.queue = s.frames(request, []Message{errorMessage(protocol.CodeShuttingDown, "server is stopping")})
		} else {
			s.startRequest(i, state, slotMem, request)
		}
	}
	if state.active != nil {
		switch {
		case s.slotU32(i, ring.SlotCancelSeqOffset).Load() == state.active.seq:
			s.abort(state, errorMessage(protocol.CodeCancelled, "cancelled by the client"))
		case p.stopping && !time.Now().Before(p.graceEnds):
			s.abort(state, errorMessage(protocol.CodeShuttingDown, "server stopped before the reply was complete"))
		}
	}
	if state.awaitingAck && s.slotU32(i, ring.SlotAckSeqOffset).Load() == state.lastPublished {
		state.awaitingAck = false
	}
	if len(state.queue) > 0 && !state.awaitingAck {
		s.publish(i, state, slotMem)
	}
}

// abort drops what was queued for the active request and answers it with
// one final error.
func (s *Server) abort(state *slotState, final Message) {
	state.active.cancel()
	state.queue = s.frames(state.active, []Message{final})
	state.active = nil
}

func (s *Server) startRequest(i int, state *slotState, slotMem []byte, request *activeRequest) {
	record, err := ValidateRequest(slotMem[:ring.CacheLine], s.geo.ReqCapacity)
	var body []byte
	if err == nil {
		body = append([]byte(nil), slotMem[ring.SlotDataOffset:][:record.Len]...)
		err = protocol.CheckRequest(record.Type, body)
	}
	var protocolErr *protocol.Error
	if errors.As(err, &protocolErr) {
		state.queue = s.frames(request, []Message{{Type: protocol.TypeError, Body: protocol.AppendErrorBody(nil, protocolErr)}})
		return
	}
	// Handlers outlive the loop's context: a stopping server gives them grace.
	handlerCtx, cancel := context.WithCancel(s.handlersCtx)
	request.cancel = cancel
	state.active = request
	s.handlers.Go(func() {
		messages := s.opts.Handler(handlerCtx, record.Type, body)
		select {
		case s.results <- result{slot: i, request: request, messages: messages}:
			s.reqSem.Post()
		case <-s.handlersCtx.Done():
		}
	})
}

func errorMessage(code protocol.Code, message string) Message {
	return Message{Type: protocol.TypeError, Body: protocol.AppendErrorBody(nil, &protocol.Error{Code: code, Message: message})}
}

// frames cuts messages into frames of at most resp_capacity as section 9
// says: text is cut only at code point boundaries, an ERROR is one frame (its
// message cut to fit, section 4), and only the very last frame is FINAL.
func (s *Server) frames(request *activeRequest, messages []Message) []frame {
	var out []frame
	for _, m := range messages {
		body := m.Body
		if m.Type == protocol.TypeError && len(body) > s.geo.RespCapacity {
			body = body[:utf8Cut(body, s.geo.RespCapacity, errorCodeBytes)]
		}
		for first := true; first || len(body) > 0; first = false {
			n := min(len(body), s.geo.RespCapacity)
			if isText(m.Type) && n < len(body) {
				n = utf8Cut(body, n, 1)
			}
			out = append(out, frame{
				header: FrameFields{ReqSeq: request.seq, ReqID: request.id, Len: uint32(n), Type: m.Type},
				data:   body[:n],
			})
			body = body[n:]
		}
	}
	out[len(out)-1].header.Flags = ring.FrameFlagFinal
	return out
}

// errorCodeBytes is the u16 code before an ERROR body's UTF-8 message.
const errorCodeBytes = 2

func isText(t protocol.MsgType) bool {
	switch t {
	case protocol.TypeClassify, protocol.TypePrompt, protocol.TypeStreamChunk, protocol.TypeMetadata:
		return true
	}
	return false
}

// utf8Cut moves a cut at end back over continuation bytes, so it does not
// split a code point, but not below min.
func utf8Cut(b []byte, end, min int) int {
	for end > min && !utf8.RuneStart(b[end]) {
		end--
	}
	return end
}

func (s *Server) publish(i int, state *slotState, slotMem []byte) {
	next := state.queue[0]
	state.queue = state.queue[1:]
	if s.opts.Tamper != nil {
		s.opts.Tamper(i, &next.header)
	}
	copy(slotMem[ring.SlotDataOffset+s.geo.ReqCapacity:], next.data)
	binary.LittleEndian.PutUint32(slotMem[ring.SlotFrameLenOffset:], next.header.Len)
	slotMem[ring.SlotFrameTypeOffset] = byte(next.header.Type)
	slotMem[ring.SlotFrameFlagsOffset] = next.header.Flags
	binary.LittleEndian.PutUint32(slotMem[ring.SlotFrameReqSeqOffset:], next.header.ReqSeq)
	binary.LittleEndian.PutUint64(slotMem[ring.SlotFrameReqIDOffset:], next.header.ReqID)
	state.lastPublished = s.slotU32(i, ring.SlotFrameSeqOffset).Add(1)
	state.awaitingAck = next.header.Flags&ring.FrameFlagFinal == 0
	s.slotSems[i].Post()
}

// shutDown is the stop sequence of section 11 after STOPPING: serve what is
// in flight until the grace period ends, fail the rest with SHUTTING_DOWN,
// then STOPPED and a token in every slot semaphore to wake every waiter.
func (s *Server) shutDown(slots []slotState) {
	s.setState(ring.StateStopping)
	stopping := phase{stopping: true, graceEnds: time.Now().Add(time.Duration(s.grace.Load()))}
	// Past the grace period a client still gets heartbeatInterval to ack.
	giveUp := stopping.graceEnds.Add(heartbeatInterval)
	for {
		s.collectResults(slots)
		busy := false
		for i := range slots {
			s.serveSlot(i, &slots[i], stopping)
			busy = busy || slots[i].active != nil || len(slots[i].queue) > 0
		}
		if !busy || time.Now().After(giveUp) {
			break
		}
		time.Sleep(100 * time.Microsecond)
	}
	s.setState(ring.StateStopped)
	for _, sem := range s.slotSems {
		sem.Post()
	}
}

// RequestRecord is the client line of a slot as a server reads it.
type RequestRecord struct {
	Owner uint32
	Seq   uint32
	ID    uint64
	Len   int
	Type  protocol.MsgType
}

// ValidateRequest is the server's check of a slot's client line (its bytes
// 0..63, section 8): a record that no client can be waiting for, or whose
// req_len overruns the slot, is CORRUPT_RECORD; then the type and size rules
// of section 3 apply. Every failure is the error the server answers with.
func ValidateRequest(line []byte, reqCapacity int) (RequestRecord, error) {
	if len(line) < ring.CacheLine {
		return RequestRecord{}, &protocol.Error{Code: protocol.CodeCorruptRecord, Message: fmt.Sprintf("request line of %d bytes", len(line))}
	}
	record := RequestRecord{
		Owner: binary.LittleEndian.Uint32(line[ring.SlotOwnerOffset:]),
		Seq:   binary.LittleEndian.Uint32(line[ring.SlotReqSeqOffset:]),
		ID:    binary.LittleEndian.Uint64(line[ring.SlotReqIDOffset:]),
		Type:  protocol.MsgType(line[ring.SlotReqTypeOffset]),
	}
	length := binary.LittleEndian.Uint32(line[ring.SlotReqLenOffset:])
	switch {
	case record.Owner == 0:
		return record, &protocol.Error{Code: protocol.CodeCorruptRecord, Message: "request published in a free slot"}
	case uint64(length) > uint64(reqCapacity):
		return record, &protocol.Error{Code: protocol.CodeCorruptRecord, Message: fmt.Sprintf("req_len %d exceeds req_capacity %d", length, reqCapacity)}
	}
	record.Len = int(length)
	return record, protocol.CheckRequestLength(record.Type, record.Len)
}
