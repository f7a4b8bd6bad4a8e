package ring

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"time"

	"github.com/shmserve/shmserve/goclient/internal/posixsem"
	"github.com/shmserve/shmserve/goclient/protocol"
)

// Ring is one attached ring generation. Its methods are safe for concurrent
// use; each call holds one slot from claim to its FINAL frame.
type Ring struct {
	name  string
	mem   []byte
	geo   Geometry
	inode uint64
	pid   uint32

	serverState *atomic.Uint32
	doorbell    *atomic.Uint64
	requestSem  *posixsem.Semaphore
	slotSems    []*posixsem.Semaphore
	lock        *os.File

	slots []slot
	free  *freeSlots

	nextReqID     atomic.Uint64
	claimPatience time.Duration
	waiter        *Waiter
	reaperWaiter  *Waiter

	// users counts the calls and reapers using the mapping, plus one for
	// the ring itself until Close; the mapping goes when it reaches 0.
	users   atomic.Int64
	closing atomic.Bool
	deadErr atomic.Pointer[error]
	dead    chan struct{}
}

// slot is this process's view of one slot: its bytes and its publish words.
type slot struct {
	index     int
	mem       []byte
	replyData []byte
	owner     *atomic.Uint32
	reqSeq    *atomic.Uint32
	ackSeq    *atomic.Uint32
	cancelSeq *atomic.Uint32
	frameSeq  *atomic.Uint32
	sem       *posixsem.Semaphore

	// frameMoved watches frame_seq move from waitFrom, storing what it
	// read in seen: made once per slot, so a wait allocates nothing. Only
	// the goroutine holding the slot waits on it (its call, then a reaper).
	frameMoved *Watch
	waitFrom   uint32
	seen       uint32
}

func (s *slot) initFrameMoved() {
	s.frameMoved = NewWatch(func() bool {
		s.seen = s.frameSeq.Load()
		return s.seen != s.waitFrom
	})
}

// request is one request in flight in a claimed slot.
type request struct {
	slot      *slot
	seq       uint32 // S, the req_seq it was published with
	id        uint64
	lastFrame uint32 // the frame_seq consumed last
}

// Geometry is the validated header, as read at attach.
func (r *Ring) Geometry() Geometry { return r.geo }

// claimBackoff bounds the sleeps of a caller that finds every slot owned by
// other processes; a slot frees when some request completes, so there is no
// token to wait on.
const (
	claimBackoffMin = 20 * time.Microsecond
	claimBackoffMax = 2 * time.Millisecond
)

// maxDrain bounds the stale tokens one claim takes: a legitimate count is at
// most the frames of the slot's last replies that were consumed by spinning.
const maxDrain = 4096

// Call sends one request and hands every reply frame to onFrame, in order,
// until the FINAL one. frame.Data aliases shared memory and is valid only
// during onFrame. If ctx ends, or onFrame fails on a frame that is not FINAL,
// Call cancels the request (section 9), returns at once, and a reaper
// goroutine keeps the slot until the server's FINAL frame.
func (r *Ring) Call(ctx context.Context, typ protocol.MsgType, body []byte, onFrame func(Frame) error) error {
	if len(body) > r.geo.ReqCapacity {
		return &protocol.Error{Code: protocol.CodeTooLarge, Message: fmt.Sprintf(
			"request of %d bytes exceeds ring %s's req_capacity of %d", len(body), r.name, r.geo.ReqCapacity)}
	}
	if !r.acquireUser() {
		return notSent{r.retiredError()}
	}
	defer r.releaseUser()
	if state := ServerState(r.serverState.Load()); state != StateReady {
		// A stopping server would only answer SHUTTING_DOWN; retiring the ring
		// lets the caller attach to its successor.
		return notSent{r.markDead(fmt.Sprintf("server is %v", state))}
	}
	if err := ctx.Err(); err != nil { // claim's fast path would not look
		return notSent{err}
	}
	s, err := r.claim(ctx)
	if err != nil {
		return notSent{err}
	}
	req, err := r.publish(s, typ, body)
	if err != nil {
		r.release(s)
		return notSent{err}
	}
	return r.receive(ctx, req, onFrame)
}

// notSent marks a failure that came before the request was published: the
// server never saw it, so it may be retried on another ring.
type notSent struct{ error }

func (e notSent) Unwrap() error { return e.error }

// NotSent reports whether err came from a Call that failed before its
// request reached shared memory.
func NotSent(err error) bool {
	if err == nil {
		return false // before the declaration below, which escapes: no allocation per call
	}
	var unsent notSent
	return errors.As(err, &unsent)
}

func (r *Ring) retiredError() error {
	if err := r.deadErr.Load(); err != nil {
		return *err
	}
	return fmt.Errorf("%w: ring %s was closed", ErrServerGone, r.name)
}

// ErrNoFreeSlot reports a call that found every slot of the ring held by
// other processes for its whole wait: its ClaimPatience, or its context. The
// request was not sent, so it may go to another transport.
var ErrNoFreeSlot = errors.New("shmserve: no free ring slot (other processes hold every slot)")

// claim takes a slot free in this process and claims it in shared memory.
// Waiting for the goroutines of this process is plain queueing; waiting on
// other processes is bounded by ClaimPatience, since a process may hold its
// slots claimed and idle for as long as it lives.
func (r *Ring) claim(ctx context.Context) (*slot, error) {
	backoff := claimBackoffMin
	var heldSince time.Time // the first time a slot was found held by another process
	for failures := 1; ; failures++ {
		// A free slot is the common case: a receive alone is far cheaper than
		// the select, which locks all three channels (and makes ctx allocate
		// its done channel).
		select {
		case <-r.free.tokens:
		default:
			select {
			case <-r.free.tokens:
			case <-ctx.Done():
				return nil, r.claimFailed(heldSince, ctx.Err())
			case <-r.dead:
				return nil, *r.deadErr.Load()
			}
		}
		s := r.free.take()
		if s.owner.CompareAndSwap(0, r.pid) {
			return s, nil
		}
		r.free.putUnder(s)
		if heldSince.IsZero() {
			heldSince = time.Now()
		} else if r.claimPatience > 0 && time.Since(heldSince) >= r.claimPatience {
			return nil, r.claimFailed(heldSince, nil)
		}
		if failures%r.geo.SlotCount == 0 {
			if err := sleepCtx(ctx, backoff); err != nil {
				return nil, r.claimFailed(heldSince, err)
			}
			backoff = min(2*backoff, claimBackoffMax)
		}
	}
}

// claimFailed explains a claim that ended with ctxErr (nil: out of patience).
func (r *Ring) claimFailed(heldSince time.Time, ctxErr error) error {
	if heldSince.IsZero() {
		return ctxErr
	}
	err := fmt.Errorf("%w: ring %s, %d slots, waited %v", ErrNoFreeSlot, r.name, r.geo.SlotCount,
		time.Since(heldSince).Round(time.Millisecond))
	if ctxErr != nil {
		return fmt.Errorf("%w: %w", err, ctxErr)
	}
	return err
}

// publish is steps 1-4 of section 8 after the claim. It fails only before
// the request is published.
func (r *Ring) publish(s *slot, typ protocol.MsgType, body []byte) (request, error) {
	req := request{slot: s, seq: s.reqSeq.Load() + 1, id: r.nextReqID.Add(1), lastFrame: s.frameSeq.Load()}
	// Tokens left by earlier requests of this slot would only cause spurious
	// wake-ups, but unbounded they would overflow the semaphore. The bound
	// keeps a count someone pushed to SEM_VALUE_MAX from holding this call
	// for seconds (what is left costs wake-ups that re-check the deadline).
	if _, err := s.sem.Drain(maxDrain); err != nil {
		return req, err
	}
	copy(s.mem[SlotDataOffset:], body)
	binary.LittleEndian.PutUint32(s.mem[SlotReqLenOffset:], uint32(len(body)))
	s.mem[SlotReqTypeOffset] = byte(typ)
	binary.LittleEndian.PutUint64(s.mem[SlotReqIDOffset:], req.id)
	s.reqSeq.Store(req.seq)
	r.ringDoorbell()
	return req, nil
}

// ringDoorbell tells the server to look at the slots again. The fetch-add
// is a full barrier, so the value read next postdates the publish: posting
// only when it is 0 cannot lose a wake-up (section 10). The post cannot
// fail on a semaphore this process opened and only posts at 0 (EINVAL and
// EOVERFLOW are its only errors), and a server rescans on its timed wake-up
// anyway, so there is no error to return.
func (r *Ring) ringDoorbell() {
	r.doorbell.Add(1)
	r.requestSem.PostIfZero()
}

// receive consumes the frames of req until the FINAL one.
func (r *Ring) receive(ctx context.Context, req request, onFrame func(Frame) error) error {
	for {
		frame, err := r.nextFrame(ctx, r.waiter, &req)
		if err != nil {
			if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
				r.cancel(req)
			}
			return err
		}
		callbackErr := onFrame(frame)
		if frame.Final {
			r.release(req.slot)
			return callbackErr
		}
		if callbackErr != nil {
			r.cancel(req)
			return callbackErr
		}
		// The deadline holds while frames keep coming (section 9): a wait
		// that finds its frame at once never looks at ctx.
		if err := ctx.Err(); err != nil {
			r.cancel(req)
			return err
		}
		r.ack(req)
	}
}

// nextFrame waits for the next frame of req and validates it. On a
// validation failure the slot is given up without being released: the server
// may still write there.
func (r *Ring) nextFrame(ctx context.Context, w *Waiter, req *request) (Frame, error) {
	s := req.slot
	s.waitFrom = req.lastFrame
	if err := w.Await(ctx, s.sem, s.frameMoved, r.checkAlive); err != nil {
		return Frame{}, err
	}
	req.lastFrame = s.seen
	header, err := ValidateFrame(s.mem[SlotFrameSeqOffset:SlotDataOffset], r.geo.RespCapacity, req.seq, req.id)
	if err != nil {
		r.abandon(s, err)
		return Frame{}, fmt.Errorf("ring %s slot %d: %w", r.name, s.index, err)
	}
	return Frame{FrameHeader: header, Data: s.replyData[:header.Len:header.Len]}, nil
}

// ack lets the server write the next frame of req (flow control).
func (r *Ring) ack(req request) {
	req.slot.ackSeq.Store(req.lastFrame)
	r.ringDoorbell()
}

// release frees a slot whose reply is complete, first in shared memory, then
// for the goroutines of this process.
func (r *Ring) release(s *slot) {
	s.owner.Store(0)
	r.free.put(s)
}

// abandon drops a slot whose frames cannot be trusted. A misrouted frame
// means the server handed the slot to someone else (it judged this process
// dead), so the slot goes back to the free list and a later CAS decides who
// owns it; a corrupt frame leaves the slot claimed for good, since nothing
// says when the server is done writing there.
func (r *Ring) abandon(s *slot, err error) {
	var invalid *ValidationError
	if errors.As(err, &invalid) && invalid.Name == Misrouted {
		r.free.putUnder(s) // until a CAS says it is ours again
	}
}

// cancel asks the server to stop req (section 9) and hands the slot to a
// reaper, which releases it after the FINAL frame: releasing it earlier
// would let the server write a stale frame into the next owner's request.
// It acks the last frame consumed too, which the server needs before it can
// send its FINAL one.
func (r *Ring) cancel(req request) {
	req.slot.cancelSeq.Store(req.seq)
	req.slot.ackSeq.Store(req.lastFrame)
	r.ringDoorbell()
	// The reaper runs even on a ring that is being closed: the slot must
	// still come back to the ring's other clients.
	r.users.Add(1) // cannot be the first: the caller holds a use of r
	go r.reap(req)
}

// reap consumes the rest of a cancelled request's reply: non-FINAL frames
// are acked so the server can get to its FINAL one. It blocks without
// spinning (nobody waits for it) and ends when the server does.
func (r *Ring) reap(req request) {
	defer r.releaseUser()
	for {
		frame, err := r.nextFrame(context.Background(), r.reaperWaiter, &req)
		if err != nil {
			return
		}
		if frame.Final {
			r.release(req.slot)
			return
		}
		r.ack(req)
	}
}
