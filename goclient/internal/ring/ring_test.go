package ring_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/shmserve/shmserve/goclient/internal/ring"
	"github.com/shmserve/shmserve/goclient/internal/ring/ringtest"
	"github.com/shmserve/shmserve/goclient/protocol"
)

func uniqueName() string { return fmt.Sprintf("t%d-%08x", os.Getpid(), rand.Uint32()) }

// startServer runs a ringtest server under a fresh name and checks, when the
// test ends, that stopping it left no object of that name in /dev/shm.
func startServer(t *testing.T, opts ringtest.Options) *ringtest.Server {
	t.Helper()
	server, err := ringtest.Start(uniqueName(), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		server.Stop(0)
		ringtest.RemoveObjects(server.Name) // after a Kill, as the next server would
		assertNoObjects(t, server.Name)
	})
	return server
}

func assertNoObjects(t *testing.T, name string) {
	t.Helper()
	for _, pattern := range []string{"shmserve." + name, "shmserve." + name + ".*", "sem.shmserve." + name + ".*"} {
		if left, _ := filepath.Glob("/dev/shm/" + pattern); len(left) > 0 {
			t.Errorf("objects left behind: %v", left)
		}
	}
}

func attach(t *testing.T, name string, cfg ring.Config) *ring.Ring {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	r, err := ring.Attach(ctx, name, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// call collects a whole reply: frames of one message are concatenated, and
// the frame types seen are returned in order.
func call(ctx context.Context, r *ring.Ring, typ protocol.MsgType, body []byte) ([]byte, []protocol.MsgType, error) {
	var reply []byte
	var types []protocol.MsgType
	err := r.Call(ctx, typ, body, func(f ring.Frame) error {
		reply = append(reply, f.Data...)
		types = append(types, f.Type)
		return nil
	})
	return reply, types, err
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestEchoSpinAndBlockOnly(t *testing.T) {
	server := startServer(t, ringtest.Options{Slots: 4})
	for _, spin := range []time.Duration{0, 50 * time.Microsecond} {
		cfg := ring.DefaultConfig()
		cfg.Spin = spin
		r := attach(t, server.Name, cfg)
		for i := range 100 {
			body := []byte(fmt.Sprintf("spin %v request %d", spin, i))
			reply, _, err := call(testCtx(t), r, protocol.TypeEcho, body)
			if err != nil || !bytes.Equal(reply, body) {
				t.Fatalf("echo %q = %q, %v", body, reply, err)
			}
		}
	}
}

func TestConcurrentCallersShareFewSlots(t *testing.T) {
	server := startServer(t, ringtest.Options{Slots: 2})
	r := attach(t, server.Name, ring.DefaultConfig())
	var wg sync.WaitGroup
	for g := range 16 {
		wg.Go(func() {
			for i := range 200 {
				body := []byte(fmt.Sprintf("goroutine %d request %d", g, i))
				reply, _, err := call(testCtx(t), r, protocol.TypeEcho, body)
				if err != nil || !bytes.Equal(reply, body) {
					t.Errorf("echo %q = %q, %v", body, reply, err)
					return
				}
			}
		})
	}
	wg.Wait()
}

func TestMultiFrameReplyIsAckedAndJoined(t *testing.T) {
	server := startServer(t, ringtest.Options{Slots: 1, RespCapacity: 64})
	r := attach(t, server.Name, ring.DefaultConfig())
	body := bytes.Repeat([]byte("0123456789abcdef"), 100) // 25 frames of 64 bytes
	reply, types, err := call(testCtx(t), r, protocol.TypeEcho, body)
	if err != nil || !bytes.Equal(reply, body) {
		t.Fatalf("multi-frame echo: %d bytes back, err %v", len(reply), err)
	}
	if len(types) != 25 {
		t.Fatalf("%d frames, want 25", len(types))
	}
}

func TestTextFramesNeverSplitACodePointAndAnErrorIsOneFrame(t *testing.T) {
	text := strings.Repeat("é€", 40) // 2- and 3-byte code points: 64-byte cuts land inside them
	handler := func(_ context.Context, typ protocol.MsgType, _ []byte) []ringtest.Message {
		if typ == protocol.TypeEcho {
			return []ringtest.Message{{Type: protocol.TypeError, Body: protocol.AppendErrorBody(nil,
				&protocol.Error{Code: protocol.CodeInternal, Message: text})}}
		}
		return []ringtest.Message{{Type: protocol.TypePrompt, Body: []byte(text)}}
	}
	server := startServer(t, ringtest.Options{Slots: 1, RespCapacity: 64, Handler: handler})
	r := attach(t, server.Name, ring.DefaultConfig())
	var frames [][]byte
	prompt := protocol.AppendPromptRequest(nil, protocol.PromptRequest{MaxNewTokens: 1, Prompt: "hi"})
	err := r.Call(testCtx(t), protocol.TypePrompt, prompt, func(f ring.Frame) error {
		frames = append(frames, bytes.Clone(f.Data))
		return nil
	})
	if err != nil || len(frames) < 2 || string(bytes.Join(frames, nil)) != text {
		t.Fatalf("prompt reply in %d frames, err %v", len(frames), err)
	}
	for i, f := range frames {
		if !utf8.Valid(f) {
			t.Errorf("frame %d splits a code point: %q", i, f)
		}
	}
	var errorFrames []ring.Frame
	err = r.Call(testCtx(t), protocol.TypeEcho, []byte("x"), func(f ring.Frame) error {
		errorFrames = append(errorFrames, f)
		return nil
	})
	if err != nil || len(errorFrames) != 1 || !errorFrames[0].Final || errorFrames[0].Type != protocol.TypeError {
		t.Fatalf("error reply: %d frames, err %v", len(errorFrames), err)
	}
}

func TestTheDeadlineHoldsWhileFramesKeepComing(t *testing.T) {
	server := startServer(t, ringtest.Options{Slots: 1, RespCapacity: 64})
	r := attach(t, server.Name, ring.DefaultConfig())
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	frames := 0
	start := time.Now()
	// 100 frames read at 5 ms each: the deadline passes mid-reply, and the
	// call must end there, cancel, and give the slot back.
	err := r.Call(ctx, protocol.TypeEcho, bytes.Repeat([]byte("x"), 100*64), func(ring.Frame) error {
		frames++
		time.Sleep(5 * time.Millisecond)
		return nil
	})
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 200*time.Millisecond {
		t.Fatalf("after %d frames and %v: err %v, want the deadline", frames, time.Since(start), err)
	}
	if _, _, err := call(testCtx(t), r, protocol.TypeEcho, []byte("next")); err != nil {
		t.Fatalf("the slot did not come back after the cancel: %v", err)
	}
}

func TestStreamFrames(t *testing.T) {
	chunks := []string{"one ", "two ", "three"}
	handler := func(_ context.Context, _ protocol.MsgType, _ []byte) []ringtest.Message {
		var out []ringtest.Message
		for _, c := range chunks {
			out = append(out, ringtest.Message{Type: protocol.TypeStreamChunk, Body: []byte(c)})
		}
		return append(out, ringtest.Message{Type: protocol.TypeStreamEnd})
	}
	server := startServer(t, ringtest.Options{Slots: 1, Handler: handler})
	r := attach(t, server.Name, ring.DefaultConfig())
	body := protocol.AppendPromptRequest(nil, protocol.PromptRequest{MaxNewTokens: 3, Prompt: "hi"})
	reply, types, err := call(testCtx(t), r, protocol.TypePromptStream, body)
	want := []protocol.MsgType{protocol.TypeStreamChunk, protocol.TypeStreamChunk, protocol.TypeStreamChunk, protocol.TypeStreamEnd}
	if err != nil || string(reply) != strings.Join(chunks, "") || fmt.Sprint(types) != fmt.Sprint(want) {
		t.Fatalf("stream = %q %v, %v", reply, types, err)
	}
}

// blockUntilCancelled answers only when the client cancels.
func blockUntilCancelled(ctx context.Context, _ protocol.MsgType, _ []byte) []ringtest.Message {
	<-ctx.Done()
	return nil
}

func TestDeadlineCancelsAndReaperReleasesSlot(t *testing.T) {
	server := startServer(t, ringtest.Options{Slots: 1, Handler: blockUntilCancelled})
	r := attach(t, server.Name, ring.DefaultConfig())
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, _, err := call(ctx, r, protocol.TypeEcho, []byte("slow"))
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want DeadlineExceeded", err)
	}
	if elapsed := time.Since(start); elapsed > time.Second {
		t.Fatalf("deadline of 30ms honoured after %v", elapsed)
	}
	// The only slot comes back once the server's CANCELLED frame arrives;
	// the next call must wait for that, then succeed.
	waitFor(t, func() bool { return server.Owner(0) == 0 })
}

func TestCancelWithoutDeadlineWakesBlockedWait(t *testing.T) {
	server := startServer(t, ringtest.Options{Slots: 1, Handler: blockUntilCancelled})
	cfg := ring.DefaultConfig()
	cfg.LivenessInterval = 10 * time.Second
	r := attach(t, server.Name, cfg)
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(5*time.Millisecond, cancel)
	start := time.Now()
	if _, _, err := call(ctx, r, protocol.TypeEcho, []byte("x")); !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want Canceled", err)
	}
	// Far under the 10 s liveness tick: the cancel itself woke the wait.
	if elapsed := time.Since(start); elapsed > 2*time.Second {
		t.Errorf("cancel noticed after %v", elapsed)
	}
}

func TestCallbackErrorMidReplyCancels(t *testing.T) {
	server := startServer(t, ringtest.Options{Slots: 1, RespCapacity: 64})
	r := attach(t, server.Name, ring.DefaultConfig())
	stopHere := errors.New("enough")
	frames := 0
	err := r.Call(testCtx(t), protocol.TypeEcho, make([]byte, 64*50), func(f ring.Frame) error {
		frames++
		return stopHere
	})
	if !errors.Is(err, stopHere) || frames != 1 {
		t.Fatalf("err = %v after %d frames, want the callback's error after 1", err, frames)
	}
	// The reaper acks the rest until the server's FINAL, then the slot is
	// usable again.
	reply, _, err := call(testCtx(t), r, protocol.TypeEcho, []byte("after"))
	if err != nil || string(reply) != "after" {
		t.Fatalf("call after a cancelled one = %q, %v", reply, err)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached in 5s")
		}
		time.Sleep(time.Millisecond)
	}
}

func TestMisroutedFrameIsAnErrorNeverAReply(t *testing.T) {
	tamper := func(_ int, h *ringtest.FrameFields) { h.ReqID++ }
	server := startServer(t, ringtest.Options{Slots: 1, Tamper: tamper})
	r := attach(t, server.Name, ring.DefaultConfig())
	_, _, err := call(testCtx(t), r, protocol.TypeEcho, []byte("mine"))
	var invalid *ring.ValidationError
	if !errors.As(err, &invalid) || invalid.Name != ring.Misrouted || !errors.Is(err, protocol.ErrProtocolViolation) {
		t.Fatalf("err = %v, want a MISROUTED protocol violation", err)
	}
}

func TestCorruptFrameLength(t *testing.T) {
	tamper := func(_ int, h *ringtest.FrameFields) { h.Len = 1 << 20 }
	server := startServer(t, ringtest.Options{Slots: 1, Tamper: tamper})
	r := attach(t, server.Name, ring.DefaultConfig())
	_, _, err := call(testCtx(t), r, protocol.TypeEcho, []byte("x"))
	var invalid *ring.ValidationError
	if !errors.As(err, &invalid) || invalid.Name != ring.CorruptRecord {
		t.Fatalf("err = %v, want CORRUPT_RECORD", err)
	}
}

func TestRequestOverCapacityIsTooLarge(t *testing.T) {
	server := startServer(t, ringtest.Options{Slots: 1, ReqCapacity: 4096})
	r := attach(t, server.Name, ring.DefaultConfig())
	if _, _, err := call(testCtx(t), r, protocol.TypeEcho, make([]byte, 4097)); !errors.Is(err, protocol.ErrTooLarge) {
		t.Fatalf("err = %v, want TOO_LARGE", err)
	}
	if reply, _, err := call(testCtx(t), r, protocol.TypeEcho, make([]byte, 4096)); err != nil || len(reply) != 4096 {
		t.Fatalf("echo of exactly req_capacity: %d bytes, %v", len(reply), err)
	}
}

func TestServerErrorReply(t *testing.T) {
	server := startServer(t, ringtest.Options{Slots: 1})
	r := attach(t, server.Name, ring.DefaultConfig())
	reply, types, err := call(testCtx(t), r, protocol.MsgType(0x42), nil)
	if err != nil || len(types) != 1 || types[0] != protocol.TypeError {
		t.Fatalf("unknown type: %v %v", types, err)
	}
	if protocolErr, err := protocol.DecodeErrorBody(reply); err != nil || protocolErr.Code != protocol.CodeUnknownType {
		t.Fatalf("error body %v, %v", protocolErr, err)
	}
}

func TestKilledServerFailsWaitersPromptly(t *testing.T) {
	server := startServer(t, ringtest.Options{Slots: 2, Handler: blockUntilCancelled})
	r := attach(t, server.Name, ring.DefaultConfig())
	time.AfterFunc(20*time.Millisecond, server.Kill)
	start := time.Now()
	_, _, err := call(testCtx(t), r, protocol.TypeEcho, []byte("x"))
	if !errors.Is(err, ring.ErrServerGone) {
		t.Fatalf("err = %v, want ErrServerGone", err)
	}
	if elapsed := time.Since(start); elapsed > 500*time.Millisecond {
		t.Errorf("death noticed after %v; liveness is checked every 50ms", elapsed)
	}
	if !r.Retired() {
		t.Error("a ring whose server died still takes calls")
	}
	// The objects a killed server leaves behind do not pass for a live ring.
	if _, err := ring.Attach(testCtx(t), server.Name, ring.DefaultConfig()); !errors.Is(err, ring.ErrServerGone) {
		t.Fatalf("attach to a dead server's ring = %v, want ErrServerGone", err)
	}
}

func TestStopAnswersInFlightThenGone(t *testing.T) {
	started, release := make(chan struct{}), make(chan struct{})
	handler := func(_ context.Context, typ protocol.MsgType, body []byte) []ringtest.Message {
		close(started)
		<-release
		return []ringtest.Message{{Type: typ, Body: body}}
	}
	server := startServer(t, ringtest.Options{Slots: 2, Handler: handler})
	r := attach(t, server.Name, ring.DefaultConfig())
	go func() {
		<-started
		go server.Stop(time.Second)
		// Past a liveness tick in STOPPING: the waiter must keep waiting.
		time.Sleep(80 * time.Millisecond)
		close(release)
	}()
	reply, _, err := call(testCtx(t), r, protocol.TypeEcho, []byte("finish me"))
	if err != nil || string(reply) != "finish me" {
		t.Fatalf("in-flight request during a graceful stop = %q, %v", reply, err)
	}
	waitFor(t, func() bool {
		_, _, err := call(testCtx(t), r, protocol.TypeEcho, []byte("late"))
		return errors.Is(err, ring.ErrServerGone)
	})
}

func TestAttachWaitsForReady(t *testing.T) {
	server := startServer(t, ringtest.Options{Slots: 1, HoldStarting: true})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	if _, err := ring.Attach(ctx, server.Name, ring.DefaultConfig()); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("attach to a STARTING ring = %v, want DeadlineExceeded", err)
	}
	time.AfterFunc(20*time.Millisecond, server.MarkReady)
	r := attach(t, server.Name, ring.DefaultConfig())
	if r.Geometry().Generation != server.Generation {
		t.Fatalf("generation %x, want %x", r.Geometry().Generation, server.Generation)
	}
}

func TestAttachMissingRing(t *testing.T) {
	_, err := ring.Attach(testCtx(t), uniqueName(), ring.DefaultConfig())
	if !errors.Is(err, ring.ErrServerGone) {
		t.Fatalf("attach to a missing ring = %v, want ErrServerGone", err)
	}
	if _, err := ring.Attach(testCtx(t), ".hidden", ring.DefaultConfig()); err == nil {
		t.Fatal("attach accepted an invalid name")
	}
}

func TestSlotsHeldByAnotherProcess(t *testing.T) {
	server := startServer(t, ringtest.Options{Slots: 1})
	r := attach(t, server.Name, ring.DefaultConfig())
	const otherPID = 1
	server.SetOwner(0, otherPID)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, _, err := call(ctx, r, protocol.TypeEcho, []byte("x")); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("call with every slot taken = %v, want DeadlineExceeded", err)
	}
	time.AfterFunc(10*time.Millisecond, func() { server.SetOwner(0, 0) })
	if reply, _, err := call(testCtx(t), r, protocol.TypeEcho, []byte("x")); err != nil || string(reply) != "x" {
		t.Fatalf("call once the slot is free = %q, %v", reply, err)
	}
}
