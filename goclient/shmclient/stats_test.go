package shmclient

import (
	"context"
	"maps"
	"os/exec"
	"reflect"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/shmserve/shmserve/goclient/internal/crosstest"
	"github.com/shmserve/shmserve/goclient/internal/ring/ringtest"
	"github.com/shmserve/shmserve/goclient/protocol"
)

func TestStatsCountCallsErrorsAndRingWaits(t *testing.T) {
	classifyUnsupported := func(ctx context.Context, typ protocol.MsgType, body []byte) []ringtest.Message {
		if typ == protocol.TypeClassify {
			return []ringtest.Message{{Type: protocol.TypeError, Body: protocol.AppendErrorBody(nil, protocol.ErrUnsupported)}}
		}
		return fakeModel(ctx, typ, body)
	}
	name := crosstest.UniqueName()
	startRing(t, name, ringtest.Options{Slots: 2, Handler: classifyUnsupported})
	client := dial(t, "shm://"+name)
	ctx := testCtx(t)
	client.Echo(ctx, []byte("x"))
	client.PromptStream(ctx, "one two", 4, func(string) error { return nil }) // 3 frames
	client.Classify(ctx, image(0))                                            // the server's UNSUPPORTED
	client.Classify(ctx, []byte("short"))                                     // refused here: BAD_LENGTH
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	client.Echo(cancelled, nil)
	client.Close()
	client.Echo(ctx, nil)

	s := client.Stats()
	wantCalls := map[protocol.MsgType]uint64{protocol.TypeEcho: 3, protocol.TypePromptStream: 1, protocol.TypeClassify: 2}
	if !maps.Equal(s.Calls, wantCalls) {
		t.Errorf("Calls = %v, want %v", s.Calls, wantCalls)
	}
	wantErrors := map[string]uint64{"UNSUPPORTED": 1, "BAD_LENGTH": 1, "CONTEXT_CANCELED": 1, "CLOSED": 1}
	if !maps.Equal(s.Errors, wantErrors) {
		t.Errorf("Errors = %v, want %v", s.Errors, wantErrors)
	}
	// One wait per reply frame: ECHO's, PROMPT_STREAM's three, the ERROR.
	if waits := s.RingSpun + s.RingBlocked; waits != 5 {
		t.Errorf("RingSpun + RingBlocked = %d + %d, want 5 waits", s.RingSpun, s.RingBlocked)
	}
	if s.Transport != "shm" || s.InFlight != 0 || s.Fallbacks != 0 {
		t.Errorf("Transport, InFlight, Fallbacks = %q, %d, %d; want shm, 0, 0", s.Transport, s.InFlight, s.Fallbacks)
	}
}

func TestStatsWhileCalling(t *testing.T) {
	release := make(chan struct{})
	held := func(ctx context.Context, typ protocol.MsgType, body []byte) []ringtest.Message {
		if typ == protocol.TypePrompt {
			<-release
		}
		return fakeModel(ctx, typ, body)
	}
	name := crosstest.UniqueName()
	startRing(t, name, ringtest.Options{Slots: 4, Handler: held})
	client := dial(t, "shm://"+name)
	ctx := testCtx(t)
	var calls sync.WaitGroup
	calls.Go(func() { client.Prompt(ctx, "held", 1) })
	for client.Stats().InFlight != 1 {
		if ctx.Err() != nil {
			t.Fatal("the held call never showed in flight")
		}
		time.Sleep(time.Millisecond)
	}
	for range 4 {
		calls.Go(func() {
			for range 50 {
				client.Echo(ctx, []byte("x"))
			}
		})
	}
	for range 100 { // under -race, snapshots racing the calls
		if n := client.Stats().InFlight; n < 1 || n > 5 {
			t.Fatalf("InFlight = %d with the held call and at most 4 others", n)
		}
	}
	close(release)
	calls.Wait()
	if s := client.Stats(); s.InFlight != 0 || s.Calls[protocol.TypeEcho] != 200 || len(s.Errors) != 0 {
		t.Fatalf("after the calls: InFlight %d, %d ECHO calls, errors %v; want 0, 200, none", s.InFlight, s.Calls[protocol.TypeEcho], s.Errors)
	}
}

// scriptedTransport answers every request itself with err, or with its
// body echoed, so the allocations measured are the Client's own.
type scriptedTransport struct{ err error }

func (s scriptedTransport) exchange(_ context.Context, typ protocol.MsgType, body []byte, onMessage func(protocol.MsgType, []byte) error) error {
	if s.err != nil {
		return s.err
	}
	return onMessage(typ, body)
}
func (scriptedTransport) maxRequestBody() int { return protocol.MaxPacketBody }
func (scriptedTransport) scheme() string      { return "unix" }
func (scriptedTransport) close() error        { return nil }

func TestCountingAllocatesNothing(t *testing.T) {
	ignore := func(protocol.MsgType, []byte) error { return nil }
	body := []byte("x")
	for _, err := range []error{nil, protocol.ErrInternal, ErrServerGone, context.DeadlineExceeded} {
		client := &Client{transport: scriptedTransport{err: err}}
		if allocs := testing.AllocsPerRun(100, func() {
			client.exchange(context.Background(), protocol.TypeEcho, body, ignore)
		}); allocs != 0 {
			t.Errorf("an exchange ending in %v allocated %v times", err, allocs)
		}
	}
}

func TestEchoAppendAllocatesNothing(t *testing.T) {
	client := &Client{transport: scriptedTransport{}}
	data, reply := []byte("hello"), make([]byte, 0, 16)
	if allocs := testing.AllocsPerRun(100, func() {
		var err error
		if reply, err = client.EchoAppend(context.Background(), reply[:0], data); err != nil || string(reply) != "hello" {
			t.Fatalf("EchoAppend = %q, %v", reply, err)
		}
	}); allocs != 0 {
		t.Errorf("EchoAppend into a large enough buffer allocated %v times", allocs)
	}
}

// Infer's request body is reused from call to call: what a call allocates is
// its reply (which the outputs alias), not a second copy of its inputs.
func TestInferDoesNotAllocateItsRequest(t *testing.T) {
	client := &Client{transport: scriptedTransport{}} // answers with the request's own tensors
	input := protocol.NewFloat32([]int{1, 16384}, make([]float32, 16384))
	input.Name = "y"
	infer := func() {
		if outputs, err := client.Infer(context.Background(), input); err != nil || len(outputs) != 1 {
			t.Fatalf("Infer = %v, %v", outputs, err)
		}
	}
	infer()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	const calls = 50
	for range calls {
		infer()
	}
	runtime.ReadMemStats(&after)
	if perCall := (after.TotalAlloc - before.TotalAlloc) / calls; perCall > uint64(len(input.Data))*3/2 {
		t.Errorf("Infer of a %d-byte tensor allocated %d bytes per call: the request body too", len(input.Data), perCall)
	}
}

func TestInferIntoReusesItsOutputs(t *testing.T) {
	client := &Client{transport: scriptedTransport{}} // answers with the request's own tensors
	named := func(name string, tensor Tensor) Tensor { tensor.Name = name; return tensor }
	small := named("y", protocol.NewFloat32([]int{1, 2}, []float32{1, 2}))
	large := named("y", protocol.NewFloat32([]int{2, 3}, []float32{1, 2, 3, 4, 5, 6}))
	pair := []Tensor{named("ids", protocol.NewInt64([]int{3}, []int64{7, 8, 9})), small}
	var out Outputs
	for _, inputs := range [][]Tensor{{small}, {large}, pair, {small}, {large}} {
		if err := client.InferInto(context.Background(), &out, inputs...); err != nil {
			t.Fatalf("InferInto(%v) = %v", inputs, err)
		}
		if !reflect.DeepEqual(out.Tensors, inputs) {
			t.Fatalf("InferInto(%v) gave %v", inputs, out.Tensors)
		}
	}
	if allocs := fewestAllocsPerRun(func() {
		if err := client.InferInto(context.Background(), &out, large); err != nil {
			t.Fatal(err)
		}
	}); allocs != 0 {
		t.Errorf("InferInto of a settled shape allocated %v times", allocs)
	}
	// A copy decodes into itself, never into the Outputs it was copied from.
	copied := out
	if err := client.InferInto(context.Background(), &copied, small); err != nil || !reflect.DeepEqual(copied.Tensors, []Tensor{small}) {
		t.Fatalf("InferInto into a copy = %v, %v", copied.Tensors, err)
	}
	if !reflect.DeepEqual(out.Tensors[0].Shape, []int{2, 3}) {
		t.Fatalf("InferInto into a copy changed the original: %v", out.Tensors)
	}
	if err := client.InferInto(context.Background(), &out); err == nil || len(out.Tensors) != 0 {
		t.Fatalf("InferInto with no inputs = %v, outputs %v; want an error and none", err, out.Tensors)
	}
}

// Programs that do not export to Prometheus must not link it.
func TestShmclientDoesNotImportPrometheus(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go command on PATH")
	}
	out, err := exec.Command(goTool, "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	for dep := range strings.Lines(string(out)) {
		if strings.Contains(dep, "prometheus") {
			t.Errorf("shmclient depends on %s", strings.TrimSpace(dep))
		}
	}
}
