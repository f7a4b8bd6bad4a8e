package shmclient

// Cross-language tests: this client against the real Python server, started
// as `shmserve serve --model echo --transport shm,uds`. SHMSERVE_BIN names
// the server (the Makefile sets it); without it the tests look for
// ../../.venv/bin/shmserve and skip when that does not exist.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/shmserve/shmserve/goclient/internal/ring"
	"github.com/shmserve/shmserve/goclient/protocol"
)

// serverStartTimeout bounds the wait for the ready line: the echo model
// loads nothing, so this is interpreter start-up on a loaded machine.
const serverStartTimeout = 30 * time.Second

type readyEvent struct {
	Event      string   `json:"event"`
	Name       string   `json:"name"`
	Transports []string `json:"transports"`
	Socket     string   `json:"socket"`
	PID        int      `json:"pid"`
	Generation string   `json:"generation"`
}

type pythonServer struct {
	cmd    *exec.Cmd
	ready  readyEvent
	stderr *syncBuffer
	exited chan struct{}
}

type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func serverBinary(t *testing.T) string {
	t.Helper()
	bin := os.Getenv("SHMSERVE_BIN")
	if bin == "" {
		bin, _ = filepath.Abs(filepath.Join("..", "..", ".venv", "bin", "shmserve"))
	}
	if _, err := os.Stat(bin); err != nil {
		t.Skipf("cross-language test needs the Python server: %v (set SHMSERVE_BIN, or run `make test`)", err)
	}
	return bin
}

// socketDir is short on purpose: a Unix socket path must fit 108 bytes.
func socketDir(t *testing.T) string {
	dir, err := os.MkdirTemp("", "shmc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// startPython runs the echo server for ring name and socket, waits for its
// ready line, and stops it when the test ends, checking that it left
// nothing of name in /dev/shm.
func startPython(t *testing.T, name, socket string, extraArgs ...string) *pythonServer {
	t.Helper()
	args := append([]string{"serve", "--model", "echo", "--transport", "shm,uds", "--name", name, "--socket", socket}, extraArgs...)
	s := &pythonServer{cmd: exec.Command(serverBinary(t), args...), stderr: &syncBuffer{}, exited: make(chan struct{})}
	s.cmd.Stderr = s.stderr
	stdout, err := s.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		s.cmd.Wait()
		close(s.exited)
	}()
	t.Cleanup(func() {
		s.stop(t)
		assertNoRingObjects(t, name)
	})
	lines := make(chan string, 1)
	go func() {
		line, _ := bufio.NewReader(stdout).ReadString('\n')
		lines <- line
		io.Copy(io.Discard, stdout)
	}()
	select {
	case line := <-lines:
		if err := json.Unmarshal([]byte(line), &s.ready); err != nil || s.ready.Event != "ready" || s.ready.Name != name {
			t.Fatalf("server's first line %q (%v), want a ready event for %s; stderr:\n%s", line, err, name, s.stderr)
		}
	case <-s.exited:
		t.Fatalf("server exited before it was ready: %v; stderr:\n%s", s.cmd.ProcessState, s.stderr)
	case <-time.After(serverStartTimeout):
		t.Fatalf("server not ready after %v; stderr:\n%s", serverStartTimeout, s.stderr)
	}
	return s
}

// stop asks the server to stop as an operator would (SIGTERM), and kills it
// if it does not within 10s.
func (s *pythonServer) stop(t *testing.T) {
	select {
	case <-s.exited:
		return
	default:
	}
	// No SIGCONT "just in case" first: a signal pending on the main thread
	// makes Linux hand SIGTERM to another thread, which the server's main
	// thread, blocked in Event.wait(), never notices. Tests thaw what they
	// freeze.
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
	case <-time.After(10 * time.Second):
		t.Errorf("server ignored SIGTERM for 10s; stderr:\n%s", s.stderr)
		s.cmd.Process.Kill()
		<-s.exited
	}
}

// freeze stops the server with SIGSTOP and returns once every one of its
// threads is stopped (signal delivery is asynchronous).
func (s *pythonServer) freeze(t *testing.T) {
	t.Helper()
	s.cmd.Process.Signal(syscall.SIGSTOP)
	deadline := time.Now().Add(5 * time.Second)
	for !allThreadsStopped(s.cmd.Process.Pid) {
		if time.Now().After(deadline) {
			s.cmd.Process.Signal(syscall.SIGCONT)
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

func (s *pythonServer) kill() {
	s.cmd.Process.Kill()
	<-s.exited
}

func assertNoRingObjects(t *testing.T, name string) {
	t.Helper()
	for _, pattern := range []string{"shmserve." + name, "shmserve." + name + ".*", "sem.shmserve." + name + ".*"} {
		if left, _ := filepath.Glob(filepath.Join("/dev/shm", pattern)); len(left) > 0 {
			t.Errorf("the server left objects behind: %v", left)
		}
	}
}

func TestCrossLanguageEchoFrom16Goroutines(t *testing.T) {
	name, socket := uniqueName(), filepath.Join(socketDir(t), "s.sock")
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

func TestCrossLanguageClassicFramingOverUnix(t *testing.T) {
	socket := filepath.Join(socketDir(t), "s.sock")
	startPython(t, uniqueName(), socket)
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
	name := uniqueName()
	startPython(t, name, filepath.Join(socketDir(t), "s.sock"))
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
	name, socket := uniqueName(), filepath.Join(socketDir(t), "s.sock")
	startPython(t, name, socket)
	for _, addr := range []string{"shm://" + name, "unix://" + socket} {
		client := dial(t, addr)
		if _, err := client.Prompt(testCtx(t), "hello", 4); !errors.Is(err, protocol.ErrUnsupported) {
			t.Errorf("%s: Prompt to the echo model = %v, want UNSUPPORTED", addr, err)
		}
		if _, err := client.ClassifyScores(testCtx(t), make([]byte, protocol.ImageBytes)); !errors.Is(err, protocol.ErrUnsupported) {
			t.Errorf("%s: ClassifyScores to the echo model = %v, want UNSUPPORTED", addr, err)
		}
	}
}

func TestCrossLanguageLargeEchoSpansFrames(t *testing.T) {
	name, socket := uniqueName(), filepath.Join(socketDir(t), "s.sock")
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
	name, socket := uniqueName(), filepath.Join(socketDir(t), "s.sock")
	server := startPython(t, name, socket, "--slots", "1")
	for _, addr := range []string{"shm://" + name, "unix://" + socket} {
		client := dial(t, addr, WithConns(1))
		server.freeze(t)
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		start := time.Now()
		_, err := client.Echo(ctx, []byte("frozen"))
		elapsed := time.Since(start)
		cancel()
		server.cmd.Process.Signal(syscall.SIGCONT)
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
	name, dir := uniqueName(), socketDir(t)
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
	socket := filepath.Join(socketDir(t), "s.sock")
	startPython(t, uniqueName(), socket)
	client := dial(t, "shm://"+uniqueName(), WithFallback("unix://"+socket))
	if client.Transport() != "unix" {
		t.Fatalf("Transport() = %q", client.Transport())
	}
	if reply, err := client.Echo(testCtx(t), []byte("via the socket")); err != nil || string(reply) != "via the socket" {
		t.Fatalf("Echo = %q, %v", reply, err)
	}
}
