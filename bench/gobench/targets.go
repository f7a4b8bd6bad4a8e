package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/mem"

	"github.com/shmserve/shmserve/goclient/protocol"
	"github.com/shmserve/shmserve/goclient/shmclient"
)

// Call makes one request and checks its reply.
type Call func(ctx context.Context) error

// Target is one dialed endpoint.
type Target interface {
	// Call returns a Call for cell, with buffers of its own (one per
	// goroutine), and how many units (images, messages) one call carries.
	Call(cell Cell) (Call, int, error)
	Close() error
}

// Dial connects to spec.URL with the client its scheme calls for.
func Dial(ctx context.Context, spec TargetSpec) (Target, error) {
	u, err := url.Parse(spec.URL)
	if err != nil {
		return nil, err
	}
	switch u.Scheme {
	case "shm", "unix", "tcp":
		c, err := shmclient.Dial(ctx, spec.URL,
			shmclient.WithSpin(time.Duration(spec.SpinUS*float64(time.Microsecond))),
			shmclient.WithConns(max(spec.Conns, 1)))
		if err != nil {
			return nil, err
		}
		return ringTarget{c}, nil
	case "http":
		return newHTTPTarget(spec), nil
	case "grpc":
		return newGRPCTarget(u.Host)
	case "zmq", "nng":
		return newMQTarget(u.Scheme, u.Path)
	}
	return nil, fmt.Errorf("unknown scheme %q", u.Scheme)
}

// payload is the echo body of a size: printable ASCII, so that the same
// bytes travel as a JSON string over HTTP without escaping.
func payload(size int) []byte {
	p := make([]byte, size)
	for i := range p {
		p[i] = 'a' + byte(i%26)
	}
	return p
}

// images returns n deterministic pseudo-random planar images.
func images(n int) []byte {
	p := make([]byte, n*protocol.ImageBytes)
	x := uint32(2463534242)
	for i := range p {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		p[i] = byte(x)
	}
	return p
}

func checkEcho(want, got []byte) error {
	if !bytes.Equal(want, got) {
		return fmt.Errorf("echo of %d bytes came back as %d different bytes", len(want), len(got))
	}
	return nil
}

func unsupported(kind string, cell Cell) (Call, int, error) {
	return nil, 0, fmt.Errorf("op %q is not benchmarked over %s", cell.Op, kind)
}

// ringTarget is the shmserve client library over any of its transports.
type ringTarget struct{ c *shmclient.Client }

func (t ringTarget) Call(cell Cell) (Call, int, error) {
	switch cell.Op {
	case "echo":
		p := payload(cell.Size)
		var got []byte // one Call per worker: its reply buffer is reused, as a tuned caller's is
		return func(ctx context.Context) error {
			var err error
			if got, err = t.c.EchoAppend(ctx, got[:0], p); err != nil {
				return err
			}
			return checkEcho(p, got)
		}, 1, nil
	case "classify":
		img := images(1)
		return func(ctx context.Context) error {
			_, err := t.c.Classify(ctx, img)
			return err
		}, 1, nil
	case "classify_batch":
		imgs := make([][]byte, cell.Batch)
		all := images(cell.Batch)
		for i := range imgs {
			imgs[i] = all[i*protocol.ImageBytes : (i+1)*protocol.ImageBytes]
		}
		return func(ctx context.Context) error {
			scores, err := t.c.ClassifyBatch(ctx, imgs)
			if err == nil && len(scores) != cell.Batch {
				err = fmt.Errorf("%d scores for %d images", len(scores), cell.Batch)
			}
			return err
		}, cell.Batch, nil
	case "prompt":
		return func(ctx context.Context) error {
			_, err := t.c.Prompt(ctx, cell.Prompt, cell.MaxNewTokens)
			return err
		}, 1, nil
	}
	return unsupported(t.c.Transport(), cell)
}

func (t ringTarget) Close() error { return t.c.Close() }

// httpTarget speaks the HTTP/JSON mapping (spec section 12) the way a Go
// program would: net/http with a pooled client, encoding/json both ways.
type httpTarget struct {
	base   string
	client *http.Client
}

func newHTTPTarget(spec TargetSpec) *httpTarget {
	conns := max(spec.Conns, 1)
	// A Transport of its own, not DefaultTransport: no proxy from the
	// environment, and an idle pool as large as the concurrency.
	transport := &http.Transport{
		MaxIdleConns:        conns,
		MaxIdleConnsPerHost: conns,
		DisableCompression:  true,
	}
	return &httpTarget{base: strings.TrimSuffix(spec.URL, "/"), client: &http.Client{Transport: transport}}
}

func (t *httpTarget) post(ctx context.Context, path, contentType string, body []byte, reply any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, t.base+path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", contentType)
	resp, err := t.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("POST %s: %s: %s", path, resp.Status, data)
	}
	return json.Unmarshal(data, reply)
}

func (t *httpTarget) Call(cell Cell) (Call, int, error) {
	switch cell.Op {
	case "echo":
		p := payload(cell.Size)
		return func(ctx context.Context) error {
			body, err := json.Marshal(struct {
				Prompt string `json:"prompt"`
			}{string(p)})
			if err != nil {
				return err
			}
			var reply struct {
				EchoPrompt string `json:"echo_prompt"`
			}
			if err := t.post(ctx, "/echo", "application/json", body, &reply); err != nil {
				return err
			}
			return checkEcho(p, []byte(reply.EchoPrompt))
		}, 1, nil
	case "classify":
		img := images(1)
		return func(ctx context.Context) error {
			var reply struct {
				Label string `json:"label"`
			}
			return t.post(ctx, "/classify", "application/octet-stream", img, &reply)
		}, 1, nil
	case "prompt":
		return func(ctx context.Context) error {
			body, err := json.Marshal(struct {
				Prompt        string `json:"prompt"`
				SamplingSteps int    `json:"sampling_steps"`
			}{cell.Prompt, cell.MaxNewTokens})
			if err != nil {
				return err
			}
			var reply struct {
				Response string `json:"response"`
			}
			return t.post(ctx, "/prompt", "application/json", body, &reply)
		}, 1, nil
	}
	return unsupported("http", cell)
}

func (t *httpTarget) Close() error {
	t.client.CloseIdleConnections()
	return nil
}

// grpcTarget calls the bench's raw-bytes echo method (bench/servers/grpc_echo.py).
type grpcTarget struct{ conn *grpc.ClientConn }

// echoMethod is registered by the Python server without codegen.
const echoMethod = "/shmserve.bench.Echo/Echo"

// maxGRPCMessage matches the server's limit (and the stream transports').
const maxGRPCMessage = 16 << 20

// rawCodec passes []byte through untouched: the server has no protobuf
// schema either, so both ends measure gRPC's transport and nothing else.
type rawCodec struct{}

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	return mem.BufferSlice{mem.SliceBuffer(*v.(*[]byte))}, nil
}

func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	*v.(*[]byte) = data.Materialize()
	return nil
}

func (rawCodec) Name() string { return "raw" }

func newGRPCTarget(addr string) (*grpcTarget, error) {
	// One ClientConn multiplexes every in-flight call over HTTP/2, which is
	// how grpc-go is meant to be used.
	conn, err := grpc.NewClient("passthrough:///"+addr,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.ForceCodecV2(rawCodec{}),
			grpc.MaxCallRecvMsgSize(maxGRPCMessage), grpc.MaxCallSendMsgSize(maxGRPCMessage)))
	if err != nil {
		return nil, err
	}
	return &grpcTarget{conn}, nil
}

func (t *grpcTarget) Call(cell Cell) (Call, int, error) {
	if cell.Op != "echo" {
		return unsupported("grpc", cell)
	}
	p := payload(cell.Size)
	return func(ctx context.Context) error {
		var got []byte
		if err := t.conn.Invoke(ctx, echoMethod, &p, &got); err != nil {
			return err
		}
		return checkEcho(p, got)
	}, 1, nil
}

func (t *grpcTarget) Close() error { return t.conn.Close() }
