package shmclient

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"

	"github.com/shmserve/shmserve/goclient/internal/ring"
	"github.com/shmserve/shmserve/goclient/protocol"
)

// ringTransport carries requests over the shared-memory ring NAME. It holds
// one attached ring generation at a time and attaches to the next one when
// the server is gone, so a restarted server is picked up without a new Dial.
type ringTransport struct {
	name    string
	config  ring.Config
	logger  *slog.Logger
	current atomic.Pointer[ring.Ring]
	// attachToken serialises attaching, as a lock that a waiting caller can
	// give up on when its ctx ends.
	attachToken chan struct{}
	reqCapacity atomic.Int64
	closed      atomic.Bool
}

func dialRing(ctx context.Context, name string, o options) (*ringTransport, error) {
	t := &ringTransport{name: name, config: o.ring, logger: o.logger, attachToken: make(chan struct{}, 1)}
	if _, err := t.ring(ctx); err != nil {
		return nil, err
	}
	return t, nil
}

func (t *ringTransport) scheme() string { return "shm" }

// ring returns the attached ring, attaching to the server's current
// generation when there is none or the last one was retired.
func (t *ringTransport) ring(ctx context.Context) (*ring.Ring, error) {
	if r := t.current.Load(); r != nil && !r.Retired() {
		return r, nil
	}
	select {
	case t.attachToken <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	defer func() { <-t.attachToken }()
	old := t.current.Load()
	if old != nil && !old.Retired() {
		return old, nil // attached by the caller that held the token before us
	}
	if t.closed.Load() {
		return nil, ErrClosed
	}
	r, err := ring.Attach(ctx, t.name, t.config)
	if err != nil {
		return nil, err
	}
	t.current.Store(r)
	t.reqCapacity.Store(int64(r.Geometry().ReqCapacity))
	if t.closed.Load() { // Close ran while we attached
		r.Close()
		return nil, ErrClosed
	}
	if old != nil {
		t.logger.Info("shmclient: attached to a new server generation", "ring", t.name,
			"old_generation", fmt.Sprintf("%016x", old.Geometry().Generation),
			"generation", fmt.Sprintf("%016x", r.Geometry().Generation))
	}
	return r, nil
}

func (t *ringTransport) maxRequestBody() int { return int(t.reqCapacity.Load()) }

// exchange turns frames into messages: frames of one message are joined
// until FINAL, while every STREAM_CHUNK frame is a message by itself. A call
// that found the ring retired before it sent anything is retried once on the
// server's next generation.
func (t *ringTransport) exchange(ctx context.Context, typ protocol.MsgType, body []byte, onMessage func(protocol.MsgType, []byte) error) error {
	for retried := false; ; retried = true {
		r, err := t.ring(ctx)
		if err != nil {
			return err
		}
		err = r.Call(ctx, typ, body, joinFrames(onMessage))
		if retried || !ring.NotSent(err) || !errors.Is(err, ring.ErrServerGone) {
			return err
		}
	}
}

func joinFrames(onMessage func(protocol.MsgType, []byte) error) func(ring.Frame) error {
	var joined []byte
	var joinedType protocol.MsgType
	partial := false
	return func(f ring.Frame) error {
		switch {
		case partial && f.Type != joinedType:
			return fmt.Errorf("%w: a %v frame inside a %v reply", protocol.ErrProtocolViolation, f.Type, joinedType)
		case f.Type == protocol.TypeStreamChunk:
			return onMessage(f.Type, f.Data)
		case f.Final && !partial:
			return onMessage(f.Type, f.Data) // the common case: one frame, no copy
		}
		joined = append(joined, f.Data...)
		joinedType, partial = f.Type, true
		if f.Final {
			return onMessage(joinedType, joined)
		}
		return nil
	}
}

func (t *ringTransport) close() error {
	t.closed.Store(true)
	if r := t.current.Load(); r != nil {
		return r.Close()
	}
	return nil
}
