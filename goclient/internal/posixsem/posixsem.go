// Package posixsem wraps the POSIX named semaphores that signal a shmserve
// ring. Each operation the ring needs is one cgo call, since a cgo call costs
// about as much as the semaphore operation itself (~50 ns).
package posixsem

/*
#cgo LDFLAGS: -pthread
// The helpers keep no Go pointer and never call back into Go: saying so lets
// the out-parameters of the per-message calls stay on the Go stack instead
// of costing a heap allocation each.
#cgo noescape shmserve_sem_drain
#cgo nocallback shmserve_sem_drain
#cgo noescape shmserve_sem_getvalue
#cgo nocallback shmserve_sem_getvalue
#cgo nocallback shmserve_sem_post_if_zero
#cgo nocallback shmserve_sem_timed_wait
// sem_clockwait is a GNU extension (glibc 2.30).
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <semaphore.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

static sem_t *shmserve_sem_open(const char *name, int oflag, unsigned int mode, int *err) {
	sem_t *sem = sem_open(name, oflag, mode, 0);
	*err = sem == SEM_FAILED ? errno : 0;
	return sem == SEM_FAILED ? NULL : sem;
}

static int shmserve_sem_post(sem_t *sem) {
	return sem_post(sem) == 0 ? 0 : errno;
}

// Posting only while the count is 0 keeps one pending token at most: a token
// means "look again", so more of them would only cost the waiter wake-ups.
static int shmserve_sem_post_if_zero(sem_t *sem) {
	int value;
	if (sem_getvalue(sem, &value) != 0) return errno;
	if (value == 0 && sem_post(sem) != 0) return errno;
	return 0;
}

// Returns how many tokens it took, at most limit: a count pushed towards
// SEM_VALUE_MAX would otherwise keep one cgo call busy for many seconds, out
// of reach of the caller's deadline.
static int64_t shmserve_sem_drain(sem_t *sem, int64_t limit, int *err) {
	int64_t taken = 0;
	*err = 0;
	while (taken < limit) {
		if (sem_trywait(sem) == 0) { taken++; continue; }
		if (errno == EINTR) continue;
		*err = errno == EAGAIN ? 0 : errno;
		return taken;
	}
	return taken;
}

// Waits for one token for at most timeout_ns on CLOCK_MONOTONIC (immune to
// wall-clock steps). The deadline is absolute, so retrying after EINTR (Go
// preempts threads with SIGURG) does not stretch the wait.
static int shmserve_sem_timed_wait(sem_t *sem, int64_t timeout_ns) {
	struct timespec deadline;
	clock_gettime(CLOCK_MONOTONIC, &deadline);
	deadline.tv_sec += timeout_ns / 1000000000;
	deadline.tv_nsec += timeout_ns % 1000000000;
	if (deadline.tv_nsec >= 1000000000) { deadline.tv_sec++; deadline.tv_nsec -= 1000000000; }
	for (;;) {
		if (sem_clockwait(sem, CLOCK_MONOTONIC, &deadline) == 0) return 0;
		if (errno != EINTR) return errno;
	}
}

static int shmserve_sem_getvalue(sem_t *sem, int *value) {
	return sem_getvalue(sem, value) == 0 ? 0 : errno;
}
*/
import "C"

import (
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"
	"unsafe"
)

// Semaphore is an open named semaphore. Its methods may be called from any
// goroutine until Close.
type Semaphore struct {
	name string
	sem  *C.sem_t
}

// Open opens the existing semaphore name (e.g. "/shmserve.NAME.req").
func Open(name string) (*Semaphore, error) { return open(name, 0, 0) }

// Create creates name with value 0 and mode perm; it fails if name exists.
// Only a server creates semaphores; this client library has one in its tests.
func Create(name string, perm os.FileMode) (*Semaphore, error) {
	return open(name, C.O_CREAT|C.O_EXCL, perm)
}

func open(name string, oflag C.int, perm os.FileMode) (*Semaphore, error) {
	cname := C.CString(name)
	defer C.free(unsafe.Pointer(cname))
	var errno C.int
	sem := C.shmserve_sem_open(cname, oflag, C.uint(perm.Perm()), &errno)
	if sem == nil {
		return nil, &os.PathError{Op: "sem_open", Path: name, Err: syscall.Errno(errno)}
	}
	return &Semaphore{name: name, sem: sem}, nil
}

// Unlink removes name; processes that have it open keep using it.
func Unlink(name string) error {
	cname := C.CString(name)
	defer C.free(unsafe.Pointer(cname))
	if rc, err := C.sem_unlink(cname); rc != 0 {
		return &os.PathError{Op: "sem_unlink", Path: name, Err: err}
	}
	return nil
}

// Post adds one token.
func (s *Semaphore) Post() error {
	return s.result("sem_post", C.shmserve_sem_post(s.sem))
}

// PostIfZero adds a token only when none is pending.
func (s *Semaphore) PostIfZero() error {
	return s.result("sem_post", C.shmserve_sem_post_if_zero(s.sem))
}

// Drain takes pending tokens without blocking, at most limit, and says how
// many it took.
func (s *Semaphore) Drain(limit int) (int, error) {
	var errno C.int
	taken := C.shmserve_sem_drain(s.sem, C.int64_t(limit), &errno)
	return int(taken), s.result("sem_trywait", errno)
}

// Value is the current count (for tests and diagnostics).
func (s *Semaphore) Value() (int, error) {
	var value C.int
	err := s.result("sem_getvalue", C.shmserve_sem_getvalue(s.sem, &value))
	return int(value), err
}

// ErrTimeout is what TimedWait returns when no token came in time.
var ErrTimeout = errors.New("semaphore wait timed out")

// TimedWait takes one token, waiting at most timeout (on the monotonic clock).
func (s *Semaphore) TimedWait(timeout time.Duration) error {
	errno := C.shmserve_sem_timed_wait(s.sem, C.int64_t(max(timeout, 0)))
	if errno == C.ETIMEDOUT {
		return ErrTimeout
	}
	return s.result("sem_clockwait", errno)
}

// Close releases this process's handle; the semaphore itself stays.
func (s *Semaphore) Close() error {
	if rc, err := C.sem_close(s.sem); rc != 0 {
		return fmt.Errorf("sem_close %s: %w", s.name, err)
	}
	return nil
}

func (s *Semaphore) result(op string, errno C.int) error {
	if errno == 0 {
		return nil
	}
	return &os.PathError{Op: op, Path: s.name, Err: syscall.Errno(errno)}
}
