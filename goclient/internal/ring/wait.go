package ring

import (
	"context"
	"errors"
	"runtime"
	"sync/atomic"
	"time"

	"github.com/shmserve/shmserve/goclient/internal/posixsem"
)

// pollsPerYield is how many polls of a publish word a spinner makes between
// runtime.Gosched calls. Without yielding, a spinning goroutine at
// GOMAXPROCS=1 starves the goroutines it waits with, and two spinners sharing
// a core collapse to the spin budget (ring-measurements.md, pitfalls 1-2).
// It also paces the clock reads: time.Now costs ~65 ns, one poll ~1 ns.
const pollsPerYield = 256

// Waiter implements the wait of spec section 10: spin on a publish word for
// a bounded time, then block on its semaphore in timed waits, checking
// between waits that the other side still lives. Both directions of the ring
// use it: the client waiting for frames, and ringtest's server waiting for
// the doorbell.
type Waiter struct {
	// spin is the budget for polling before blocking; 0 blocks at once.
	spin time.Duration
	// tick bounds each blocking wait, so liveness is checked at least this often.
	tick time.Duration
	// spinners counts goroutines of this process spinning now, and
	// maxSpinners caps them: each spinner holds a CPU, and the server needs one.
	spinners    atomic.Int32
	maxSpinners int32
}

// NewWaiter returns a Waiter that spins for at most spin (with at most
// maxSpinners goroutines spinning at once through it), then blocks in waits
// of at most tick.
func NewWaiter(spin, tick time.Duration, maxSpinners int) *Waiter {
	return &Waiter{spin: spin, tick: tick, maxSpinners: int32(maxSpinners)}
}

// Await returns nil once changed reports true. It returns ctx's error when ctx
// ends first, and the error of alive when that reports the other side gone
// (alive runs after every wait that timed out). Tokens on sem only mean "look
// again", so spurious wake-ups are harmless.
func (w *Waiter) Await(ctx context.Context, sem *posixsem.Semaphore, changed func() bool, alive func() error) error {
	if changed() {
		return nil
	}
	if w.spinUntil(ctx, changed) {
		return nil
	}
	if ctx.Done() != nil {
		// A cancel without a deadline would otherwise wait out the tick: post
		// a token so the blocked wait looks at ctx at once.
		stop := context.AfterFunc(ctx, func() { sem.Post() })
		defer stop()
	}
	deadline, hasDeadline := ctx.Deadline()
	for {
		if changed() {
			return nil
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		timeout := w.tick
		if hasDeadline {
			timeout = min(timeout, time.Until(deadline))
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

// spinUntil polls changed for at most the spin budget and reports whether it
// saw the change. It spins only while fewer than maxSpinners goroutines do.
func (w *Waiter) spinUntil(ctx context.Context, changed func() bool) bool {
	if w.spin <= 0 {
		return false
	}
	defer w.spinners.Add(-1)
	if w.spinners.Add(1) > w.maxSpinners {
		return false
	}
	done := ctx.Done()
	start := time.Now()
	for polls := 1; ; polls++ {
		if changed() {
			return true
		}
		if polls%pollsPerYield == 0 {
			select {
			case <-done:
				return false
			default:
			}
			if time.Since(start) >= w.spin {
				return false
			}
			runtime.Gosched()
		}
	}
}
