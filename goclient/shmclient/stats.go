package shmclient

import (
	"context"
	"errors"
	"sync/atomic"

	"github.com/shmserve/shmserve/goclient/internal/ring"
	"github.com/shmserve/shmserve/goclient/protocol"
)

// Stats is a snapshot of a Client's counters since Dial, for monitoring;
// goclient/promcollector exports it to Prometheus. Each counter is read
// once, so counters read while calls run may disagree by those calls.
type Stats struct {
	// Transport is what Client.Transport reports.
	Transport string
	// Calls counts the requests made, by type, whatever their outcome; a
	// ClassifyBatch sent as several requests counts each. Arguments a
	// method refuses before it builds a request (an empty batch, steps < 1,
	// a tensor it cannot encode) count nowhere. Types never sent are absent.
	Calls map[protocol.MsgType]uint64
	// Errors counts the requests that failed, by cause: a *protocol.Error by
	// its code's name (UNSUPPORTED, TOO_LARGE, ...), whether the server
	// sent it or the client refused the request; otherwise NO_FREE_SLOT,
	// SERVER_GONE, UNTRUSTED, CLOSED, PROTOCOL_VIOLATION, DEADLINE_EXCEEDED,
	// CONTEXT_CANCELED, or OTHER (an error of a PromptStream callback, say).
	// Causes never seen are absent.
	Errors map[string]uint64
	// InFlight is how many requests are under way.
	InFlight int64
	// RingSpun counts the ring's waits for a reply frame that found it
	// without blocking (at once or while spinning), RingBlocked those that
	// blocked on the semaphore: many blocked waits with a fast model say
	// WithSpin is too short. Both stay 0 off the ring.
	RingSpun, RingBlocked uint64
	// Fallbacks counts the times the fallback was taken: once when Dial
	// could not reach the primary, once per ring call sent over it because
	// other processes held every slot.
	Fallbacks uint64
}

// verdicts name the errors that are not protocol errors, tried in order: a
// claim that outwaited its context wraps both ErrNoFreeSlot and the
// context's error, and the slots are the cause.
var verdicts = [...]struct {
	name string
	err  error
}{
	{"NO_FREE_SLOT", ErrNoFreeSlot},
	{"SERVER_GONE", ErrServerGone},
	{"UNTRUSTED", ErrUntrusted},
	{"CLOSED", ErrClosed},
	{"PROTOCOL_VIOLATION", protocol.ErrProtocolViolation},
	{"DEADLINE_EXCEEDED", context.DeadlineExceeded},
	{"CONTEXT_CANCELED", context.Canceled},
}

// otherVerdict counts the errors nothing else names, after the verdicts.
const otherVerdict = len(verdicts)

// countedCodes bounds the codes counted by code; the spec assigns 1..16, so
// a code above (a server's bug) counts as OTHER.
const countedCodes = 64

// counters back Stats. Fixed arrays of atomics, so a call counts itself
// without a lock or an allocation.
type counters struct {
	calls     [256]atomic.Uint64 // by protocol.MsgType
	codes     [countedCodes]atomic.Uint64
	verdicts  [otherVerdict + 1]atomic.Uint64
	inFlight  atomic.Int64
	fallbacks atomic.Uint64
	waits     ring.WaitCounts
}

func (c *counters) countError(err error) {
	if protocolErr, ok := errors.AsType[*protocol.Error](err); ok {
		if protocolErr.Code < countedCodes {
			c.codes[protocolErr.Code].Add(1)
		} else {
			c.verdicts[otherVerdict].Add(1)
		}
		return
	}
	for i, v := range verdicts {
		if errors.Is(err, v.err) {
			c.verdicts[i].Add(1)
			return
		}
	}
	c.verdicts[otherVerdict].Add(1)
}

// Stats returns the client's counters; it is safe to call while calls run.
func (c *Client) Stats() Stats {
	s := Stats{
		Transport:   c.Transport(),
		Calls:       map[protocol.MsgType]uint64{},
		Errors:      map[string]uint64{},
		InFlight:    c.counters.inFlight.Load(),
		RingSpun:    c.counters.waits.Spun.Load(),
		RingBlocked: c.counters.waits.Blocked.Load(),
		Fallbacks:   c.counters.fallbacks.Load(),
	}
	for typ := range c.counters.calls {
		if n := c.counters.calls[typ].Load(); n > 0 {
			s.Calls[protocol.MsgType(typ)] = n
		}
	}
	for code := range c.counters.codes {
		if n := c.counters.codes[code].Load(); n > 0 {
			s.Errors[protocol.Code(code).String()] = n
		}
	}
	for i := range c.counters.verdicts {
		if n := c.counters.verdicts[i].Load(); n > 0 {
			name := "OTHER"
			if i < otherVerdict {
				name = verdicts[i].name
			}
			s.Errors[name] = n
		}
	}
	return s
}
