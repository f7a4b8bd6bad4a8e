package ring

import (
	"context"
	"errors"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/shmserve/shmserve/goclient/internal/posixsem"
)

// pollsPerYield is how many polls of a publish word a spinner makes between
// runtime.Gosched calls. Without yielding, a spinning goroutine at
// GOMAXPROCS=1 starves the goroutines it waits with, and two spinners sharing
// a core collapse to the spin budget (both seen on 2-vCPU machines).
// It also paces the clock reads: time.Now costs ~65 ns, one poll ~1 ns.
const pollsPerYield = 256

// pollsPerYieldShared replaces pollsPerYield while other waits are in their
// spin phase: parked, or answered and not yet run. Those the poller answered
// run only when it yields, so at GOMAXPROCS=1 every poll between an answer
// and the next yield delays them, and the stretch decides how evenly replies
// are handed out (bench/README.md).
const pollsPerYieldShared = 32

// spinStretch bounds how far a Waiter stretches its spin budget towards the
// typical wait, as a multiple of the configured spin.
const spinStretch = 10

// maxSpinPause bounds how many waits in a row block without spinning after
// spins kept failing, so a server that turns fast again is noticed within
// that many requests, while a useless spin costs at most 1/maxSpinPause of
// its budget per request.
const maxSpinPause = 128

// Waiter implements the wait of spec section 10: spin on a publish word for
// a bounded time, then block on its semaphore in timed waits, checking
// between waits that the other side still lives. Both directions of the ring
// use it: the client waiting for frames, and ringtest's server waiting for
// the doorbell.
//
// The waits spinning through one Waiter at the same time share one poller:
// the first of them (the leader) polls its own word and everyone else's,
// while the others park on a channel. A parked wait learns of its change
// from the leader through the Go scheduler, with no system call on either
// side: its semaphore has no sleeper, so the server's post stays in user
// space. When the leader's own word changes it hands the polling to the
// oldest parked wait. So a process spins on one CPU however many calls it
// has in flight, and no reply costs a futex wake-up (bench/README.md has
// the measurements against one spinner per call).
type Waiter struct {
	// spin is how long the poller goes on without seeing any of its words
	// change before every wait it serves blocks, stretched up to spinStretch
	// times by typicalWait (see budget); 0 blocks at once.
	spin time.Duration
	// typicalWait is a moving average of how long waits took (ns).
	typicalWait atomic.Int64
	// tick bounds each blocking wait, so liveness is checked at least this often.
	tick time.Duration

	// mu guards leading and parked. The leader polls a copy of parked,
	// refreshed when version moves, and takes mu only when it has something
	// to answer, so goroutines parking never queue behind a lock the leader
	// retakes every few nanoseconds.
	mu      sync.Mutex
	leading bool     // some wait is polling for the parked ones
	parked  []*Watch // the waits the leader polls for, oldest first
	version atomic.Uint64

	// spinning counts the waits in their spin phase (see pollsPerYieldShared).
	spinning atomic.Int32

	// A spin that ends without the change only burns a CPU the other side
	// may need (a model running, a loaded host): after one, the next
	// spinPause waits block at once. spinPause doubles with every failed
	// spin and resets when one succeeds; skipSpins counts the pause down.
	spinPause atomic.Int32
	skipSpins atomic.Int32

	// counts, when set, learns how each wait ended; nil for waits nobody
	// reports on (ringtest's server, the reapers).
	counts *WaitCounts
}

// WaitCounts counts how waits went: Spun saw the change without blocking
// (at once or while spinning), Blocked waited on the semaphore at least
// once, however it ended. A wait that fails before blocking (its context
// ended while it spun) counts in neither. Every Waiter given the same
// WaitCounts adds to it, so counts outlive a ring generation.
type WaitCounts struct {
	Spun    atomic.Uint64
	Blocked atomic.Uint64
}

// Watch is what a goroutine waits for through a Waiter: the test of its
// publish word, and the channel it hears the poller on while parked. It
// serves one wait at a time and is reused by the next, so waiting allocates
// nothing.
type Watch struct {
	changed func() bool
	// cancelled is set by a parked wait whose context ended; the leader then
	// answers it spinExpired, so only the leader ever removes parked waits
	// and changed never runs after its wait has left.
	cancelled atomic.Bool
	// result gets the leader's one answer to a parked wait; buffered, so the
	// leader never blocks on a send.
	result chan spinResult
}

// NewWatch returns a Watch of changed, which reports whether the word moved.
// While its wait is parked, changed runs on the leader's goroutine (never at
// the same time as on the waiting one, and never after Await returns), so it
// must be cheap.
func NewWatch(changed func() bool) *Watch {
	return &Watch{changed: changed, result: make(chan spinResult, 1)}
}

type spinResult uint8

const (
	spinChanged spinResult = iota // the word changed
	spinExpired                   // the spin failed: block on the semaphore
	spinLead                      // the leader left: poll for everyone now
)

// NewWaiter returns a Waiter whose waits spin (sharing one poller) until
// none of their words has changed for spin, then block in waits of at most
// tick.
func NewWaiter(spin, tick time.Duration) *Waiter {
	return &Waiter{spin: spin, tick: tick}
}

// Await returns nil once watch's word changed. It returns ctx's error when
// ctx ends first, and the error of alive when that reports the other side
// gone (alive runs after every wait that timed out). Tokens on sem only mean
// "look again", so spurious wake-ups are harmless. One watch serves one
// Await at a time.
func (w *Waiter) Await(ctx context.Context, sem *posixsem.Semaphore, watch *Watch, alive func() error) (err error) {
	changed := watch.changed
	if changed() {
		w.count(false)
		return nil
	}
	var start time.Time
	if w.spin > 0 {
		start = time.Now()
		defer func() {
			if err == nil { // only a wait that saw its change says how long waits take
				w.observe(time.Since(start))
			}
		}()
	}
	if w.spinUntil(ctx, watch, start) {
		w.count(false)
		return nil
	}
	if ctx.Done() != nil {
		// A cancel without a deadline would otherwise wait out the tick: post
		// a token so the blocked wait looks at ctx at once. The post must be
		// over before Await returns, since the caller may close sem next.
		posted := make(chan struct{})
		stop := context.AfterFunc(ctx, func() {
			defer close(posted)
			sem.Post()
		})
		defer func() {
			if !stop() {
				<-posted
			}
		}()
	}
	deadline, hasDeadline := ctx.Deadline()
	for blocked := false; ; {
		if changed() {
			if !blocked {
				w.count(false)
			}
			return nil
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		timeout := w.tick
		if hasDeadline {
			// ctx's own timer may fire a little after its deadline.
			if timeout = min(timeout, time.Until(deadline)); timeout <= 0 {
				return context.DeadlineExceeded
			}
		}
		if !blocked {
			blocked = true
			w.count(true)
		}
		err := sem.TimedWait(timeout)
		switch {
		case errors.Is(err, posixsem.ErrTimeout):
			if err := alive(); err != nil {
				return err
			}
		case err != nil:
			return err
		}
	}
}

func (w *Waiter) count(blocked bool) {
	switch {
	case w.counts == nil:
	case blocked:
		w.counts.Blocked.Add(1)
	default:
		w.counts.Spun.Add(1)
	}
}

// spinUntil reports whether me's word changed within the spin budget (from
// start): as the leader, polling it itself, or parked until the leader
// answers.
func (w *Waiter) spinUntil(ctx context.Context, me *Watch, start time.Time) bool {
	if w.spin <= 0 {
		return false
	}
	if w.skipSpins.Load() > 0 && w.skipSpins.Add(-1) >= 0 {
		return false
	}
	w.spinning.Add(1)
	defer w.spinning.Add(-1)
	w.mu.Lock()
	if !w.leading {
		w.leading = true
		w.mu.Unlock()
		return w.lead(ctx, me.changed, start)
	}
	me.cancelled.Store(false) // left set by a wait of me that ended parked
	w.parked = append(w.parked, me)
	w.version.Add(1)
	w.mu.Unlock()
	var result spinResult
	select {
	case result = <-me.result:
	case <-ctx.Done():
		me.cancelled.Store(true)
		result = <-me.result // the leader's next poll answers
	}
	if result == spinLead {
		return w.lead(ctx, me.changed, time.Now())
	}
	return result == spinChanged
}

// lead polls its own word (mine), and those of the parked waits, until
// mine changes or ctx ends, or none of them changed for the spin budget;
// then it hands the polling on. The budget runs from the last change seen
// (lastChange, at first when the lead began), not from each wait's start:
// with many calls in flight each waits its turn at the server, which can
// take longer than the budget while replies keep coming.
func (w *Waiter) lead(ctx context.Context, mine func() bool, lastChange time.Time) bool {
	failed := false
	defer func() { w.handOff(failed) }()
	var watched []*Watch
	watchedVersion := ^uint64(0)
	for polls := 1; ; polls++ {
		if mine() {
			w.spinPause.Store(0)
			return true
		}
		if w.version.Load() != watchedVersion {
			w.mu.Lock()
			watched = append(watched[:0], w.parked...)
			watchedVersion = w.version.Load()
			w.mu.Unlock()
		}
		for _, p := range watched {
			if p.cancelled.Load() || p.changed() {
				w.mu.Lock()
				if w.settle() {
					w.spinPause.Store(0)
					lastChange = time.Time{} // read the clock at the next yield
				}
				w.mu.Unlock()
				break
			}
		}
		// Clock reads (~65 ns) only at yields: budgets are coarse anyway.
		if polls%pollsPerYieldShared != 0 ||
			(polls%pollsPerYield != 0 && w.spinning.Load() == 1) {
			continue
		}
		if ctx.Err() != nil { // not ctx.Done(): that would allocate its channel
			return false
		}
		now := time.Now()
		if lastChange.IsZero() {
			lastChange = now
		} else if now.Sub(lastChange) >= w.budget(len(watched)) {
			w.failedSpin()
			failed = true
			return false
		}
		runtime.Gosched()
	}
}

// settle, with mu held, answers the parked waits whose word changed, and
// those whose context ended, and reports whether any word changed.
func (w *Waiter) settle() bool {
	changed := false
	kept := w.parked[:0]
	for _, p := range w.parked {
		switch {
		case p.changed():
			changed = true
			p.result <- spinChanged
		case p.cancelled.Load():
			p.result <- spinExpired
		default:
			kept = append(kept, p)
		}
	}
	if len(kept) < len(w.parked) {
		clear(w.parked[len(kept):])
		w.parked = kept
		w.version.Add(1)
	}
	return changed
}

// handOff ends a leader's turn: a last look for the parked waits, then the
// oldest of them polls on, or, after a failed spin, they all block.
func (w *Waiter) handOff(failed bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.settle()
	if len(w.parked) == 0 {
		w.leading = false
		return
	}
	if failed { // nothing changed for the whole budget: stop spinning for all
		for _, p := range w.parked {
			p.result <- spinExpired
		}
		clear(w.parked)
		w.parked = w.parked[:0]
		w.version.Add(1)
		w.leading = false
		return
	}
	next := w.parked[0]
	w.parked = slices.Delete(w.parked, 0, 1)
	w.version.Add(1)
	next.result <- spinLead
}

// budget is how long the poller goes on without a change. Alone, it spins
// the configured spin or twice the typical wait when that is longer, up to
// spinStretch times the spin: a reply that comes a little after the spin (a
// model call of 90 µs against a 50 µs spin) is then caught spinning instead
// of paying a wake-up. With parked waits replies keep coming, and a lull of
// the plain spin means the server is stalled or starved of CPU: stretching
// then costs throughput instead (bench/README.md).
func (w *Waiter) budget(parked int) time.Duration {
	if parked > 0 {
		return w.spin
	}
	return min(max(w.spin, 2*time.Duration(w.typicalWait.Load())), spinStretch*w.spin)
}

// observe adds one wait's duration to typicalWait (weight 1/8). Samples are
// capped, so one stall moves the budget for a few waits, not for hundreds.
func (w *Waiter) observe(took time.Duration) {
	sample := int64(min(took, 2*spinStretch*w.spin))
	for {
		old := w.typicalWait.Load()
		next := old + (sample-old)/8
		if old == 0 {
			next = sample
		}
		if w.typicalWait.CompareAndSwap(old, next) {
			return
		}
	}
}

func (w *Waiter) failedSpin() {
	pause := min(2*w.spinPause.Load()+1, maxSpinPause)
	w.spinPause.Store(pause)
	w.skipSpins.Store(pause)
}
