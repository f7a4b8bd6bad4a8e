package ring

import (
	"context"
	"errors"
	"fmt"
	"os"
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
	err := w.Await(context.Background(), sem, changed, func() error { return errGaveUp })
	if changeAfter == 0 && !errors.Is(err, errGaveUp) {
		t.Fatalf("Await = %v, want it to give up", err)
	}
	return polls
}

func TestFailedSpinsPauseSpinning(t *testing.T) {
	sem := testSemaphore(t)
	w := NewWaiter(time.Millisecond, time.Millisecond, 1)
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

func TestSpinnersAreCapped(t *testing.T) {
	w := NewWaiter(time.Second, time.Millisecond, 1)
	w.spinners.Add(1) // another goroutine is spinning
	if polls := awaitCountingPolls(t, w, testSemaphore(t), 0); polls >= pollsPerYield {
		t.Fatalf("a second spinner polled %d times past a cap of 1", polls)
	}
}
