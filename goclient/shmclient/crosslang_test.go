package shmclient

// Cross-language tests: this client against the real Python server, started
// as `shmserve serve --model echo --transport shm,unix` under the sidecar
// supervisor (see internal/crosstest for where the server comes from).

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/shmserve/shmserve/goclient/internal/crosstest"
	"github.com/shmserve/shmserve/goclient/internal/ring"
	"github.com/shmserve/shmserve/goclient/protocol"
	"github.com/shmserve/shmserve/goclient/sidecar"
)

// pythonServer is one run of the server: the supervisor does not restart
// it, so that a test kills and starts servers itself.
type pythonServer struct {
	*sidecar.Sidecar
}

// startPython runs the echo server for ring name and socket, waits for its
// ready line, and stops it when the test ends, checking that it left
// nothing of name in /dev/shm.
func startPython(t *testing.T, name, socket string, extraArgs ...string) pythonServer {
	t.Helper()
	return startServer(t, "echo", name, append([]string{"--socket", socket}, extraArgs...)...)
}

func startServer(t *testing.T, model, name string, args ...string) pythonServer {
	t.Helper()
	s := pythonServer{crosstest.Start(t, sidecar.Config{
		Model: model, Transport: "shm,unix", Name: name, Args: args, MaxRestartsPerMinute: -1,
	})}
	if got := s.Ready().Ring().Name; got != name {
		t.Fatalf("server ready for ring %q, want %q", got, name)
	}
	return s
}

func (s pythonServer) signal(sig syscall.Signal) { syscall.Kill(s.Ready().PID, sig) }

// stop asks the server to stop as an operator would (SIGTERM), and kills it
// if it does not within crosstest.StopTimeout.
func (s pythonServer) stop(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), crosstest.StopTimeout)
	defer cancel()
	// No SIGCONT "just in case" first: a signal pending on the main thread
	// makes Linux hand SIGTERM to another thread, which the server's main
	// thread, blocked in Event.wait(), never notices. Tests thaw what they
	// freeze.
	if err := s.Stop(ctx); err != nil {
		t.Error(err)
	}
}

// freeze stops the server with SIGSTOP and returns once every one of its
// threads is stopped (signal delivery is asynchronous).
func (s pythonServer) freeze(t *testing.T) {
	t.Helper()
	s.signal(syscall.SIGSTOP)
	deadline := time.Now().Add(5 * time.Second)
	for !allThreadsStopped(s.Ready().PID) {
		if time.Now().After(deadline) {
			s.signal(syscall.SIGCONT)
			t.Fatal("server threads still running 5s after SIGSTOP")
		}
		time.Sleep(time.Millisecond)
	}
}

func allThreadsStopped(pid int) bool {
	stats, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/stat", pid))
	for _, path := range stats {
		stat, err := os.ReadFile(path)
		// The state follows the command name, which is in parentheses.
		if i := bytes.LastIndexByte(stat, ')'); err != nil || i < 0 || i+2 >= len(stat) || stat[i+2] != 'T' {
			return false
		}
	}
	return len(stats) > 0
}

// kill SIGKILLs the server and returns once it is reaped.
func (s pythonServer) kill() {
	s.signal(syscall.SIGKILL)
	<-s.Done()
}

func TestCrossLanguageEchoFrom16Goroutines(t *testing.T) {
	name, socket := crosstest.UniqueName(), filepath.Join(crosstest.SocketDir(t), "s.sock")
	startPython(t, name, socket)
	for _, addr := range []string{"shm://" + name, "unix://" + socket} {
		t.Run(strings.SplitN(addr, ":", 2)[0], func(t *testing.T) {
			client := dial(t, addr)
			var wg sync.WaitGroup
			for g := range 16 {
				wg.Go(func() {
					for i := range 200 {
						// Sizes vary so that a reply mixed up with another
						// goroutine's would show.
						request := bytes.Repeat([]byte(fmt.Sprintf("g%02d/%03d;", g, i)), 1+(g*200+i)%400)
						reply, err := client.Echo(testCtx(t), request)
						if err != nil || !bytes.Equal(reply, request) {
							t.Errorf("goroutine %d request %d: %d bytes back (want %d), %v", g, i, len(reply), len(request), err)
							return
						}
					}
				})
			}
			wg.Wait()
		})
	}
}

// fewestAllocsPerRun is the least of a few testing.AllocsPerRun: that counts
// the whole process's allocations, and goroutines other tests left winding
// down (servers, reapers) allocate now and then.
func fewestAllocsPerRun(f func()) float64 {
	fewest := testing.AllocsPerRun(500, f)
	for range 4 {
		fewest = min(fewest, testing.AllocsPerRun(500, f))
	}
	return fewest
}

// A tuned caller's loop (EchoAppend into the last reply) allocates nothing
// over the ring, at 1 in flight and with waits parked behind the poller.
func TestCrossLanguageEchoAppendOverRingAllocatesNothing(t *testing.T) {
	name := crosstest.UniqueName()
	startPython(t, name, filepath.Join(crosstest.SocketDir(t), "s.sock"))
	client := dial(t, "shm://"+name)
	data := bytes.Repeat([]byte("x"), 3072)
	// Without a Done channel: a wait that ends up blocking (the server
	// starved of CPU by other tests' packages) arms a context.AfterFunc to be
	// woken on cancel, and that allocates.
	ctx := context.Background()
	echo := func(reply []byte) []byte {
		reply, err := client.EchoAppend(ctx, reply[:0], data)
		if err != nil || !bytes.Equal(reply, data) {
			t.Fatalf("EchoAppend = %d bytes, %v", len(reply), err)
		}
		return reply
	}
	var reply []byte
	for range 100 { // the first calls grow reply and set up the ring's waiter
		reply = echo(reply)
	}
	if allocs := fewestAllocsPerRun(func() { reply = echo(reply) }); allocs != 0 {
		t.Errorf("EchoAppend over shm allocated %v times per call", allocs)
	}
	var stop atomic.Bool
	var wg sync.WaitGroup
	defer wg.Wait()
	defer stop.Store(true)
	for range 3 { // keeps the poller busy, so the measured calls park behind it
		wg.Go(func() {
			reply := make([]byte, 0, len(data))
			for !stop.Load() {
				reply, _ = client.EchoAppend(ctx, reply[:0], data)
			}
		})
	}
	if allocs := fewestAllocsPerRun(func() { reply = echo(reply) }); allocs != 0 {
		t.Errorf("EchoAppend over shm with 4 in flight allocated %v times per call", allocs)
	}
}

func TestCrossLanguageClassicFramingOverUnix(t *testing.T) {
	socket := filepath.Join(crosstest.SocketDir(t), "s.sock")
	startPython(t, crosstest.UniqueName(), socket)
	conn, err := net.Dial("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	image := make([]byte, protocol.ImageBytes)
	for i := range image {
		image[i] = byte(i * 7)
	}
	request := append([]byte{0x00, 0x00, 0x0C, 0x01, 0x00}, image...) // built by hand, as the classic client did
	if _, err := conn.Write(request); err != nil {
		t.Fatal(err)
	}
	reply := make([]byte, len(request))
	if _, err := io.ReadFull(conn, reply); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(reply, request) {
		t.Fatalf("echo reply differs: starts % x", reply[:8])
	}

	// An unknown type is answered with a typed error, and the connection
	// stays usable.
	conn.Write([]byte{0x00, 0x00, 0x00, 0x03, 0x42, 0x01, 0x02})
	typ, body, err := protocol.ReadPacket(conn, protocol.MaxPacketBody)
	if err != nil || typ != protocol.TypeError {
		t.Fatalf("unknown type: reply type %v, %v", typ, err)
	}
	if decoded, err := protocol.DecodeErrorBody(body); err != nil || decoded.Code != protocol.CodeUnknownType {
		t.Fatalf("unknown type: %v, %v", decoded, err)
	}
	conn.Write([]byte{0x00, 0x00, 0x00, 0x03, 0x00, 'o', 'k'})
	if typ, body, err := protocol.ReadPacket(conn, protocol.MaxPacketBody); err != nil || typ != protocol.TypeEcho || string(body) != "ok" {
		t.Fatalf("echo after an unknown type: %v %q %v", typ, body, err)
	}

	// A zero length is a framing error: answered BAD_LENGTH, then closed.
	conn.Write([]byte{0, 0, 0, 0})
	typ, body, err = protocol.ReadPacket(conn, protocol.MaxPacketBody)
	if decoded, decodeErr := protocol.DecodeErrorBody(body); err != nil || typ != protocol.TypeError || decodeErr != nil || decoded.Code != protocol.CodeBadLength {
		t.Fatalf("length 0: %v %x %v", typ, body, err)
	}
	if _, _, err := protocol.ReadPacket(conn, protocol.MaxPacketBody); !errors.Is(err, io.EOF) {
		t.Fatalf("after a framing error the server should close: %v", err)
	}
}

func TestCrossLanguageUnknownTypeOverRing(t *testing.T) {
	name := crosstest.UniqueName()
	startPython(t, name, filepath.Join(crosstest.SocketDir(t), "s.sock"))
	r, err := ring.Attach(testCtx(t), name, ring.DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	for _, typ := range []protocol.MsgType{0x42, protocol.TypeStreamChunk, protocol.TypeError} {
		var got []ring.Frame
		err := r.Call(testCtx(t), typ, []byte{1, 0}, func(f ring.Frame) error {
			f.Data = bytes.Clone(f.Data)
			got = append(got, f)
			return nil
		})
		if err != nil || len(got) != 1 || got[0].Type != protocol.TypeError || !got[0].Final {
			t.Fatalf("type %v: frames %+v, %v", typ, got, err)
		}
		if decoded, err := protocol.DecodeErrorBody(got[0].Data); err != nil || decoded.Code != protocol.CodeUnknownType {
			t.Fatalf("type %v: %v, %v", typ, decoded, err)
		}
	}
}

func TestCrossLanguageUnsupportedByEchoModel(t *testing.T) {
	name, socket := crosstest.UniqueName(), filepath.Join(crosstest.SocketDir(t), "s.sock")
	startPython(t, name, socket)
	for _, addr := range []string{"shm://" + name, "unix://" + socket} {
		client := dial(t, addr)
		if _, err := client.Prompt(testCtx(t), "hello", 4); !errors.Is(err, protocol.ErrUnsupported) {
			t.Errorf("%s: Prompt to the echo model = %v, want UNSUPPORTED", addr, err)
		}
		if _, err := client.ClassifyScores(testCtx(t), make([]byte, protocol.ImageBytes)); !errors.Is(err, protocol.ErrUnsupported) {
			t.Errorf("%s: ClassifyScores to the echo model = %v, want UNSUPPORTED", addr, err)
		}
		if _, err := client.Infer(testCtx(t), protocol.NewFloat32([]int{1}, []float32{1})); !errors.Is(err, protocol.ErrUnsupported) {
			t.Errorf("%s: Infer to the echo model = %v, want UNSUPPORTED", addr, err)
		}
		if m, err := client.Metadata(testCtx(t)); err != nil || len(m.Inputs) != 0 || len(m.Outputs) != 0 || m.MaxBatchSize != 0 {
			t.Errorf("%s: Metadata of the echo model = %+v, %v, want no signature", addr, m, err)
		}
	}
}

func TestCrossLanguageLargeEchoSpansFrames(t *testing.T) {
	name, socket := crosstest.UniqueName(), filepath.Join(crosstest.SocketDir(t), "s.sock")
	startPython(t, name, socket, "--slot-reply-bytes", "4096")
	for _, tc := range []struct {
		addr string
		size int
	}{
		{"shm://" + name, 200_000}, // 49 frames of 4096 bytes
		{"unix://" + socket, 4 << 20},
	} {
		request := make([]byte, tc.size)
		for i := range request {
			request[i] = byte(i * 31 >> 3)
		}
		reply, err := dial(t, tc.addr).Echo(testCtx(t), request)
		if err != nil || !bytes.Equal(reply, request) {
			t.Fatalf("%s: %d-byte echo: %d bytes back, %v", tc.addr, tc.size, len(reply), err)
		}
	}
	_, err := dial(t, "shm://"+name).Echo(testCtx(t), make([]byte, 256<<10+1))
	if !errors.Is(err, ErrTooLarge) {
		t.Fatalf("echo over req_capacity = %v, want ErrTooLarge", err)
	}
}

func TestCrossLanguageDeadlineWhileServerIsFrozen(t *testing.T) {
	name, socket := crosstest.UniqueName(), filepath.Join(crosstest.SocketDir(t), "s.sock")
	server := startPython(t, name, socket, "--slots", "1")
	for _, addr := range []string{"shm://" + name, "unix://" + socket} {
		client := dial(t, addr, WithConns(1))
		server.freeze(t)
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		start := time.Now()
		_, err := client.Echo(ctx, []byte("frozen"))
		elapsed := time.Since(start)
		cancel()
		server.signal(syscall.SIGCONT)
		if !errors.Is(err, context.DeadlineExceeded) || elapsed > time.Second {
			t.Fatalf("%s: Echo to a frozen server = %v after %v, want DeadlineExceeded at 50ms", addr, err, elapsed)
		}
		// The ring's only slot comes back once the thawed server answers
		// the cancelled request; the socket's connection was dropped.
		if reply, err := client.Echo(testCtx(t), []byte("thawed")); err != nil || string(reply) != "thawed" {
			t.Fatalf("%s: Echo after thawing = %q, %v", addr, reply, err)
		}
	}
}

func TestCrossLanguageServerRestart(t *testing.T) {
	name, dir := crosstest.UniqueName(), crosstest.SocketDir(t)
	first := startPython(t, name, filepath.Join(dir, "1.sock"))
	client := dial(t, "shm://"+name)
	if _, err := client.Echo(testCtx(t), []byte("first")); err != nil {
		t.Fatal(err)
	}
	first.kill()
	start := time.Now()
	if _, err := client.Echo(testCtx(t), []byte("to the dead")); !errors.Is(err, ErrServerGone) {
		t.Fatalf("Echo to a SIGKILLed server = %v, want ErrServerGone", err)
	}
	if elapsed := time.Since(start); elapsed > time.Second {
		t.Errorf("death noticed after %v", elapsed)
	}
	second := startPython(t, name, filepath.Join(dir, "2.sock"))
	if reply, err := client.Echo(testCtx(t), []byte("second")); err != nil || string(reply) != "second" {
		t.Fatalf("Echo after the restart = %q, %v", reply, err)
	}
	second.stop(t)
	if _, err := client.Echo(testCtx(t), []byte("after a clean stop")); !errors.Is(err, ErrServerGone) {
		t.Fatalf("Echo after SIGTERM = %v, want ErrServerGone", err)
	}
	startPython(t, name, filepath.Join(dir, "3.sock"))
	if reply, err := client.Echo(testCtx(t), []byte("third")); err != nil || string(reply) != "third" || client.Transport() != "shm" {
		t.Fatalf("Echo after a clean restart = %q, %v over %s", reply, err, client.Transport())
	}
}

func TestCrossLanguageFallbackToUnix(t *testing.T) {
	socket := filepath.Join(crosstest.SocketDir(t), "s.sock")
	startPython(t, crosstest.UniqueName(), socket)
	client := dial(t, "shm://"+crosstest.UniqueName(), WithFallback("unix://"+socket))
	if client.Transport() != "unix" {
		t.Fatalf("Transport() = %q", client.Transport())
	}
	if reply, err := client.Echo(testCtx(t), []byte("via the socket")); err != nil || string(reply) != "via the socket" {
		t.Fatalf("Echo = %q, %v", reply, err)
	}
}
