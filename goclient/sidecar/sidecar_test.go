package sidecar_test

// These tests run the real Python server (see internal/crosstest) with the
// echo model, which starts in well under a second.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shmserve/shmserve/goclient/internal/crosstest"
	"github.com/shmserve/shmserve/goclient/internal/ring/ringtest"
	"github.com/shmserve/shmserve/goclient/shmclient"
	"github.com/shmserve/shmserve/goclient/sidecar"
)

// restartTimeout bounds a restart: the backoff plus a server start.
const restartTimeout = 30 * time.Second

func echoServer(t *testing.T, name string) sidecar.Config {
	return sidecar.Config{
		Model: "echo", Transport: "shm,unix", Name: name,
		Args:       []string{"--socket", filepath.Join(crosstest.SocketDir(t), "s.sock")},
		MinBackoff: 10 * time.Millisecond,
	}
}

func testCtx(t *testing.T, timeout time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	t.Cleanup(cancel)
	return ctx
}

func dial(t *testing.T, addr string) *shmclient.Client {
	t.Helper()
	client, err := shmclient.Dial(testCtx(t, 10*time.Second), addr, shmclient.WithLogger(slog.New(slog.DiscardHandler)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	return client
}

func mustEcho(t *testing.T, client *shmclient.Client, text string) {
	t.Helper()
	if reply, err := client.Echo(testCtx(t, 10*time.Second), []byte(text)); err != nil || string(reply) != text {
		t.Fatalf("Echo over %s = %q, %v", client.Transport(), reply, err)
	}
}

// processGone says whether pid is no longer running: gone, or a zombie
// that nobody has reaped yet.
func processGone(pid int) bool {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	i := strings.LastIndexByte(string(stat), ')')
	return i >= 0 && i+2 < len(stat) && stat[i+2] == 'Z'
}

func TestStartDialEchoStop(t *testing.T) {
	name := crosstest.UniqueName()
	sc := crosstest.Start(t, echoServer(t, name))
	ready := sc.Ready()
	if ready.PID <= 0 || ready.Ring().Name != name || len(ready.Ring().Generation) != 16 ||
		ready.Transports["unix"].Path == "" || ready.Addr("unix") != "unix://"+ready.Transports["unix"].Path ||
		ready.Model["model"] != "echo" || ready.Addr("shm") != "shm://"+name || ready.Addr("tcp") != "" {
		t.Fatalf("ready %+v", ready)
	}
	for _, transport := range []string{"shm", "unix"} {
		mustEcho(t, dial(t, ready.Addr(transport)), "over "+transport)
	}
	if err := sc.Stop(testCtx(t, crosstest.StopTimeout)); err != nil {
		t.Fatal(err)
	}
	select {
	case <-sc.Done():
	default:
		t.Fatal("Done is open after Stop")
	}
	if sc.Err() != nil || sc.Restarts() != 0 || !processGone(ready.PID) {
		t.Fatalf("after Stop: Err %v, %d restarts, server gone: %v", sc.Err(), sc.Restarts(), processGone(ready.PID))
	}
	crosstest.AssertNoRingObjects(t, name)
	if _, err := os.Stat(ready.Transports["unix"].Path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left behind: %v", err)
	}
}

func TestRestartsAKilledServerAndClientsFollow(t *testing.T) {
	name := crosstest.UniqueName()
	readies := make(chan sidecar.Ready, 4)
	cfg := echoServer(t, name)
	cfg.OnReady = func(r sidecar.Ready) { readies <- r }
	sc := crosstest.Start(t, cfg)
	first := <-readies
	ring, socket := dial(t, first.Addr("shm")), dial(t, first.Addr("unix"))
	mustEcho(t, ring, "before")
	mustEcho(t, socket, "before")

	syscall.Kill(first.PID, syscall.SIGKILL)
	var second sidecar.Ready
	select {
	case second = <-readies:
	case <-time.After(restartTimeout):
		t.Fatalf("no restart %v after SIGKILL", restartTimeout)
	}
	if second.PID == first.PID || second.Ring().Generation == first.Ring().Generation || sc.Restarts() != 1 || sc.Ready().PID != second.PID {
		t.Fatalf("after the restart: first %+v, second %+v, Ready %+v, %d restarts", first, second, sc.Ready(), sc.Restarts())
	}
	// Both clients find the new server by themselves; a call that raced
	// with the switch may fail, typed, and the next one must not.
	deadline := time.Now().Add(5 * time.Second)
	for _, client := range []*shmclient.Client{ring, socket} {
		for {
			reply, err := client.Echo(testCtx(t, 5*time.Second), []byte("after"))
			if err == nil && string(reply) == "after" {
				break
			}
			if !errors.Is(err, shmclient.ErrServerGone) || time.Now().After(deadline) {
				t.Fatalf("Echo over %s after the restart = %q, %v", client.Transport(), reply, err)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

func TestGivesUpPastTheRestartBudget(t *testing.T) {
	name := crosstest.UniqueName()
	readies := make(chan sidecar.Ready, 4)
	cfg := echoServer(t, name)
	cfg.OnReady = func(r sidecar.Ready) { readies <- r }
	cfg.MaxRestartsPerMinute = 1
	sc := crosstest.Start(t, cfg)
	// SIGTERM: a server that stops by itself, not through Stop, has died
	// too as far as the supervisor knows; and it leaves nothing behind.
	syscall.Kill((<-readies).PID, syscall.SIGTERM)
	select {
	case second := <-readies:
		syscall.Kill(second.PID, syscall.SIGTERM)
	case <-time.After(restartTimeout):
		t.Fatalf("no restart %v after SIGTERM", restartTimeout)
	}
	select {
	case <-sc.Done():
	case <-time.After(restartTimeout):
		t.Fatal("still supervising after the second death")
	}
	if err := sc.Err(); !errors.Is(err, sidecar.ErrGaveUp) || sc.Restarts() != 1 {
		t.Fatalf("Err() = %v after %d restarts, want ErrGaveUp after 1", err, sc.Restarts())
	}
}

func TestBadArgumentFailsFastWithTheServersMessage(t *testing.T) {
	name := crosstest.UniqueName()
	cfg, _ := crosstest.Prepare(t, sidecar.Config{Model: "echo", Name: name, Args: []string{"--slots", "zero"}})
	start := time.Now()
	sc, err := sidecar.Start(testCtx(t, crosstest.StartTimeout), cfg)
	if err == nil {
		sc.Stop(context.Background())
		t.Fatal("Start succeeded with --slots zero")
	}
	// Only the interpreter's start-up: argparse fails before any import of
	// the model.
	if elapsed := time.Since(start); elapsed > crosstest.StartTimeout/2 {
		t.Errorf("failed after %v", elapsed)
	}
	if msg := err.Error(); !strings.Contains(msg, "invalid int value: 'zero'") || !strings.Contains(msg, "exit status 2") {
		t.Fatalf("error %q lacks the server's stderr and status", msg)
	}
	crosstest.AssertNoRingObjects(t, name)
}

func TestStartBoundedByContext(t *testing.T) {
	name := crosstest.UniqueName()
	cfg, _ := crosstest.Prepare(t, echoServer(t, name))
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	start := time.Now()
	sc, err := sidecar.Start(ctx, cfg)
	if err == nil {
		sc.Stop(context.Background())
		t.Skip("the server was ready within 50ms; nothing to test")
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Start = %v, want DeadlineExceeded", err)
	}
	if elapsed := time.Since(start); elapsed > 10*time.Second {
		t.Errorf("Start returned %v after its deadline", elapsed)
	}
	crosstest.AssertNoRingObjects(t, name)
}

func TestMissingBinary(t *testing.T) {
	_, err := sidecar.Start(context.Background(), sidecar.Config{Binary: "/nonexistent/shmserve"})
	if err == nil || !strings.Contains(err.Error(), "/nonexistent/shmserve") {
		t.Fatalf("Start = %v", err)
	}
}

// The kernel's parent-death signal follows the thread that forked the
// server. Start from a goroutine locked to its thread, and let that thread
// end: the server must keep running.
func TestServerOutlivesTheThreadThatCalledStart(t *testing.T) {
	name := crosstest.UniqueName()
	cfg, output := crosstest.Prepare(t, echoServer(t, name))
	type started struct {
		sc  *sidecar.Sidecar
		tid int
		err error
	}
	result := make(chan started)
	ctx := testCtx(t, crosstest.StartTimeout)
	onEndingThread(func(tid int) {
		sc, err := sidecar.Start(ctx, cfg)
		result <- started{sc, tid, err}
	})
	r := <-result
	if r.err != nil {
		t.Fatal(r.err)
	}
	crosstest.StopAtEnd(t, r.sc, name, output)
	deadline := time.Now().Add(5 * time.Second)
	for _, err := os.Stat(fmt.Sprintf("/proc/self/task/%d", r.tid)); err == nil; _, err = os.Stat(fmt.Sprintf("/proc/self/task/%d", r.tid)) {
		if time.Now().After(deadline) {
			t.Fatalf("the locked thread %d of %d did not end", r.tid, os.Getpid())
		}
		time.Sleep(5 * time.Millisecond)
	}
	// A SIGTERM would have the server stopping within its 0.5s poll.
	time.Sleep(time.Second)
	mustEcho(t, dial(t, r.sc.Ready().Addr("shm")), "still here")
	if r.sc.Restarts() != 0 {
		t.Fatalf("the server was restarted %d times", r.sc.Restarts())
	}
}

// onEndingThread runs f in a goroutine locked to a thread that ends when f
// returns.
func onEndingThread(f func(tid int)) {
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with this goroutine
		if syscall.Gettid() != syscall.Getpid() {
			f(syscall.Gettid())
			return
		}
		// The runtime never ends the main thread. Holding it while f runs
		// keeps f off it.
		done := make(chan struct{})
		onEndingThread(func(tid int) {
			defer close(done)
			f(tid)
		})
		<-done
		runtime.UnlockOSThread()
	}()
}

// helperEnv names the ring that TestHelperSupervisor serves when the test
// binary runs as the parent process to be killed.
const helperEnv = "SIDECAR_TEST_HELPER_RING"

func TestSIGKILLedParentStopsItsServer(t *testing.T) {
	name, bin := crosstest.UniqueName(), crosstest.Binary(t)
	helper := exec.Command(os.Args[0], "-test.run=^TestHelperSupervisor$", "-test.timeout=2m")
	helper.Env = append(os.Environ(), helperEnv+"="+name, "SHMSERVE_BIN="+bin)
	stderr := &crosstest.SyncBuffer{}
	helper.Stderr = stderr
	stdout, err := helper.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := helper.Start(); err != nil {
		t.Fatal(err)
	}
	defer helper.Process.Kill()
	pids := make(chan int, 1)
	go func() {
		scanner := bufio.NewScanner(stdout)
		for scanner.Scan() {
			var pid int
			if _, err := fmt.Sscanf(scanner.Text(), "server-pid %d", &pid); err == nil {
				pids <- pid
			}
		}
		close(pids)
	}()
	var pid int
	select {
	case pid = <-pids:
	case <-time.After(crosstest.StartTimeout):
	}
	if pid == 0 {
		t.Fatalf("the helper did not start a server; its stderr:\n%s", stderr)
	}
	defer func() {
		if t.Failed() { // neither an orphan nor its objects outlive a failed test
			syscall.Kill(pid, syscall.SIGKILL)
			ringtest.RemoveObjects(name)
		}
	}()

	helper.Process.Kill()
	helper.Wait()
	deadline := time.Now().Add(crosstest.StopTimeout)
	for !processGone(pid) || len(crosstest.RingObjects(name)) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%v after its parent's SIGKILL the server runs: %v, and left %d objects of its ring; helper's stderr:\n%s",
				crosstest.StopTimeout, !processGone(pid), len(crosstest.RingObjects(name)), stderr)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestHelperSupervisor is the parent process of TestSIGKILLedParentStopsItsServer.
func TestHelperSupervisor(t *testing.T) {
	name := os.Getenv(helperEnv)
	if name == "" {
		t.Skip("run by TestSIGKILLedParentStopsItsServer")
	}
	sc, err := sidecar.Start(testCtx(t, crosstest.StartTimeout), sidecar.Config{
		Model: "echo", Transport: "shm", Name: name,
		Logger: slog.New(slog.NewTextHandler(os.Stderr, nil)), Stderr: os.Stderr,
	})
	if err != nil {
		t.Fatal(err)
	}
	fmt.Printf("server-pid %d\n", sc.Ready().PID)
	time.Sleep(time.Minute) // until killed
}
