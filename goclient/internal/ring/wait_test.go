package ring

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/shmserve/shmserve/goclient/internal/posixsem"
)

func testSemaphore(t *testing.T) *posixsem.Semaphore {
	name := fmt.Sprintf("/shmserve.t%d-%d.wait", os.Getpid(), time.Now().UnixNano())
	sem, err := posixsem.Create(name, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		sem.Close()
		posixsem.Unlink(name)
	})
	return sem
}

// errGaveUp ends a test's Await after its first blocking wait, without a
// deadline that could also cut a spin short on a loaded machine.
var errGaveUp = errors.New("gave up")

// awaitCountingPolls runs one Await and says how often it looked at the
// word, which changes at poll changeAfter (never when 0).
func awaitCountingPolls(t *testing.T, w *Waiter, sem *posixsem.Semaphore, changeAfter int) int {
	polls := 0
	changed := func() bool {
		polls++
		return changeAfter > 0 && polls >= changeAfter
	}
	err := w.Await(context.Background(), sem, NewWatch(changed), func() error { return errGaveUp })
	if changeAfter == 0 && !errors.Is(err, errGaveUp) {
		t.Fatalf("Await = %v, want it to give up", err)
	}
	return polls
}

func TestFailedSpinsPauseSpinning(t *testing.T) {
	sem := testSemaphore(t)
	w := NewWaiter(time.Millisecond, time.Millisecond)
	if polls := awaitCountingPolls(t, w, sem, 0); polls < pollsPerYield {
		t.Fatalf("first wait polled %d times; it should have spun", polls)
	}
	// One failed spin pauses spinning for one wait, the next for three.
	for _, pause := range []int{1, 3} {
		for range pause {
			if polls := awaitCountingPolls(t, w, sem, 0); polls >= pollsPerYield {
				t.Fatalf("wait during a pause of %d polled %d times", pause, polls)
			}
		}
		if polls := awaitCountingPolls(t, w, sem, 0); polls < pollsPerYield {
			t.Fatalf("wait after a pause of %d polled %d times; it should have spun", pause, polls)
		}
	}
	// A spin that succeeds ends the pausing.
	for range 7 {
		awaitCountingPolls(t, w, sem, 0)
	}
	awaitCountingPolls(t, w, sem, 1000)
	if polls := awaitCountingPolls(t, w, sem, 2000); polls != 2000 {
		t.Fatalf("wait after a successful spin polled %d times, want to spin until the change", polls)
	}
}

// parkedWaits starts n Awaits on w, the first as the leader, the others
// parked behind it; words[i] set to true ends wait i. Each result arrives
// on the returned channel as its index, or -1 after a blocking wait (the
// semaphore is never posted, so only a failed spin gets there).
func parkedWaits(t *testing.T, w *Waiter, n int) ([]atomic.Bool, <-chan int) {
	t.Helper()
	words := make([]atomic.Bool, n)
	results := make(chan int, n)
	sem := testSemaphore(t)
	start := func(i int) {
		go func() {
			err := w.Await(context.Background(), sem, NewWatch(words[i].Load), func() error { return errGaveUp })
			if err != nil {
				i = -1
			}
			results <- i
		}()
	}
	start(0)
	waitFor(t, "a leader", func() bool { w.mu.Lock(); defer w.mu.Unlock(); return w.leading })
	for i := 1; i < n; i++ {
		start(i)
	}
	waitFor(t, "parked waits", func() bool { return parkedCount(w) == n-1 })
	return words, results
}

func parkedCount(w *Waiter) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.parked)
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no %s within 5 s", what)
		}
	}
}

func TestParkedWaitsAreAnsweredByTheLeader(t *testing.T) {
	w := NewWaiter(time.Minute, time.Minute)
	words, results := parkedWaits(t, w, 8)
	// Parked waits first, in an order unlike their arrival; none of them polls.
	for _, i := range []int{5, 2, 7} {
		words[i].Store(true)
		if got := <-results; got != i {
			t.Fatalf("ended wait %d, want %d (the leader must answer the parked wait whose word changed)", got, i)
		}
	}
	// The leader's own change hands the polling to a parked wait, which
	// answers the rest.
	words[0].Store(true)
	if got := <-results; got != 0 {
		t.Fatalf("ended wait %d, want the leader's (0)", got)
	}
	for _, i := range []int{6, 1, 4, 3} {
		words[i].Store(true)
		if got := <-results; got != i {
			t.Fatalf("after the hand-off ended wait %d, want %d", got, i)
		}
	}
	waitFor(t, "idle waiter", func() bool { w.mu.Lock(); defer w.mu.Unlock(); return !w.leading })
}

func TestParkedWaitsBlockTogetherWhenTheSpinFails(t *testing.T) {
	w := NewWaiter(50*time.Millisecond, time.Millisecond)
	_, results := parkedWaits(t, w, 4)
	for range 4 {
		if got := <-results; got != -1 {
			t.Fatalf("wait %d ended without its word changing", got)
		}
	}
	if pause := w.spinPause.Load(); pause != 1 {
		t.Fatalf("spin pause %d after one failed spin shared by 4 waits, want 1", pause)
	}
}

func TestAParkedWaitEndsWithItsContext(t *testing.T) {
	w := NewWaiter(time.Minute, time.Minute)
	words, results := parkedWaits(t, w, 2)
	ctx, cancel := context.WithCancel(context.Background())
	ended := make(chan error, 1)
	sem := testSemaphore(t)
	var third atomic.Bool
	watch := NewWatch(third.Load)
	go func() { ended <- w.Await(ctx, sem, watch, func() error { return nil }) }()
	waitFor(t, "a third parked wait", func() bool { return parkedCount(w) == 2 })
	cancel()
	select {
	case err := <-ended:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Await = %v, want context.Canceled", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a cancelled parked wait did not return")
	}
	if n := parkedCount(w); n != 1 {
		t.Fatalf("%d waits parked after the cancel, want 1", n)
	}
	// The watch of the cancelled wait serves the next one, which its word ends.
	go func() { ended <- w.Await(context.Background(), sem, watch, func() error { return errGaveUp }) }()
	waitFor(t, "the watch parked again", func() bool { return parkedCount(w) == 2 })
	third.Store(true)
	if err := <-ended; err != nil {
		t.Fatalf("the second wait of a reused watch = %v, want its change", err)
	}
	words[1].Store(true)
	words[0].Store(true)
	for range 2 {
		if got := <-results; got < 0 {
			t.Fatal("a wait blocked although its word changed")
		}
	}
}

func TestSpinStretchesTowardsTheTypicalWaitWhenAlone(t *testing.T) {
	w := NewWaiter(time.Millisecond, time.Millisecond)
	if b := w.budget(0); b != time.Millisecond {
		t.Fatalf("budget with no history = %v, want the spin", b)
	}
	w.observe(1500 * time.Microsecond) // the first sample is the average
	if b := w.budget(0); b != 3*time.Millisecond {
		t.Fatalf("budget after a 1.5 ms wait = %v, want twice that", b)
	}
	if b := w.budget(1); b != time.Millisecond {
		t.Fatalf("budget with a parked wait = %v, want the plain spin", b)
	}
	for range 50 {
		w.observe(time.Hour)
	}
	if b := w.budget(0); b != spinStretch*time.Millisecond {
		t.Fatalf("budget after long waits = %v, want the cap %v", b, spinStretch*time.Millisecond)
	}
	for range 60 {
		w.observe(100 * time.Microsecond)
	}
	if b := w.budget(0); b != time.Millisecond {
		t.Fatalf("budget after 60 fast waits = %v, want the spin again (capped samples fade fast)", b)
	}
}

func TestAWaitALittleLongerThanTheSpinIsCaughtSpinning(t *testing.T) {
	// Wide margins: the change lands 30 ms before the stretched budget ends, so
	// a loaded machine delaying the timer does not fail the test, while the
	// plain spin ends 10 ms before the change.
	const spin, changeAfter = 20 * time.Millisecond, 30 * time.Millisecond
	w := NewWaiter(spin, 20*time.Millisecond)
	w.observe(changeAfter) // waits have been taking this long
	var word atomic.Bool
	time.AfterFunc(changeAfter, func() { word.Store(true) })
	// The semaphore is never posted: only spinning sees the change in time.
	if err := w.Await(context.Background(), testSemaphore(t), NewWatch(word.Load), func() error { return errGaveUp }); err != nil {
		t.Fatalf("Await = %v: the spin did not stretch to the typical wait", err)
	}
}

func TestWaitCounts(t *testing.T) {
	sem := testSemaphore(t)
	var counts WaitCounts
	spinning := NewWaiter(time.Minute, time.Millisecond)
	spinning.counts = &counts
	awaitCountingPolls(t, spinning, sem, 1)    // changed at once
	awaitCountingPolls(t, spinning, sem, 1000) // changed while spinning
	blocking := NewWaiter(0, time.Millisecond)
	blocking.counts = &counts
	awaitCountingPolls(t, blocking, sem, 0) // blocked, then gave up
	sem.Post()
	if polls := awaitCountingPolls(t, blocking, sem, 3); polls != 3 { // woken by the post
		t.Fatalf("the woken wait polled %d times, want 3", polls)
	}
	if spun, blocked := counts.Spun.Load(), counts.Blocked.Load(); spun != 2 || blocked != 2 {
		t.Fatalf("Spun, Blocked = %d, %d; want 2, 2", spun, blocked)
	}
}

func TestAParkedWaitAllocatesNothing(t *testing.T) {
	w := NewWaiter(time.Minute, time.Minute)
	words, results := parkedWaits(t, w, 1) // a leader whose word never changes
	var mine atomic.Bool
	watch := NewWatch(mine.Load)
	sem := testSemaphore(t)
	stop := make(chan struct{})
	defer close(stop)
	go func() { // ends each parked wait, without allocating itself
		for {
			select {
			case <-stop:
				return
			default:
			}
			if parkedCount(w) == 1 {
				mine.Store(true)
			}
			runtime.Gosched()
		}
	}()
	allocs := testing.AllocsPerRun(100, func() {
		mine.Store(false)
		if err := w.Await(context.Background(), sem, watch, func() error { return errGaveUp }); err != nil {
			t.Fatalf("Await = %v", err)
		}
	})
	if allocs != 0 {
		t.Errorf("a parked wait allocated %v times", allocs)
	}
	words[0].Store(true)
	<-results
}
