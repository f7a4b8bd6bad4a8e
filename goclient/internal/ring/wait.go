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
type Waiter struct {
	// spin is the budget for polling before blocking; 0 blocks at once.
	spin time.Duration
	// tick bounds each blocking wait, so liveness is checked at least this often.
	tick time.Duration
	// spinners counts goroutines of this process spinning now, and
	// maxSpinners caps them: each spinner holds a CPU, and the server needs one.
	spinners    atomic.Int32
	maxSpinners int32
	// A spin that ends without the change only burns a CPU the other side
	// may need (a model running, a loaded host): after one, the next
	// spinPause waits block at once. spinPause doubles with every failed
	// spin and resets when one succeeds; skipSpins counts the pause down.
	spinPause atomic.Int32
	skipSpins atomic.Int32
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
	for {
		if changed() {
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
// saw the change. It spins only while fewer than maxSpinners goroutines do,
// and not during a pause after failed spins.
func (w *Waiter) spinUntil(ctx context.Context, changed func() bool) bool {
	if w.spin <= 0 {
		return false
	}
	if w.skipSpins.Load() > 0 && w.skipSpins.Add(-1) >= 0 {
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
			w.spinPause.Store(0)
			return true
		}
		if polls%pollsPerYield == 0 {
			select {
			case <-done:
				return false
			default:
			}
			if time.Since(start) >= w.spin {
				pause := min(2*w.spinPause.Load()+1, maxSpinPause)
				w.spinPause.Store(pause)
				w.skipSpins.Store(pause)
				return false
			}
			runtime.Gosched()
		}
	}
}
