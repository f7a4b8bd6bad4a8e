package shmclient

import (
	"log/slog"
	"time"

	"github.com/shmserve/shmserve/goclient/internal/ring"
)

// Option configures Dial.
type Option func(*options)

type options struct {
	fallback string
	logger   *slog.Logger
	ring     ring.Config
	conns    int
	// claimPatienceSet says WithClaimPatience chose ring.ClaimPatience.
	claimPatienceSet bool
}

// defaultFallbackPatience is how long a ring call with a fallback waits for a
// slot held by other processes before it takes the fallback instead.
const defaultFallbackPatience = 100 * time.Millisecond

// defaultConns is the default pool size of a socket transport. The packet
// protocol carries one request at a time per connection, so this is also how
// many requests a Client keeps in flight over a socket.
const defaultConns = 16

func defaultOptions() options {
	return options{logger: slog.Default(), ring: ring.DefaultConfig(), conns: defaultConns}
}

// WithFallback names the address to use when addr cannot be reached at Dial,
// typically unix:///path when the ring is unavailable. The switch is logged
// and Client.Transport reports it. A ring call that finds every slot held by
// other processes for its claim patience (default 100ms with a fallback) is
// sent over the fallback too, dialed at its first use.
func WithFallback(addr string) Option { return func(o *options) { o.fallback = addr } }

// WithClaimPatience bounds how long a ring call waits for a slot while other
// processes hold every slot; it then fails with ErrNoFreeSlot, or goes to
// the fallback. 0 waits until the call's context ends (the default without a
// fallback).
func WithClaimPatience(d time.Duration) Option {
	return func(o *options) { o.ring.ClaimPatience, o.claimPatienceSet = max(d, 0), true }
}

// WithServerUID names the user the server runs as (default: this process's
// effective uid). The client refuses a ring whose objects another user owns,
// and a Unix socket whose server runs as another user (spec section 6.1):
// set it to reach a --group-access server of another user.
func WithServerUID(uid int) Option { return func(o *options) { o.ring.ServerUID = uid } }

// WithLogger sets where the client logs fallbacks and re-attaches
// (default slog.Default()).
func WithLogger(logger *slog.Logger) Option { return func(o *options) { o.logger = logger } }

// WithSpin sets how long a ring call polls for its reply before it blocks
// on the semaphore (default 50µs). A lone call stretches the spin up to 10x
// when replies have typically been taking longer (a model call just over
// the spin). Spinning saves the wake-up latency of a blocked wait but holds
// a CPU while it lasts (one CPU for all the calls in flight: they share one
// poller), so spins that keep failing pause spinning by themselves. 0 blocks
// at once, for hosts where a CPU costs more than latency. bench/README.md
// has the measurements behind the default.
func WithSpin(d time.Duration) Option { return func(o *options) { o.ring.Spin = max(d, 0) } }

// WithConns sets how many connections a socket transport may open
// (default 16); at least 1.
func WithConns(n int) Option { return func(o *options) { o.conns = max(n, 1) } }

// WithLivenessInterval sets how often a blocked ring call checks that the
// server lives (default 50ms, the spec's maximum). A shorter interval notices
// a dead server sooner at the cost of a few syscalls per interval per waiter.
func WithLivenessInterval(d time.Duration) Option {
	return func(o *options) {
		if d > 0 {
			o.ring.LivenessInterval = d
		}
	}
}
