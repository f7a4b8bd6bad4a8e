package shmclient

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/shmserve/shmserve/goclient/protocol"
)

// streamTransport carries requests as stream packets (spec section 5) over a
// pool of Unix or TCP connections, one request at a time on each.
type streamTransport struct {
	network, address string
	// openSlots bounds the connections open at once: a token per connection.
	openSlots chan struct{}
	idle      chan *streamConn
	dialer    net.Dialer
	serverUID int
	closed    atomic.Bool
}

type streamConn struct {
	conn   net.Conn
	reader *bufio.Reader
}

// dialStream opens the first connection at once, so that Dial fails (and
// falls back) when nothing listens at address.
func dialStream(ctx context.Context, network, address string, o options) (*streamTransport, error) {
	t := &streamTransport{
		network:   network,
		address:   address,
		openSlots: make(chan struct{}, o.conns),
		idle:      make(chan *streamConn, o.conns),
		serverUID: o.ring.ServerUID,
	}
	t.openSlots <- struct{}{}
	c, err := t.dial(ctx)
	if err != nil {
		return nil, err
	}
	t.idle <- c
	return t, nil
}

func (t *streamTransport) scheme() string { return t.network }

func (t *streamTransport) maxRequestBody() int { return protocol.MaxPacketBody }

func (t *streamTransport) dial(ctx context.Context) (*streamConn, error) {
	conn, err := t.dialer.DialContext(ctx, t.network, t.address)
	if err != nil {
		<-t.openSlots
		if errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ENOENT) {
			return nil, fmt.Errorf("%w: %w", ErrServerGone, err)
		}
		return nil, err
	}
	if unixConn, ok := conn.(*net.UnixConn); ok {
		if err := checkPeer(unixConn, t.address, t.serverUID); err != nil {
			conn.Close()
			<-t.openSlots
			return nil, err
		}
	}
	return &streamConn{conn: conn, reader: bufio.NewReaderSize(conn, 64<<10)}, nil
}

// checkPeer refuses a Unix socket whose listening process runs as another
// user than the server's (spec section 6.1), before a byte is sent: anyone
// who could bind the path first would read the requests and forge replies.
// (TCP has no such check: any local user can listen on a port.)
func checkPeer(conn *net.UnixConn, address string, serverUID int) error {
	raw, err := conn.SyscallConn()
	if err != nil {
		return err
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return err
	}
	if credErr != nil {
		return fmt.Errorf("SO_PEERCRED on %s: %w", address, credErr)
	}
	if int(cred.Uid) != serverUID {
		return fmt.Errorf("%w: unix socket %s is served by uid %d (pid %d), not by the server's uid %d",
			ErrUntrusted, address, cred.Uid, cred.Pid, serverUID)
	}
	return nil
}

// get returns an idle connection, or a new one while fewer than the pool
// size are open; reused says whether it served requests before.
func (t *streamTransport) get(ctx context.Context) (c *streamConn, reused bool, err error) {
	select {
	case c = <-t.idle:
		return c, true, nil
	default:
	}
	select {
	case c = <-t.idle:
		return c, true, nil
	case t.openSlots <- struct{}{}:
		c, err = t.dial(ctx)
		return c, false, err
	case <-ctx.Done():
		return nil, false, ctx.Err()
	}
}

// put returns a connection to the pool, or closes it when a request left it
// in an unknown state (the stream cannot be resynchronised).
func (t *streamTransport) put(c *streamConn, reusable bool) {
	if reusable && !t.closed.Load() {
		t.idle <- c
		return
	}
	c.conn.Close()
	<-t.openSlots
}

// exchange sends one request and reads replies until the final one. When a
// pooled connection turns out to have been closed by the server while idle
// (before any reply), the request is sent again once on a new connection:
// the server closed it without reading the request.
func (t *streamTransport) exchange(ctx context.Context, typ protocol.MsgType, body []byte, onMessage func(protocol.MsgType, []byte) error) error {
	if t.closed.Load() {
		return ErrClosed
	}
	packet, err := protocol.AppendPacket(nil, typ, body)
	if err != nil {
		return err
	}
	for {
		c, reused, err := t.get(ctx)
		if err != nil {
			return err
		}
		replied, reusable, err := t.exchangeOn(ctx, c, packet, onMessage)
		t.put(c, reusable)
		if reused && !replied && closedWhileIdle(err) && ctx.Err() == nil {
			continue
		}
		return err
	}
}

// exchangeOn runs one request on c. reusable says whether c is at a packet
// boundary with nothing pending, so the next request may use it.
func (t *streamTransport) exchangeOn(ctx context.Context, c *streamConn, packet []byte, onMessage func(protocol.MsgType, []byte) error) (replied, reusable bool, err error) {
	deadline, _ := ctx.Deadline()
	c.conn.SetDeadline(deadline)
	if ctx.Done() != nil {
		// A cancel without a deadline interrupts the blocked read or write.
		// Once it has fired, c's deadline is clobbered: c is not reused.
		interrupted := make(chan struct{})
		stop := context.AfterFunc(ctx, func() {
			defer close(interrupted)
			c.conn.SetDeadline(time.Unix(1, 0))
		})
		defer func() {
			if !stop() {
				<-interrupted
				reusable = false
			}
		}()
	}
	if _, err := c.conn.Write(packet); err != nil {
		return false, false, t.ioError(ctx, err)
	}
	for {
		replyType, reply, err := protocol.ReadPacket(c.reader, protocol.MaxPacketBody)
		if err != nil {
			return replied, false, t.ioError(ctx, err)
		}
		replied = true
		final := replyType != protocol.TypeStreamChunk
		if err := onMessage(replyType, reply); err != nil || final {
			// Replies still to come would be read as the next request's.
			return true, final, err
		}
	}
}

// closedWhileIdle recognises a connection the server had already closed.
func closedWhileIdle(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// ioError explains a failed read or write: the caller's deadline or cancel,
// the server going away, or the error itself.
func (t *streamTransport) ioError(ctx context.Context, err error) error {
	if ctxErr := ctx.Err(); ctxErr != nil {
		return ctxErr
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return context.DeadlineExceeded
	}
	if closedWhileIdle(err) || errors.Is(err, protocol.ErrTruncated) {
		return fmt.Errorf("%w: %s %s: %w", ErrServerGone, t.network, t.address, err)
	}
	return err
}

func (t *streamTransport) close() error {
	t.closed.Store(true)
	for {
		select {
		case c := <-t.idle:
			c.conn.Close()
			<-t.openSlots
		default:
			return nil
		}
	}
}
