package load

import (
	"context"
	"errors"
	"slices"
	"sync/atomic"
	"testing"
	"time"
)

func workers(n int, call func(context.Context) error) []func(context.Context) error {
	return slices.Repeat([]func(context.Context) error{call}, n)
}

// pause sleeps for d unless ctx ends first, as a real call would.
func pause(ctx context.Context, d time.Duration) error {
	select {
	case <-time.After(d):
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func TestCountsAreExactWhateverTheWorkers(t *testing.T) {
	var made atomic.Int64
	result, err := Run(context.Background(), workers(8, func(context.Context) error {
		made.Add(1)
		return nil
	}), Options{WarmupCalls: 300, Calls: 1000})
	if err != nil {
		t.Fatal(err)
	}
	if made.Load() != 1300 || result.Calls != 1000 || result.Latency.TotalCount() != 1000 {
		t.Fatalf("made %d calls, measured %d, histogram holds %d; want 1300, 1000, 1000",
			made.Load(), result.Calls, result.Latency.TotalCount())
	}
	if result.Elapsed <= 0 {
		t.Fatalf("elapsed %v", result.Elapsed)
	}
}

// Warm-up calls return at once and measured ones sleep, so any warm-up call
// in the histogram would show as its minimum: sleeps only ever run long, so
// this holds however loaded the machine.
func TestWarmupCallsAreNotRecorded(t *testing.T) {
	const sleep = time.Millisecond
	t.Run("by count", func(t *testing.T) {
		var made atomic.Int64
		// One worker, so that the calls come in the order of their tickets.
		result, err := Run(context.Background(), workers(1, func(ctx context.Context) error {
			if made.Add(1) <= 50 {
				return nil
			}
			return pause(ctx, sleep)
		}), Options{WarmupCalls: 50, Calls: 20})
		if err != nil {
			t.Fatal(err)
		}
		if result.Calls != 20 || result.Latency.Min() < int64(sleep)*99/100 {
			t.Fatalf("measured %d calls, fastest %v; want 20 of at least %v", result.Calls, time.Duration(result.Latency.Min()), sleep)
		}
	})
	t.Run("by duration", func(t *testing.T) {
		var measuring atomic.Bool
		var warmupCalls atomic.Int64
		result, err := Run(context.Background(), workers(4, func(ctx context.Context) error {
			if !measuring.Load() {
				warmupCalls.Add(1)
				return nil
			}
			return pause(ctx, sleep)
		}), Options{WarmupDuration: 50 * time.Millisecond, Duration: 20 * time.Millisecond,
			OnMeasure: func() { measuring.Store(true) }})
		if err != nil {
			t.Fatal(err)
		}
		if warmupCalls.Load() == 0 || result.Calls == 0 || result.Latency.Min() < int64(sleep)*99/100 {
			t.Fatalf("%d warm-up calls, measured %d, fastest %v; want some of each, measured ones at least %v",
				warmupCalls.Load(), result.Calls, time.Duration(result.Latency.Min()), sleep)
		}
	})
}

func TestFirstErrorStopsEveryWorkerAndIsReturned(t *testing.T) {
	broken := errors.New("broken reply")
	for _, options := range []Options{
		{Calls: 1 << 40},
		{WarmupCalls: 1 << 40},
		{WarmupDuration: time.Minute, Duration: time.Minute},
		{Duration: time.Minute, MinCalls: 1 << 40, MaxDuration: time.Hour},
	} {
		var made atomic.Int64
		start := time.Now()
		_, err := Run(context.Background(), workers(4, func(ctx context.Context) error {
			switch n := made.Add(1); {
			case n == 100:
				return broken
			case n > 100:
				// The other workers' calls in flight are cancelled, not awaited.
				<-ctx.Done()
				return ctx.Err()
			}
			return nil
		}), options)
		if !errors.Is(err, broken) {
			t.Fatalf("%+v: returned %v, want %v", options, err, broken)
		}
		if took := time.Since(start); took > 20*time.Second {
			t.Fatalf("%+v: took %v to stop", options, took)
		}
		stopped := made.Load()
		time.Sleep(10 * time.Millisecond)
		// At most one call per other worker may have started after the error.
		if made.Load() != stopped || stopped > 100+3 {
			t.Fatalf("%+v: %d calls made by the time Run returned, %d after; want at most 103 and no more after",
				options, stopped, made.Load())
		}
	}
}

func TestTimeoutBoundsEachCall(t *testing.T) {
	t.Run("a blocked call times out", func(t *testing.T) {
		start := time.Now()
		_, err := Run(context.Background(), workers(2, func(ctx context.Context) error {
			if pause(ctx, 10*time.Second) == nil {
				return errors.New("call outlived its timeout")
			}
			return ctx.Err()
		}), Options{Timeout: 20 * time.Millisecond, Calls: 10})
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("returned %v, want %v", err, context.DeadlineExceeded)
		}
		if took := time.Since(start); took > 2*time.Second {
			t.Fatalf("a call past its 20 ms timeout was stopped after %v", took)
		}
	})
	t.Run("a run far longer than it succeeds", func(t *testing.T) {
		const timeout = 100 * time.Millisecond
		start := time.Now()
		result, err := Run(context.Background(), workers(2, func(ctx context.Context) error {
			return pause(ctx, 2*time.Millisecond)
		}), Options{Timeout: timeout, Calls: 200})
		if err != nil || result.Calls != 200 {
			t.Fatalf("measured %d calls: %v", result.Calls, err)
		}
		if took := time.Since(start); took < 2*timeout {
			t.Fatalf("100 calls of 2 ms per worker took %v", took)
		}
	})
	t.Run("none without it", func(t *testing.T) {
		_, err := Run(context.Background(), workers(1, func(ctx context.Context) error {
			if _, ok := ctx.Deadline(); ok {
				return errors.New("deadline without a Timeout")
			}
			return nil
		}), Options{Calls: 10})
		if err != nil {
			t.Fatal(err)
		}
	})
}

func TestDurationStretchesToMinCalls(t *testing.T) {
	const sleep = 2 * time.Millisecond
	call := func(ctx context.Context) error { return pause(ctx, sleep) }
	t.Run("up to the minimum", func(t *testing.T) {
		result, err := Run(context.Background(), workers(1, call),
			Options{Duration: 5 * time.Millisecond, MinCalls: 50, MaxDuration: time.Minute})
		if err != nil {
			t.Fatal(err)
		}
		// 50 calls of at least 2 ms each cannot fit in the 5-ms window.
		if result.Calls < 50 || result.Elapsed < 50*sleep {
			t.Fatalf("measured %d calls in %v; want at least 50 in at least %v", result.Calls, result.Elapsed, 50*sleep)
		}
	})
	t.Run("no longer than MaxDuration", func(t *testing.T) {
		const maxDuration = 100 * time.Millisecond
		result, err := Run(context.Background(), workers(2, call),
			Options{Duration: 5 * time.Millisecond, MinCalls: 1 << 40, MaxDuration: maxDuration})
		if err != nil {
			t.Fatal(err)
		}
		if result.Calls == 0 || result.Elapsed < maxDuration || result.Elapsed > maxDuration+10*time.Second {
			t.Fatalf("measured %d calls in %v; want some in a bit over %v", result.Calls, result.Elapsed, maxDuration)
		}
	})
}

func TestWarmupByCountThenDuration(t *testing.T) {
	var made atomic.Int64
	result, err := Run(context.Background(), workers(2, func(context.Context) error {
		made.Add(1)
		return nil
	}), Options{WarmupCalls: 100, Duration: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if result.Calls == 0 || made.Load() < 100+result.Calls || result.Elapsed < 10*time.Millisecond {
		t.Fatalf("made %d calls, measured %d in %v", made.Load(), result.Calls, result.Elapsed)
	}
}

func TestCancelledRunFails(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	// A call that ignores its context cannot report the cancellation itself.
	_, err := Run(ctx, workers(2, func(context.Context) error { return nil }),
		Options{WarmupDuration: time.Minute, Duration: time.Minute})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("returned %v, want %v", err, context.DeadlineExceeded)
	}
}

func TestOptionsAreChecked(t *testing.T) {
	call := workers(1, func(context.Context) error { return nil })
	for _, bad := range []struct {
		calls   []func(context.Context) error
		options Options
	}{
		{nil, Options{Calls: 1}},
		{call, Options{Calls: -1}},
		{call, Options{WarmupCalls: 1, WarmupDuration: time.Second}},
		{call, Options{Calls: 1, Duration: time.Second}},
		{call, Options{Calls: 1, MinCalls: 1, MaxDuration: time.Second}},
		{call, Options{Duration: time.Second, MinCalls: 1, MaxDuration: time.Millisecond}},
	} {
		if _, err := Run(context.Background(), bad.calls, bad.options); err == nil {
			t.Errorf("%d workers, %+v: no error", len(bad.calls), bad.options)
		}
	}
}
