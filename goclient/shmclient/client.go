// Package shmclient is the Go client of shmserve, the Python sidecar that
// serves ML models. It speaks spec/PROTOCOL.md over the shared-memory ring
// (shm://NAME), a Unix socket (unix:///path) or TCP (tcp://host:port); every
// method honours its context's deadline and cancellation and is safe for
// concurrent use.
//
// Errors: ErrServerGone when the server stopped or died (a ring client
// re-attaches by itself once a new server generation appears), a
// *protocol.Error for an ERROR reply or a request the protocol forbids
// (errors.Is(err, protocol.ErrBadLength) and so on), ErrTooLarge for a
// request over the transport's limit, and the context's error.
package shmclient

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/shmserve/shmserve/goclient/internal/ring"
	"github.com/shmserve/shmserve/goclient/protocol"
)

// Scores is one CLASSIFY_SCORES result: the class index (argmax) and the
// probabilities of the ten CIFAR-10 classes; Label names the class.
type Scores = protocol.Scores

var (
	// ErrServerGone reports that the server stopped, died, or was replaced.
	ErrServerGone = ring.ErrServerGone
	// ErrTooLarge reports a request over the transport's limit (the ring's
	// req_capacity, or 16 MiB per packet); it is protocol.ErrTooLarge, so a
	// server's TOO_LARGE reply matches it too.
	ErrTooLarge = protocol.ErrTooLarge
	// ErrClosed reports a call on a closed Client.
	ErrClosed = errors.New("shmclient: client closed")
	// ErrUntrusted reports a ring or socket that is not the server's: its
	// objects or its peer belong to another user than WithServerUID's.
	ErrUntrusted = ring.ErrUntrusted
	// ErrNoFreeSlot reports a ring call that found every slot held by other
	// processes for its whole wait (see WithClaimPatience); the request was
	// not sent.
	ErrNoFreeSlot = ring.ErrNoFreeSlot
)

// transport carries one request and its replies. Each reply message is
// handed to onMessage, whose body is valid only during the call; a stream
// has several messages, everything else one.
type transport interface {
	exchange(ctx context.Context, typ protocol.MsgType, body []byte, onMessage func(protocol.MsgType, []byte) error) error
	maxRequestBody() int
	scheme() string
	close() error
}

// Client talks to one shmserve server.
type Client struct {
	transport transport
	// fallbackAddr is where a call goes that the ring could not send (no free
	// slot); "" when there is none, or Dial already fell back.
	fallbackAddr string
	options      options
	fallbackMu   sync.Mutex
	fallback     transport
	closed       atomic.Bool
	counters     counters
}

// Dial connects to addr: shm://NAME, unix:///path/to.sock or
// tcp://host:port. For a ring it waits, bounded by ctx, until the server is
// READY. With WithFallback, a primary address that cannot be reached is
// logged and the fallback used instead.
func Dial(ctx context.Context, addr string, opts ...Option) (*Client, error) {
	c := &Client{options: defaultOptions()}
	o := &c.options
	for _, opt := range opts {
		opt(o)
	}
	if o.fallback != "" && !o.claimPatienceSet {
		o.ring.ClaimPatience = defaultFallbackPatience
	}
	o.ring.Waits = &c.counters.waits
	t, err := dialTransport(ctx, addr, *o)
	if err != nil && o.fallback != "" && ctx.Err() == nil {
		o.logger.Warn("shmclient: cannot use the primary transport; using the fallback",
			"addr", addr, "fallback", o.fallback, "err", err)
		var fallbackErr error
		if t, fallbackErr = dialTransport(ctx, o.fallback, *o); fallbackErr != nil {
			return nil, fmt.Errorf("shmclient: dial %s: %w; fallback %s: %w", addr, err, o.fallback, fallbackErr)
		}
		c.counters.fallbacks.Add(1)
		err = nil
	}
	if err != nil {
		return nil, fmt.Errorf("shmclient: dial %s: %w", addr, err)
	}
	c.transport = t
	if t.scheme() == "shm" {
		c.fallbackAddr = o.fallback
	}
	return c, nil
}

func dialTransport(ctx context.Context, addr string, o options) (transport, error) {
	scheme, rest, ok := strings.Cut(addr, "://")
	if !ok || rest == "" {
		return nil, fmt.Errorf("address %q is not shm://NAME, unix:///path or tcp://host:port", addr)
	}
	switch scheme {
	case "shm":
		return dialRing(ctx, rest, o)
	case "unix", "tcp":
		return dialStream(ctx, scheme, rest, o)
	}
	return nil, fmt.Errorf("address %q: unknown scheme %q (want shm, unix or tcp)", addr, scheme)
}

// DefaultSocketPath is the Unix socket a server of ring NAME listens on when
// started without --socket, for this process's user: unix:// plus it is the
// usual fallback of shm://NAME.
func DefaultSocketPath(name string) string { return ring.DefaultSocketPath(name) }

// Transport names the transport in use: "shm", "unix" or "tcp". After a
// fallback it names the fallback's.
func (c *Client) Transport() string { return c.transport.scheme() }

// Close releases the client's connections or ring. Calls in flight finish;
// later calls fail with ErrClosed.
func (c *Client) Close() error {
	if c.closed.Swap(true) {
		return nil
	}
	c.fallbackMu.Lock()
	if c.fallback != nil {
		c.fallback.close()
	}
	c.fallbackMu.Unlock()
	return c.transport.close()
}

// fallbackTransport dials the fallback at its first use.
func (c *Client) fallbackTransport(ctx context.Context) (transport, error) {
	c.fallbackMu.Lock()
	defer c.fallbackMu.Unlock()
	if c.fallback == nil {
		t, err := dialTransport(ctx, c.fallbackAddr, c.options)
		if err != nil {
			return nil, err
		}
		c.options.logger.Warn("shmclient: every ring slot is held by other processes; using the fallback",
			"fallback", c.fallbackAddr)
		c.fallback = t
	}
	return c.fallback, nil
}

// Echo sends data and returns the server's byte-identical copy.
func (c *Client) Echo(ctx context.Context, data []byte) ([]byte, error) {
	return c.EchoAppend(ctx, []byte{}, data)
}

// EchoAppend is Echo that appends the copy to dst and returns the extended
// slice, as strconv.AppendInt does: a caller that passes the last reply
// back as dst[:0] allocates nothing per call once it is large enough (but
// for a ring wait that outlasts the spin on a ctx with a Done channel: it
// arms a wake-up for the cancel).
func (c *Client) EchoAppend(ctx context.Context, dst, data []byte) ([]byte, error) {
	a := echoAppenders.Get().(*echoAppender)
	a.dst = dst
	err := c.exchange(ctx, protocol.TypeEcho, data, a.onMessage)
	dst = a.dst
	a.dst = nil // the pool must not keep the caller's buffer alive
	echoAppenders.Put(a)
	return dst, err
}

// echoAppender is EchoAppend's reply handler. A closure capturing dst would
// escape through the transport interface and cost three allocations per
// call; pooled handlers, bound once, cost none.
type echoAppender struct {
	dst       []byte
	onMessage func(protocol.MsgType, []byte) error
}

var echoAppenders = sync.Pool{New: func() any {
	a := &echoAppender{}
	a.onMessage = func(replyType protocol.MsgType, reply []byte) error {
		if err := checkReply(protocol.TypeEcho, replyType, reply); err != nil {
			return err
		}
		a.dst = append(a.dst, reply...)
		return nil
	}
	return a
}}

// Classify returns the label of one 3072-byte planar RGB 32x32 image.
func (c *Client) Classify(ctx context.Context, image []byte) (string, error) {
	var label string
	err := c.roundTrip(ctx, protocol.TypeClassify, image, func(body []byte) error {
		label = string(body)
		return nil
	})
	return label, err
}

// ClassifyScores returns the class probabilities of one image.
func (c *Client) ClassifyScores(ctx context.Context, image []byte) (Scores, error) {
	scores, err := c.scoreImages(ctx, protocol.TypeClassifyScores, image, 1)
	if err != nil {
		return Scores{}, err
	}
	return scores[0], nil
}

// ClassifyBatch returns the scores of every image, in order. Batches larger
// than one request may carry (256 images, or what fits the ring's
// req_capacity) are sent as several requests in turn.
func (c *Client) ClassifyBatch(ctx context.Context, images [][]byte) ([]Scores, error) {
	if len(images) == 0 {
		return nil, &protocol.Error{Code: protocol.CodeBadLength, Message: "CLASSIFY_BATCH needs at least one image"}
	}
	for i, image := range images {
		if len(image) != protocol.ImageBytes {
			return nil, &protocol.Error{Code: protocol.CodeBadLength, Message: fmt.Sprintf(
				"image %d has %d bytes, want %d (planar RGB 32x32)", i, len(image), protocol.ImageBytes)}
		}
	}
	perRequest := max(1, min(protocol.MaxBatchImages, c.transport.maxRequestBody()/protocol.ImageBytes))
	all := make([]Scores, 0, len(images))
	body := make([]byte, 0, min(len(images), perRequest)*protocol.ImageBytes)
	for start := 0; start < len(images); start += perRequest {
		batch := images[start:min(start+perRequest, len(images))]
		body = body[:0]
		for _, image := range batch {
			body = append(body, image...)
		}
		scores, err := c.scoreImages(ctx, protocol.TypeClassifyBatch, body, len(batch))
		if err != nil {
			return nil, err
		}
		all = append(all, scores...)
	}
	return all, nil
}

// scoreImages sends one CLASSIFY_SCORES or CLASSIFY_BATCH request and
// checks that the reply holds one ScoreRecord per image.
func (c *Client) scoreImages(ctx context.Context, typ protocol.MsgType, body []byte, images int) ([]Scores, error) {
	var scores []Scores
	err := c.roundTrip(ctx, typ, body, func(reply []byte) error {
		var err error
		if scores, err = protocol.DecodeScoreRecords(reply); err != nil {
			return err
		}
		if len(scores) != images {
			return fmt.Errorf("%w: %d ScoreRecords for %d images", protocol.ErrProtocolViolation, len(scores), images)
		}
		return nil
	})
	return scores, err
}

// Prompt returns the text the model generates for prompt in at most steps
// new tokens.
func (c *Client) Prompt(ctx context.Context, prompt string, steps int) (string, error) {
	body, err := promptBody(prompt, steps)
	if err != nil {
		return "", err
	}
	var text string
	err = c.roundTrip(ctx, protocol.TypePrompt, body, func(reply []byte) error {
		text = string(reply)
		return nil
	})
	return text, err
}

// PromptStream is Prompt with the text delivered as it is generated: onChunk
// gets each piece in order. An error from onChunk cancels the generation and
// is returned.
func (c *Client) PromptStream(ctx context.Context, prompt string, steps int, onChunk func(string) error) error {
	body, err := promptBody(prompt, steps)
	if err != nil {
		return err
	}
	return c.exchange(ctx, protocol.TypePromptStream, body, func(typ protocol.MsgType, reply []byte) error {
		switch typ {
		case protocol.TypeStreamChunk:
			return onChunk(string(reply))
		case protocol.TypeStreamEnd:
			return nil
		case protocol.TypeError:
			return errorReply(reply)
		}
		return fmt.Errorf("%w: a %v reply in a stream", protocol.ErrProtocolViolation, typ)
	})
}

func promptBody(prompt string, steps int) ([]byte, error) {
	if steps < 1 || steps > math.MaxUint32 {
		return nil, &protocol.Error{Code: protocol.CodeBadArgument, Message: fmt.Sprintf("steps %d: want at least 1", steps)}
	}
	return protocol.AppendPromptRequest(nil, protocol.PromptRequest{MaxNewTokens: uint32(steps), Prompt: prompt}), nil
}

// roundTrip sends a request whose answer is one reply of its own type, and
// hands that reply's body to onReply (valid only during the call).
func (c *Client) roundTrip(ctx context.Context, typ protocol.MsgType, body []byte, onReply func([]byte) error) error {
	return c.exchange(ctx, typ, body, func(replyType protocol.MsgType, reply []byte) error {
		if err := checkReply(typ, replyType, reply); err != nil {
			return err
		}
		return onReply(reply)
	})
}

// checkReply returns nil for a reply of the request's own type, and
// otherwise the error the reply stands for.
func checkReply(requestType, replyType protocol.MsgType, reply []byte) error {
	switch replyType {
	case requestType:
		return nil
	case protocol.TypeError:
		return errorReply(reply)
	}
	return fmt.Errorf("%w: a %v reply to a %v request", protocol.ErrProtocolViolation, replyType, requestType)
}

// exchange sends a request and counts it for Stats.
func (c *Client) exchange(ctx context.Context, typ protocol.MsgType, body []byte, onMessage func(protocol.MsgType, []byte) error) error {
	c.counters.calls[typ].Add(1)
	c.counters.inFlight.Add(1)
	defer c.counters.inFlight.Add(-1) // even when onMessage panics
	err := c.send(ctx, typ, body, onMessage)
	if err != nil {
		c.counters.countError(err)
	}
	return err
}

// send checks a request as the server would, then sends it.
func (c *Client) send(ctx context.Context, typ protocol.MsgType, body []byte, onMessage func(protocol.MsgType, []byte) error) error {
	if c.closed.Load() {
		return ErrClosed
	}
	if err := protocol.CheckRequest(typ, body); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	err := c.transport.exchange(ctx, typ, body, onMessage)
	if c.fallbackAddr == "" || !errors.Is(err, ErrNoFreeSlot) || !ring.NotSent(err) || ctx.Err() != nil {
		return err
	}
	t, fallbackErr := c.fallbackTransport(ctx)
	if fallbackErr != nil {
		return fmt.Errorf("%w; fallback %s: %w", err, c.fallbackAddr, fallbackErr)
	}
	c.counters.fallbacks.Add(1)
	return t.exchange(ctx, typ, body, onMessage)
}

// errorReply turns an ERROR reply into the error it carries.
func errorReply(body []byte) error {
	decoded, err := protocol.DecodeErrorBody(body)
	if err != nil {
		return err
	}
	return decoded
}

// Tensor is one input or output of INFER: a dtype, a shape and the elements
// in C order. Build one with protocol.NewFloat32, NewInt64, NewBool, NewBF16
// and the other typed constructors, read it with Float32s, Int64s and so on;
// goclient/npy reads and writes them as NumPy .npy files. Name an input to
// bind it by name, or leave every input unnamed to bind them by position.
type Tensor = protocol.Tensor

// Metadata is the served model's signature, as METADATA returns it.
type Metadata = protocol.Metadata

// Infer calls the served model with inputs and returns its outputs in
// signature order, each named, their data owned by the caller. The server
// checks the inputs against the model's signature; a mismatch is a
// *protocol.Error with its code (BAD_INPUT, BAD_DTYPE, BAD_SHAPE), a model
// failure INTERNAL. A tensor that cannot be encoded at all (BAD_TENSOR,
// BAD_DTYPE) fails here without a round trip, and so does a request over
// the transport's limit (ErrTooLarge).
func (c *Client) Infer(ctx context.Context, inputs ...Tensor) ([]Tensor, error) {
	var out Outputs
	if err := c.InferInto(ctx, &out, inputs...); err != nil {
		return nil, err
	}
	return out.Tensors, nil
}

// Outputs is where InferInto puts a reply's tensors. Their Data alias a
// buffer the Outputs owns, and the next InferInto into the same Outputs
// reuses that buffer and the tensors' shapes and names: a goroutine that
// keeps one Outputs allocates nothing per call once its replies' sizes have
// settled.
type Outputs struct {
	// Tensors are the outputs in signature order, each named; valid until
	// the next InferInto into this Outputs.
	Tensors []Tensor
	reply   []byte
	// onMessage decodes a reply into boundTo: bound once, since a closure
	// made per call would escape through the transport interface. A copied
	// Outputs sees that boundTo is not itself, and starts over with storage
	// of its own.
	onMessage func(protocol.MsgType, []byte) error
	boundTo   *Outputs
}

func (out *Outputs) decode(replyType protocol.MsgType, reply []byte) error {
	if err := checkReply(protocol.TypeInfer, replyType, reply); err != nil {
		return err
	}
	out.reply = append(out.reply[:0], reply...) // the copy the tensors alias
	decoded, err := protocol.DecodeTensorListInto(out.Tensors, out.reply)
	if err != nil {
		return fmt.Errorf("%w: INFER reply: %v", protocol.ErrProtocolViolation, err)
	}
	out.Tensors = decoded
	for i, t := range decoded {
		if t.Name == "" {
			return fmt.Errorf("%w: INFER reply: output %d has no name", protocol.ErrProtocolViolation, i)
		}
	}
	return nil
}

// InferInto is Infer that decodes the outputs into out (see Outputs) instead
// of new memory. On an error out.Tensors is empty.
func (c *Client) InferInto(ctx context.Context, out *Outputs, inputs ...Tensor) error {
	if out.boundTo != out { // new, or a copy that must not write into the original's storage
		*out = Outputs{}
		out.onMessage, out.boundTo = out.decode, out
	}
	out.Tensors = out.Tensors[:0]
	if len(inputs) == 0 {
		return &protocol.Error{Code: protocol.CodeBadTensor, Message: fmt.Sprintf("INFER carries 1..%d tensors, not 0", protocol.MaxTensors)}
	}
	pooled, _ := requestBodies.Get().(*[]byte)
	if pooled == nil {
		pooled = new([]byte)
	}
	body, err := protocol.AppendTensorList((*pooled)[:0], inputs)
	defer func() {
		if cap(body) <= maxPooledBody {
			*pooled = body[:0]
			requestBodies.Put(pooled)
		}
	}()
	if err != nil {
		return err
	}
	if err := c.exchange(ctx, protocol.TypeInfer, body, out.onMessage); err != nil {
		out.Tensors = out.Tensors[:0]
		return err
	}
	return nil
}

// requestBodies keeps InferInto's encoded requests between calls: a body lives
// only until its call returns, and one allocated per call, as large as the
// inputs, keeps the garbage collector cycling, whose workers run on idle Ps,
// that is, on the CPU a server on the same machine needs (bench/README.md).
// maxPooledBody keeps a rare huge request from being held between calls.
var requestBodies sync.Pool // of *[]byte

const maxPooledBody = 1 << 20

// Metadata returns the served model's signature. A model without one has
// no inputs and outputs, and answers Infer with UNSUPPORTED.
func (c *Client) Metadata(ctx context.Context) (Metadata, error) {
	var m Metadata
	err := c.roundTrip(ctx, protocol.TypeMetadata, nil, func(reply []byte) error {
		var err error
		m, err = protocol.DecodeMetadata(reply)
		return err
	})
	return m, err
}
