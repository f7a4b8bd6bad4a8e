// Package load runs a closed-loop load: each worker makes one call, waits
// for its reply, and makes the next, so that the calls in flight are exactly
// the workers. A warm-up whose calls are not recorded comes first and the
// measured phase follows without a pause, so that neither side falls asleep
// at the switch.
package load

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/HdrHistogram/hdrhistogram-go"
)

// Latencies are recorded in nanoseconds from 1 ns to a minute at 3
// significant digits.
const (
	histogramMin    = 1
	histogramMax    = int64(time.Minute)
	histogramDigits = 3
)

// Options says how long a run warms up and what ends its measured phase.
// The zero value warms up for nothing and measures nothing.
type Options struct {
	// Timeout bounds each call on its own: a call still running Timeout
	// after it started fails the run (with an error wrapping
	// context.DeadlineExceeded), which cancels it, within Timeout/8 (at most
	// a second) more. One watchdog checks every worker instead of a context
	// deadline per call, whose timer would cost a sub-microsecond call a
	// large share of what is measured. 0 leaves calls bounded by the run's
	// context only.
	Timeout time.Duration

	// The warm-up is WarmupCalls calls, or lasts WarmupDuration; at most one
	// of them is set.
	WarmupCalls    int
	WarmupDuration time.Duration

	// The measured phase is Calls calls, or lasts Duration (at most one of
	// them is set); when it has seen fewer than MinCalls calls by then, it
	// goes on until it has, but for no longer than MaxDuration in all: on a
	// loaded machine one stalled call can outlast a short window.
	Calls       int
	Duration    time.Duration
	MinCalls    int
	MaxDuration time.Duration

	// OnMeasure, if set, is called once as the measured phase starts, before
	// any measured call: the run's end is when Run returns, so the two
	// bracket the measured phase for counters that Run does not keep (CPU
	// time).
	OnMeasure func()
}

// Result is what the measured phase saw.
type Result struct {
	// Latency holds the latency of every measured call that succeeded, in
	// nanoseconds (a call over a minute counts as a minute).
	Latency *hdrhistogram.Histogram
	Calls   int64
	// Elapsed runs from the start of the measured phase until the last
	// worker stopped.
	Elapsed time.Duration
}

// Run makes calls from len(calls) workers, worker i making calls[i] (so that
// each may own its buffers), until the measured phase ends. The first call
// that fails stops every worker, cancelling the calls in flight, and is
// returned with what was measured until then.
func Run(ctx context.Context, calls []func(context.Context) error, options Options) (Result, error) {
	if err := options.check(len(calls)); err != nil {
		return Result{}, err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	r := &run{Options: options, counts: make([]counter, len(calls)), cancel: cancel,
		measuring: make(chan struct{}), failed: make(chan struct{}),
		calling: make([]counter, len(calls)), epoch: time.Now()}
	histograms := make([]*hdrhistogram.Histogram, len(calls))
	for i := range histograms {
		histograms[i] = hdrhistogram.New(histogramMin, histogramMax, histogramDigits)
	}
	if options.WarmupCalls == 0 && options.WarmupDuration == 0 {
		r.startMeasure()
	}
	var wg sync.WaitGroup
	for i, call := range calls {
		wg.Go(func() { r.work(ctx, call, histograms[i], &r.counts[i], &r.calling[i]) })
	}
	watchdog := make(chan struct{})
	go func() {
		defer close(watchdog)
		r.watch(ctx)
	}()
	r.endTimedPhases(ctx)
	wg.Wait()
	cancel()
	<-watchdog

	result := Result{Latency: hdrhistogram.New(histogramMin, histogramMax, histogramDigits)}
	if !r.started.IsZero() {
		result.Elapsed = time.Since(r.started)
	}
	for i, h := range histograms {
		result.Latency.Merge(h)
		result.Calls += r.counts[i].Load()
	}
	return result, r.err
}

func (o Options) check(workers int) error {
	switch {
	case workers < 1:
		return errors.New("load: no workers")
	case o.Timeout < 0 || o.WarmupCalls < 0 || o.WarmupDuration < 0 || o.Calls < 0 || o.Duration < 0 ||
		o.MinCalls < 0 || o.MaxDuration < 0:
		return errors.New("load: negative option")
	case o.WarmupCalls > 0 && o.WarmupDuration > 0:
		return errors.New("load: warm-up by both calls and duration")
	case o.Calls > 0 && o.Duration > 0:
		return errors.New("load: measured phase by both calls and duration")
	case o.MinCalls > 0 && (o.Duration == 0 || o.MaxDuration < o.Duration):
		return errors.New("load: MinCalls needs a Duration and a MaxDuration at least as long")
	}
	return nil
}

const (
	phaseWarmup int32 = iota
	phaseMeasure
	phaseStop
)

type run struct {
	Options
	phase          atomic.Int32
	warmupTickets  atomic.Int64
	measureTickets atomic.Int64
	counts         []counter

	startOnce sync.Once
	started   time.Time     // zero until the measured phase starts
	measuring chan struct{} // closed as the warm-up ends

	errOnce sync.Once
	err     error
	cancel  context.CancelFunc
	failed  chan struct{}

	// calling[i] is when worker i's call in progress started, in ns since
	// epoch plus one (0: between calls), for the watchdog.
	calling []counter
	epoch   time.Time
}

// counter is one worker's number, alone on its cache line so that the
// workers do not slow each other down by writing theirs.
type counter struct {
	atomic.Int64
	_ [56]byte
}

func (r *run) work(ctx context.Context, call func(context.Context) error, histogram *hdrhistogram.Histogram, count, calling *counter) {
	for {
		measured, ok := r.claim()
		if !ok {
			return
		}
		sent := time.Now()
		calling.Store(int64(sent.Sub(r.epoch)) + 1)
		err := call(ctx)
		took := time.Since(sent)
		calling.Store(0)
		if err != nil {
			r.fail(err)
			return
		}
		if measured {
			// Clamped rather than dropped, so that Latency counts every call.
			histogram.RecordValue(min(max(took.Nanoseconds(), histogramMin), histogramMax))
			count.Add(1)
		}
	}
}

// claim decides, before a worker's next call, whether it makes one and
// whether it is measured. Calls are counted out as tickets, so a run by
// count makes exactly that many whatever the number of workers.
func (r *run) claim() (measured, ok bool) {
	switch r.phase.Load() {
	case phaseStop:
		return false, false
	case phaseWarmup:
		if r.WarmupCalls == 0 || r.warmupTickets.Add(1) <= int64(r.WarmupCalls) {
			return false, true
		}
		r.startMeasure()
		if r.phase.Load() == phaseStop {
			return false, false
		}
	}
	if r.Calls > 0 && r.measureTickets.Add(1) > int64(r.Calls) {
		return false, false
	}
	return true, true
}

// startMeasure ends the warm-up; concurrent callers wait until it has, so
// none records a call before OnMeasure has run.
func (r *run) startMeasure() {
	r.startOnce.Do(func() {
		defer close(r.measuring)
		if r.Calls == 0 && r.Duration == 0 {
			r.phase.CompareAndSwap(phaseWarmup, phaseStop)
			return
		}
		if r.OnMeasure != nil {
			r.OnMeasure()
		}
		r.started = time.Now()
		r.phase.CompareAndSwap(phaseWarmup, phaseMeasure)
	})
}

func (r *run) fail(err error) {
	r.errOnce.Do(func() {
		r.err = err
		r.phase.Store(phaseStop)
		r.cancel()
		close(r.failed)
	})
}

// endTimedPhases ends the warm-up and the measured phase that go by time;
// those that go by count end in the workers.
func (r *run) endTimedPhases(ctx context.Context) {
	if r.WarmupDuration > 0 {
		if !r.sleep(ctx, r.WarmupDuration) {
			return
		}
		r.startMeasure()
	}
	if r.Duration == 0 {
		return
	}
	select {
	case <-r.measuring: // a warm-up by count ends in a worker
	case <-r.failed:
		return
	case <-ctx.Done():
		r.fail(context.Cause(ctx))
		return
	}
	if !r.sleep(ctx, r.Duration) {
		return
	}
	deadline := r.started.Add(r.MaxDuration)
	for r.measuredCalls() < int64(r.MinCalls) && time.Now().Before(deadline) {
		if !r.sleep(ctx, time.Millisecond) {
			return
		}
	}
	r.phase.CompareAndSwap(phaseMeasure, phaseStop)
}

// sleep waits for d, or reports false if the run failed or was cancelled
// meanwhile. A cancelled run fails even if its calls ignore their context:
// it did not measure what was asked for.
func (r *run) sleep(ctx context.Context, d time.Duration) bool {
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
		return true
	case <-r.failed:
	case <-ctx.Done():
		r.fail(context.Cause(ctx))
	}
	return false
}

// watch fails the run when a call has run longer than Timeout, until ctx
// ends.
func (r *run) watch(ctx context.Context) {
	if r.Timeout == 0 {
		return
	}
	ticker := time.NewTicker(min(max(r.Timeout/8, time.Millisecond), time.Second))
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
		now := int64(time.Since(r.epoch))
		for i := range r.calling {
			if started := r.calling[i].Load(); started != 0 && now-(started-1) >= int64(r.Timeout) {
				r.fail(fmt.Errorf("load: a call ran past its timeout of %v: %w", r.Timeout,
					context.DeadlineExceeded))
				return
			}
		}
	}
}

func (r *run) measuredCalls() int64 {
	total := int64(0)
	for i := range r.counts {
		total += r.counts[i].Load()
	}
	return total
}
