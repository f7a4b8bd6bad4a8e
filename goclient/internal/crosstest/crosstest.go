// Package crosstest holds what the tests against the real Python server
// share: finding the server, unique ring names, starting it under the
// sidecar supervisor, and checking that it cleaned up after itself.
//
// SHMSERVE_BIN names the server (the Makefile sets it); without it the tests
// look for the repository's .venv/bin/shmserve and skip when that does not
// exist.
package crosstest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/shmserve/shmserve/goclient/sidecar"
)

// StartTimeout bounds the wait for the ready line: interpreter start-up and,
// for cifar, a model load of about a second, on a loaded machine.
const StartTimeout = 30 * time.Second

// StopTimeout bounds a test's stop: the server's own grace is 2s.
const StopTimeout = 10 * time.Second

// Binary returns the server executable, or skips the test.
func Binary(t testing.TB) string {
	t.Helper()
	bin := os.Getenv("SHMSERVE_BIN")
	if bin == "" {
		root, err := moduleRoot()
		if err != nil {
			t.Skipf("cross-language test needs the Python server: %v", err)
		}
		bin = filepath.Join(root, "..", ".venv", "bin", "shmserve")
	}
	if _, err := os.Stat(bin); err != nil {
		t.Skipf("cross-language test needs the Python server: %v (set SHMSERVE_BIN, or run `make test`)", err)
	}
	return bin
}

// moduleRoot finds goclient/ from the test's working directory, which is
// its package's directory at any depth.
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory")
		}
		dir = parent
	}
}

// UniqueName is a ring name no other test, run or worker uses.
func UniqueName() string { return fmt.Sprintf("t%d-%08x", os.Getpid(), rand.Uint32()) }

// SocketDir is a directory for Unix sockets, short on purpose: a socket
// path must fit 108 bytes, which t.TempDir() may not.
func SocketDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "shmc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// AssertNoRingObjects fails the test if anything of ring name is left in
// /dev/shm.
func AssertNoRingObjects(t testing.TB, name string) {
	t.Helper()
	if left := RingObjects(name); len(left) > 0 {
		t.Errorf("the server left objects behind: %v", left)
	}
}

// RingObjects lists the /dev/shm files of ring name (spec section 6).
func RingObjects(name string) []string {
	var left []string
	for _, pattern := range []string{"shmserve." + name, "shmserve." + name + ".*", "sem.shmserve." + name + ".*"} {
		found, _ := filepath.Glob(filepath.Join("/dev/shm", pattern))
		left = append(left, found...)
	}
	return left
}

// Start runs the server under the supervisor with cfg and stops it when the
// test ends (see Prepare and StopAtEnd).
func Start(t testing.TB, cfg sidecar.Config) *sidecar.Sidecar {
	t.Helper()
	cfg, output := Prepare(t, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), StartTimeout)
	defer cancel()
	sc, err := sidecar.Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	StopAtEnd(t, sc, cfg.Name, output)
	return sc
}

// Prepare fills in cfg.Binary and, where cfg leaves them unset, sends the
// supervisor's log and the server's stderr to one buffer, for StopAtEnd to
// print if the test fails.
func Prepare(t testing.TB, cfg sidecar.Config) (sidecar.Config, *SyncBuffer) {
	t.Helper()
	cfg.Binary = Binary(t)
	output := &SyncBuffer{}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(output, nil))
	}
	if cfg.Stderr == nil {
		cfg.Stderr = output
	}
	return cfg, output
}

// StopAtEnd stops sc when the test ends, failing the test if the stop
// needed SIGKILL or left objects of ring name behind.
func StopAtEnd(t testing.TB, sc *sidecar.Sidecar, name string, output *SyncBuffer) {
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), StopTimeout)
		defer cancel()
		if err := sc.Stop(ctx); err != nil {
			t.Error(err)
		}
		if name != "" {
			AssertNoRingObjects(t, name)
		}
		if t.Failed() {
			t.Logf("supervisor log and server stderr:\n%s", output)
		}
	})
}

// SyncBuffer is a bytes.Buffer safe for concurrent writers.
type SyncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *SyncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *SyncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
