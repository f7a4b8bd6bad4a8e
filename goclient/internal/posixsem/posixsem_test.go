package posixsem

import (
	"errors"
	"fmt"
	"os"
	"testing"
	"time"
)

func newTestSemaphore(t *testing.T) *Semaphore {
	t.Helper()
	name := fmt.Sprintf("/shmserve.t%d-%d.sem", os.Getpid(), time.Now().UnixNano())
	sem, err := Create(name, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		sem.Close()
		Unlink(name)
	})
	return sem
}

func TestPostIfZeroKeepsOneToken(t *testing.T) {
	sem := newTestSemaphore(t)
	for range 3 {
		if err := sem.PostIfZero(); err != nil {
			t.Fatal(err)
		}
	}
	if value, _ := sem.Value(); value != 1 {
		t.Fatalf("value after three PostIfZero = %d, want 1", value)
	}
}

func TestDrainTakesTokensUpToItsLimit(t *testing.T) {
	sem := newTestSemaphore(t)
	for range 5 {
		sem.Post()
	}
	if taken, err := sem.Drain(3); err != nil || taken != 3 {
		t.Fatalf("Drain(3) of 5 tokens = %d, %v; want 3, nil", taken, err)
	}
	if taken, err := sem.Drain(10); err != nil || taken != 2 {
		t.Fatalf("Drain(10) of 2 tokens = %d, %v; want 2, nil", taken, err)
	}
	if value, _ := sem.Value(); value != 0 {
		t.Fatalf("value after Drain = %d", value)
	}
}

func TestTimedWait(t *testing.T) {
	sem := newTestSemaphore(t)
	start := time.Now()
	if err := sem.TimedWait(20 * time.Millisecond); !errors.Is(err, ErrTimeout) {
		t.Fatalf("TimedWait on an empty semaphore = %v, want ErrTimeout", err)
	}
	if elapsed := time.Since(start); elapsed < 20*time.Millisecond {
		t.Fatalf("TimedWait returned after %v, before its timeout", elapsed)
	}
	go func() {
		time.Sleep(5 * time.Millisecond)
		sem.Post()
	}()
	if err := sem.TimedWait(5 * time.Second); err != nil {
		t.Fatalf("TimedWait with a post = %v", err)
	}
}

func TestOpenMissing(t *testing.T) {
	if _, err := Open("/shmserve.no-such-ring-for-sure.req"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Open of a missing semaphore = %v, want ErrNotExist", err)
	}
}
