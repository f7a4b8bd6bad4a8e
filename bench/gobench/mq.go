package main

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/go-zeromq/zmq4"
	"go.nanomsg.org/mangos/v3"
	"go.nanomsg.org/mangos/v3/protocol/req"
	_ "go.nanomsg.org/mangos/v3/transport/ipc" // registers ipc://
)

// The peers a Go<->Python team would pick instead of shmserve, over ipc://
// (bench/servers/mq_echo.py). Each goroutine gets a request socket of its
// own, as these libraries' REQ sockets allow one request in flight each.
//
// ZeroMQ: go-zeromq/zmq4, the maintained pure-Go implementation; the cgo
// bindings (pebbe/zmq4) would need libzmq's headers, which this machine's
// build does not have, and a pure-Go client matches the rest of the driver.
// NNG: mangos v3, the Go implementation of the same protocols, by NNG's
// author.

// mqDeadline bounds one send or receive: the libraries' calls take no context.
const mqDeadline = 10 * time.Second

type mqTarget struct {
	kind    string
	address string
	dial    func(ctx context.Context, address string) (mqSocket, error)
	mu      sync.Mutex
	sockets []mqSocket
}

type mqSocket interface {
	roundTrip(p []byte) ([]byte, error)
	Close() error
}

func newMQTarget(kind, path string) (*mqTarget, error) {
	t := &mqTarget{kind: kind, address: "ipc://" + path}
	switch kind {
	case "zmq":
		t.dial = dialZMQ
	case "nng":
		t.dial = dialNNG
	default:
		return nil, fmt.Errorf("unknown message library %q", kind)
	}
	return t, nil
}

func (t *mqTarget) Call(cell Cell) (Call, int, error) {
	if cell.Op != "echo" {
		return unsupported(t.kind, cell)
	}
	s, err := t.dial(context.Background(), t.address)
	if err != nil {
		return nil, 0, fmt.Errorf("%s: dial %s: %w", t.kind, t.address, err)
	}
	t.mu.Lock()
	t.sockets = append(t.sockets, s)
	t.mu.Unlock()
	p := payload(cell.Size)
	return func(ctx context.Context) error {
		got, err := s.roundTrip(p)
		if err != nil {
			return err
		}
		return checkEcho(p, got)
	}, 1, nil
}

func (t *mqTarget) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	var errs []error
	for _, s := range t.sockets {
		errs = append(errs, s.Close())
	}
	t.sockets = nil
	return errors.Join(errs...)
}

type zmqSocket struct{ s zmq4.Socket }

func dialZMQ(ctx context.Context, address string) (mqSocket, error) {
	s := zmq4.NewReq(ctx)
	if err := s.Dial(address); err != nil {
		s.Close()
		return nil, err
	}
	return zmqSocket{s}, nil
}

func (z zmqSocket) roundTrip(p []byte) ([]byte, error) {
	if err := z.s.Send(zmq4.NewMsg(p)); err != nil {
		return nil, err
	}
	msg, err := z.s.Recv()
	if err != nil {
		return nil, err
	}
	return msg.Bytes(), nil
}

func (z zmqSocket) Close() error { return z.s.Close() }

type nngSocket struct{ s mangos.Socket }

func dialNNG(_ context.Context, address string) (mqSocket, error) {
	s, err := req.NewSocket()
	if err != nil {
		return nil, err
	}
	// No size limit (mangos, like nng, drops replies over 1 MiB by default), and a
	// deadline, so that a lost message fails the cell instead of hanging it.
	for option, value := range map[string]any{mangos.OptionMaxRecvSize: 0,
		mangos.OptionRecvDeadline: mqDeadline, mangos.OptionSendDeadline: mqDeadline} {
		if err := s.SetOption(option, value); err != nil {
			s.Close()
			return nil, err
		}
	}
	if err := s.Dial(address); err != nil {
		s.Close()
		return nil, err
	}
	return nngSocket{s}, nil
}

func (n nngSocket) roundTrip(p []byte) ([]byte, error) {
	if err := n.s.Send(p); err != nil {
		return nil, err
	}
	return n.s.Recv()
}

func (n nngSocket) Close() error { return n.s.Close() }
