package shmclient

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/shmserve/shmserve/goclient/internal/crosstest"
	"github.com/shmserve/shmserve/goclient/internal/ring/ringtest"
	"github.com/shmserve/shmserve/goclient/protocol"
)

// fakeModel answers like the real server, with made-up results: an image's
// class is its first byte mod 10, a prompt is answered word by word.
func fakeModel(_ context.Context, typ protocol.MsgType, body []byte) []ringtest.Message {
	switch typ {
	case protocol.TypeClassify:
		return []ringtest.Message{{Type: typ, Body: []byte(protocol.Labels[body[0]%10])}}
	case protocol.TypeClassifyScores, protocol.TypeClassifyBatch:
		var records []byte
		for image := range slices.Chunk(body, protocol.ImageBytes) {
			scores := protocol.Scores{Index: int(image[0] % 10)}
			scores.Probabilities[scores.Index] = 1
			records = protocol.AppendScoreRecord(records, scores)
		}
		return []ringtest.Message{{Type: typ, Body: records}}
	case protocol.TypePrompt:
		return []ringtest.Message{{Type: typ, Body: []byte("you said: " + string(body[4:]))}}
	case protocol.TypePromptStream:
		var out []ringtest.Message
		for _, word := range strings.SplitAfter(string(body[4:]), " ") {
			out = append(out, ringtest.Message{Type: protocol.TypeStreamChunk, Body: []byte(word)})
		}
		return append(out, ringtest.Message{Type: protocol.TypeStreamEnd})
	}
	return []ringtest.Message{{Type: typ, Body: body}}
}

func startRing(t *testing.T, name string, opts ringtest.Options) *ringtest.Server {
	t.Helper()
	if opts.Handler == nil {
		opts.Handler = fakeModel
	}
	server, err := ringtest.Start(name, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		server.Stop(0)
		ringtest.RemoveObjects(name)
	})
	return server
}

// startStreamServer serves the packet protocol on a Unix socket with the
// same handlers as the ring server, one goroutine per connection.
func startStreamServer(t *testing.T, handler ringtest.Handler) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "s.sock")
	listener, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	// The acceptor is counted too, so no Add can race with Wait.
	var conns sync.WaitGroup
	t.Cleanup(func() {
		listener.Close()
		conns.Wait()
	})
	conns.Go(func() {
		for {
			conn, err := listener.Accept()
			if err != nil {
				return
			}
			conns.Go(func() {
				defer conn.Close()
				for {
					typ, body, err := protocol.ReadPacket(conn, protocol.MaxPacketBody)
					if err != nil {
						return
					}
					var out []byte
					for _, m := range handler(context.Background(), typ, body) {
						out, _ = protocol.AppendPacket(out, m.Type, m.Body)
					}
					if _, err := conn.Write(out); err != nil {
						return
					}
				}
			})
		}
	})
	return "unix://" + path
}

func dial(t *testing.T, addr string, opts ...Option) *Client {
	t.Helper()
	quiet := WithLogger(slog.New(slog.DiscardHandler))
	client, err := Dial(testCtx(t), addr, append([]Option{quiet}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	return client
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func image(class byte) []byte {
	img := make([]byte, protocol.ImageBytes)
	img[0] = class
	return img
}

// exerciseModel runs every method against a client of fakeModel.
func exerciseModel(t *testing.T, client *Client) {
	ctx := testCtx(t)
	if reply, err := client.Echo(ctx, []byte("hello")); err != nil || string(reply) != "hello" {
		t.Fatalf("Echo = %q, %v", reply, err)
	}
	if reply, err := client.Echo(ctx, nil); err != nil || reply == nil || len(reply) != 0 {
		t.Fatalf("empty Echo = %#v, %v", reply, err)
	}
	buf := make([]byte, 0, 64)
	if reply, err := client.EchoAppend(ctx, append(buf, "keep:"...), []byte("hello")); err != nil ||
		string(reply) != "keep:hello" || &reply[0] != &buf[:1][0] {
		t.Fatalf("EchoAppend = %q, %v (a new array: %v)", reply, err, len(reply) > 0 && &reply[0] != &buf[:1][0])
	}
	if label, err := client.Classify(ctx, image(3)); err != nil || label != "cat" {
		t.Fatalf("Classify = %q, %v", label, err)
	}
	if scores, err := client.ClassifyScores(ctx, image(9)); err != nil || scores.Label() != "truck" || scores.Probabilities[9] != 1 {
		t.Fatalf("ClassifyScores = %+v, %v", scores, err)
	}
	images := make([][]byte, 300) // more than one request may carry
	for i := range images {
		images[i] = image(byte(i))
	}
	batch, err := client.ClassifyBatch(ctx, images)
	if err != nil || len(batch) != len(images) {
		t.Fatalf("ClassifyBatch = %d results, %v", len(batch), err)
	}
	for i, scores := range batch {
		if scores.Index != int(byte(i)%10) {
			t.Fatalf("image %d classified as %d: results out of order", i, scores.Index)
		}
	}
	if text, err := client.Prompt(ctx, "hi there", 8); err != nil || text != "you said: hi there" {
		t.Fatalf("Prompt = %q, %v", text, err)
	}
	var chunks []string
	err = client.PromptStream(ctx, "one two three", 8, func(chunk string) error {
		chunks = append(chunks, chunk)
		return nil
	})
	if err != nil || strings.Join(chunks, "|") != "one |two |three" {
		t.Fatalf("PromptStream = %q, %v", chunks, err)
	}
}

func TestEveryMethodOverRing(t *testing.T) {
	name := crosstest.UniqueName()
	startRing(t, name, ringtest.Options{Slots: 4, ReqCapacity: 64 * protocol.ImageBytes})
	client := dial(t, "shm://"+name)
	if client.Transport() != "shm" {
		t.Fatalf("Transport() = %q", client.Transport())
	}
	exerciseModel(t, client)
}

func TestEveryMethodOverUnixSocket(t *testing.T) {
	client := dial(t, startStreamServer(t, fakeModel), WithConns(2))
	if client.Transport() != "unix" {
		t.Fatalf("Transport() = %q", client.Transport())
	}
	exerciseModel(t, client)
}

func TestMalformedRequestsFailLocally(t *testing.T) {
	client := dial(t, startStreamServer(t, fakeModel))
	ctx := testCtx(t)
	if _, err := client.Classify(ctx, make([]byte, 100)); !errors.Is(err, protocol.ErrBadLength) {
		t.Errorf("short image: %v", err)
	}
	if _, err := client.ClassifyBatch(ctx, nil); !errors.Is(err, protocol.ErrBadLength) {
		t.Errorf("empty batch: %v", err)
	}
	if _, err := client.Prompt(ctx, "", 4); !errors.Is(err, protocol.ErrEmptyPrompt) {
		t.Errorf("empty prompt: %v", err)
	}
	if _, err := client.Prompt(ctx, "hi", 0); !errors.Is(err, protocol.ErrBadArgument) {
		t.Errorf("zero steps: %v", err)
	}
	if _, err := client.Prompt(ctx, "\xff", 4); !errors.Is(err, protocol.ErrInvalidUTF8) {
		t.Errorf("invalid UTF-8: %v", err)
	}
}

func TestServerErrorIsTyped(t *testing.T) {
	unsupported := func(context.Context, protocol.MsgType, []byte) []ringtest.Message {
		return []ringtest.Message{{Type: protocol.TypeError, Body: protocol.AppendErrorBody(nil, &protocol.Error{Code: protocol.CodeUnsupported, Message: "echo model"})}}
	}
	name := crosstest.UniqueName()
	startRing(t, name, ringtest.Options{Slots: 1, Handler: unsupported})
	for _, addr := range []string{"shm://" + name, startStreamServer(t, unsupported)} {
		_, err := dial(t, addr).Classify(testCtx(t), image(0))
		var protocolErr *protocol.Error
		if !errors.As(err, &protocolErr) || protocolErr.Code != protocol.CodeUnsupported || protocolErr.Message != "echo model" {
			t.Errorf("%s: err = %v, want UNSUPPORTED", addr, err)
		}
	}
}

func TestRingRequestTooLarge(t *testing.T) {
	name := crosstest.UniqueName()
	startRing(t, name, ringtest.Options{Slots: 1, ReqCapacity: 4096})
	client := dial(t, "shm://"+name)
	if _, err := client.Echo(testCtx(t), make([]byte, 4097)); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("err = %v, want ErrTooLarge", err)
	}
}

func TestReattachesToNextServerGeneration(t *testing.T) {
	name := crosstest.UniqueName()
	first := startRing(t, name, ringtest.Options{Slots: 2})
	client := dial(t, "shm://"+name)
	if _, err := client.Echo(testCtx(t), []byte("first")); err != nil {
		t.Fatal(err)
	}
	first.Kill()
	if _, err := client.Echo(testCtx(t), []byte("to the dead")); !errors.Is(err, ErrServerGone) {
		t.Fatalf("call to a killed server = %v, want ErrServerGone", err)
	}
	if _, err := client.Echo(testCtx(t), []byte("nobody there")); !errors.Is(err, ErrServerGone) {
		t.Fatalf("call with no server = %v, want ErrServerGone", err)
	}
	second := startRing(t, name, ringtest.Options{Slots: 2})
	if reply, err := client.Echo(testCtx(t), []byte("second")); err != nil || string(reply) != "second" {
		t.Fatalf("call after restart = %q, %v", reply, err)
	}
	// A clean stop and start is noticed before anything is sent.
	second.Stop(0)
	startRing(t, name, ringtest.Options{Slots: 2})
	if reply, err := client.Echo(testCtx(t), []byte("third")); err != nil || string(reply) != "third" {
		t.Fatalf("call after a clean restart = %q, %v", reply, err)
	}
}

func TestFallbackWhenRingMissing(t *testing.T) {
	var logged bytes.Buffer
	logger := slog.New(slog.NewTextHandler(&logged, nil))
	client := dial(t, "shm://"+crosstest.UniqueName(), WithFallback(startStreamServer(t, fakeModel)), WithLogger(logger))
	if client.Transport() != "unix" {
		t.Fatalf("Transport() = %q, want the fallback's", client.Transport())
	}
	if !strings.Contains(logged.String(), "fallback") {
		t.Fatalf("the fallback was not logged: %q", logged.String())
	}
	if reply, err := client.Echo(testCtx(t), []byte("x")); err != nil || string(reply) != "x" {
		t.Fatalf("Echo over the fallback = %q, %v", reply, err)
	}
	if s := client.Stats(); s.Fallbacks != 1 || s.Transport != "unix" {
		t.Fatalf("Stats: %d fallbacks over %q, want Dial's one over unix", s.Fallbacks, s.Transport)
	}
}

func TestDialErrors(t *testing.T) {
	for _, addr := range []string{"shm://" + crosstest.UniqueName(), "unix:///nonexistent/s.sock"} {
		if _, err := Dial(testCtx(t), addr); !errors.Is(err, ErrServerGone) {
			t.Errorf("Dial(%s) = %v, want ErrServerGone", addr, err)
		}
	}
	for _, addr := range []string{"", "shm://", "http://x", "shm://.hidden"} {
		if _, err := Dial(testCtx(t), addr); err == nil || errors.Is(err, ErrServerGone) {
			t.Errorf("Dial(%q) = %v, want an address error", addr, err)
		}
	}
}

func TestStreamCallbackErrorCancels(t *testing.T) {
	name := crosstest.UniqueName()
	startRing(t, name, ringtest.Options{Slots: 1})
	for _, addr := range []string{"shm://" + name, startStreamServer(t, fakeModel)} {
		client := dial(t, addr, WithConns(1))
		enough := errors.New("enough")
		err := client.PromptStream(testCtx(t), "a b c d", 4, func(string) error { return enough })
		if !errors.Is(err, enough) {
			t.Fatalf("%s: err = %v, want the callback's", addr, err)
		}
		// The one slot or connection is usable again.
		if reply, err := client.Echo(testCtx(t), []byte("next")); err != nil || string(reply) != "next" {
			t.Fatalf("%s: call after a cancelled stream = %q, %v", addr, reply, err)
		}
	}
}

func TestDeadlineOverUnixSocket(t *testing.T) {
	stall := func(ctx context.Context, typ protocol.MsgType, body []byte) []ringtest.Message {
		time.Sleep(300 * time.Millisecond)
		return []ringtest.Message{{Type: typ, Body: body}}
	}
	client := dial(t, startStreamServer(t, stall), WithConns(1))
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, err := client.Echo(ctx, []byte("x")); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want DeadlineExceeded", err)
	}
	if elapsed := time.Since(start); elapsed > 200*time.Millisecond {
		t.Fatalf("deadline honoured after %v", elapsed)
	}
	if reply, err := client.Echo(testCtx(t), []byte("y")); err != nil || string(reply) != "y" {
		t.Fatalf("call after a timed-out one = %q, %v (a stale reply must never be read as this one's)", reply, err)
	}
}

func TestIdleConnectionClosedByServerIsRetried(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.sock")
	listener, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer listener.Close()
	go func() {
		// The first connection is closed unused, as an idle timeout would.
		if conn, err := listener.Accept(); err == nil {
			conn.Close()
		}
		conn, err := listener.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		typ, body, _ := protocol.ReadPacket(conn, protocol.MaxPacketBody)
		packet, _ := protocol.AppendPacket(nil, typ, body)
		conn.Write(packet)
		io.Copy(io.Discard, conn)
	}()
	client := dial(t, "unix://"+path, WithConns(1))
	time.Sleep(10 * time.Millisecond) // let the close reach the client
	if reply, err := client.Echo(testCtx(t), []byte("x")); err != nil || string(reply) != "x" {
		t.Fatalf("Echo on a pool whose connection went stale = %q, %v", reply, err)
	}
}

func TestClosedClient(t *testing.T) {
	name := crosstest.UniqueName()
	startRing(t, name, ringtest.Options{Slots: 1})
	client := dial(t, "shm://"+name)
	client.Close()
	if _, err := client.Echo(testCtx(t), []byte("x")); !errors.Is(err, ErrClosed) {
		t.Fatalf("err = %v, want ErrClosed", err)
	}
}

// A socket bound by another user (the path squatted before the server
// started) must not get the request.
func TestUnixSocketOfAnotherUserIsRefused(t *testing.T) {
	addr := startStreamServer(t, fakeModel)
	_, err := Dial(testCtx(t), addr, WithServerUID(os.Geteuid()+1))
	if !errors.Is(err, ErrUntrusted) {
		t.Fatalf("dial a socket served by uid %d expecting uid %d = %v, want ErrUntrusted", os.Geteuid(), os.Geteuid()+1, err)
	}
}

// Every slot claimed by a live process that never sends: the call goes to
// the fallback instead of waiting out its deadline.
func TestCallFallsBackWhenOthersHoldEverySlot(t *testing.T) {
	name := crosstest.UniqueName()
	server := startRing(t, name, ringtest.Options{Slots: 2, Handler: fakeModel})
	var logged bytes.Buffer
	client := dial(t, "shm://"+name, WithFallback(startStreamServer(t, fakeModel)),
		WithLogger(slog.New(slog.NewTextHandler(&logged, nil))))
	server.SetOwner(0, 1)
	server.SetOwner(1, 1)
	defer server.SetOwner(0, 0)
	defer server.SetOwner(1, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if reply, err := client.Echo(ctx, []byte("x")); err != nil || string(reply) != "x" {
		t.Fatalf("Echo with every slot held = %q, %v; want the fallback's reply", reply, err)
	}
	if !strings.Contains(logged.String(), "fallback") {
		t.Fatalf("the fallback was not logged: %q", logged.String())
	}
	if s := client.Stats(); s.Fallbacks != 1 || s.Transport != "shm" || len(s.Errors) != 0 {
		t.Fatalf("Stats: %d fallbacks over %q, errors %v; want one call over the fallback, no error", s.Fallbacks, s.Transport, s.Errors)
	}
	noFallback := dial(t, "shm://"+name, WithClaimPatience(20*time.Millisecond))
	if _, err := noFallback.Echo(ctx, []byte("x")); !errors.Is(err, ErrNoFreeSlot) {
		t.Fatalf("Echo with every slot held and no fallback = %v, want ErrNoFreeSlot", err)
	}
	if errs := noFallback.Stats().Errors; errs["NO_FREE_SLOT"] != 1 || len(errs) != 1 {
		t.Fatalf("Errors = %v, want one NO_FREE_SLOT", errs)
	}
}

// A reply that breaks section 3.1 is a protocol violation, not a result:
// a malformed TensorList, an unnamed output, a signature no server holds.
func TestInferAndMetadataRefuseMalformedReplies(t *testing.T) {
	unnamed, _ := protocol.AppendTensorList(nil, []protocol.Tensor{protocol.NewUint8([]int{1}, []uint8{7})})
	named, _ := protocol.AppendTensorList(nil, []protocol.Tensor{protocol.NewUint8([]int{1}, []uint8{7}).WithName("y")})
	for _, tc := range []struct {
		what            string
		infer, metadata []byte
		inferOK, metaOK bool
	}{
		{"valid", named, []byte(`{"name": "m", "inputs": [{"name": "x", "datatype": "UINT8", "shape": [1]}]}`), true, true},
		{"malformed", named[:len(named)-1], []byte(`{"name": `), false, false},
		{"unnamed output, signature with a bad dtype", unnamed, []byte(`{"inputs": [{"name": "x", "datatype": "FP128", "shape": [1]}]}`), false, false},
	} {
		addr := startStreamServer(t, func(_ context.Context, typ protocol.MsgType, body []byte) []ringtest.Message {
			if typ == protocol.TypeInfer {
				return []ringtest.Message{{Type: typ, Body: tc.infer}}
			}
			return []ringtest.Message{{Type: typ, Body: tc.metadata}}
		})
		client := dial(t, addr)
		outputs, err := client.Infer(testCtx(t), protocol.NewUint8([]int{1}, []uint8{7}))
		if tc.inferOK != (err == nil) || (err != nil && !errors.Is(err, protocol.ErrProtocolViolation)) {
			t.Errorf("%s: Infer = %v, %v", tc.what, outputs, err)
		}
		if err == nil && (len(outputs) != 1 || outputs[0].Name != "y" || !bytes.Equal(outputs[0].Data, []byte{7})) {
			t.Errorf("%s: Infer = %v", tc.what, outputs)
		}
		m, err := client.Metadata(testCtx(t))
		if tc.metaOK != (err == nil) || (err != nil && !errors.Is(err, protocol.ErrProtocolViolation)) {
			t.Errorf("%s: Metadata = %+v, %v", tc.what, m, err)
		}
	}
}
